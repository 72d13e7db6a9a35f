"""Text generation: greedy or sampled continuation of a batch of (multimodal) prompts.

Two ways to compute each new token's logits, with the same sampling on top:

- ``cache`` (``causal`` mask mode): one prefill over the right-padded prompts fills static-size KV
  caches (main attention, textual learner, visual learner; ``wings_jax.kv_cache``), then a jitted
  decode step appends one token per row: the textual learner's keys grow with each token, the visual
  learner's stay those of the prompt's images, and the router runs at every step.
- ``recompute``: the whole sequence (a static buffer of the cache length) runs through the model for
  every new token. This is how ``reference`` mask mode generates: there the textual learner's keys, its
  padding rows and the visual multiplier depend on the whole sequence and on the other rows of the
  batch, exactly as in the reference implementation, which also recomputes them at every step. It
  also serves as the ground truth for the cache path in tests.

Prompts are the ``wings_jax.batch`` format (right-padded, images expanded); rows may have different
lengths. The new token of a row goes at its own length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wings_jax.config import ModelConfig
from wings_jax.kv_cache import CACHE, NEW_ENTRIES, write_new_entries
from wings_jax.model import WingsModel

METHODS = ("auto", "cache", "recompute")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to choose tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` switch those filters off.

    A row stops after it emits one of ``stop_tokens``; its later tokens are ``pad_token`` (by default
    the first stop token, or 0 without any).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_token: int | None = None

    def validate(self) -> Sampling:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        return self

    @property
    def fill_token(self) -> int:
        if self.pad_token is not None:
            return self.pad_token
        return self.stop_tokens[0] if self.stop_tokens else 0


class Generation(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32; after a row's stop token, ``Sampling.fill_token``
    num_tokens: np.ndarray  # (B,) tokens generated per row, its stop token included
    logits: np.ndarray | None  # (B, steps, V) float32: the logits each token was chosen from (on request)


def generate(
    config: ModelConfig,
    params,
    batch: dict,
    sampling: Sampling,
    rng: jax.Array | None = None,
    method: str = "auto",
    return_logits: bool = False,
    on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Generation:
    """Continue every prompt of ``batch`` (``wings_jax.batch`` format; a batch without ``pixel_values``
    means no image was passed) by up to ``sampling.max_new_tokens`` tokens.

    ``method``: 'cache', 'recompute' or 'auto' (cache in causal mask mode, recompute in reference mode).
    ``rng``: needed when ``sampling.temperature > 0``. ``on_token(step, tokens (B,), done (B,))`` is
    called after every step, for streaming. Stops early once every row is done.
    """
    sampling.validate()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "auto":
        method = "cache" if config.wings.mask_mode == "causal" else "recompute"
    if sampling.temperature > 0 and rng is None:
        raise ValueError(f"sampling with temperature={sampling.temperature} needs an rng key")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    config = config.replace(remat_policy="none")  # no backward pass: nothing to rematerialise
    lengths = np.asarray(batch["attention_mask"]).sum(axis=1).astype(np.int32)
    if lengths.min() < 1:
        raise ValueError(f"batch row {int(np.argmin(lengths))} has an empty prompt")
    seq_len = np.shape(batch["input_ids"])[1]
    cache_length = max(seq_len, int(lengths.max()) + sampling.max_new_tokens)
    if config.wings.enabled and config.wings.stage == 2 and cache_length > config.wings.router_positions:
        raise ValueError(f"prompt + max_new_tokens needs {cache_length} positions, more than the router's "
                         f"wings.router_positions={config.wings.router_positions}")
    step = _cached_steps(config, params, batch, cache_length) if method == "cache" else _recompute_steps(
        config, params, batch, lengths, cache_length)
    return _decode_loop(step, lengths.shape[0], sampling, rng, return_logits, on_token)


def greedy_generate(model: WingsModel, params, batch: dict, max_new_tokens: int, eos_id: int) -> np.ndarray:
    """Greedy continuation of each prompt by ``max_new_tokens`` tokens; int32 (B, max_new_tokens) holding
    ``eos_id`` after a row's ``eos_id``."""
    sampling = Sampling(max_new_tokens=max_new_tokens, stop_tokens=(eos_id,))
    return generate(model.config, params, batch, sampling).tokens


def _decode_loop(step, batch_size: int, sampling: Sampling, rng, return_logits: bool, on_token) -> Generation:
    """Choose a token from the current logits, feed it back, until ``max_new_tokens`` or every row is done.

    ``step(None)`` gives the prompts' next-token logits; ``step(tokens)`` appends tokens and gives the next.
    """
    stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
    tokens = np.full((batch_size, sampling.max_new_tokens), sampling.fill_token, np.int32)
    done = np.zeros(batch_size, bool)
    num_tokens = np.zeros(batch_size, np.int32)
    seen_logits = []
    logits = step(None)
    for i in range(sampling.max_new_tokens):
        rng, key = jax.random.split(rng)
        if return_logits:
            seen_logits.append(np.asarray(logits))
        chosen = np.asarray(_choose(logits, key, sampling.temperature, sampling.top_k, sampling.top_p))
        chosen = np.where(done, sampling.fill_token, chosen).astype(np.int32)
        tokens[:, i] = chosen
        num_tokens += ~done
        done = done | np.isin(chosen, np.asarray(stop))
        if on_token is not None:
            on_token(i, chosen, done)
        if done.all() or i + 1 == sampling.max_new_tokens:
            break
        logits = step(jnp.asarray(chosen))
    stacked = np.stack(seen_logits, axis=1) if return_logits else None
    return Generation(tokens=tokens, num_tokens=num_tokens, logits=stacked)


def _cached_steps(config: ModelConfig, params, batch: dict, cache_length: int):
    """The step function of the KV-cache path (see ``_decode_loop``)."""
    carry = {}

    def step(tokens):
        if tokens is None:
            logits, carry["cache"], carry["state"] = _prefill(config, params, dict(batch), cache_length)
        else:
            logits, carry["cache"], carry["state"] = _decode(config, params, carry["cache"], carry["state"], tokens)
        return logits

    return step


@functools.partial(jax.jit, static_argnames=("config", "cache_length"))
def _prefill(config: ModelConfig, params, batch: dict, cache_length: int):
    (logits, state), variables = WingsModel(config).apply(
        {"params": params}, batch, cache_length, method=WingsModel.prefill, mutable=["cache"])
    return logits, variables["cache"], state


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _decode(config: ModelConfig, params, cache, state, tokens):
    """One decode step; the caches are read inside the layers and the new entries written once, in place
    (``cache`` is donated)."""
    slots = state.lengths
    (logits, state), variables = WingsModel(config).apply(
        {"params": params, CACHE: cache}, tokens, state, method=WingsModel.decode_step, mutable=[NEW_ENTRIES])
    return logits, write_new_entries(cache, variables[NEW_ENTRIES], slots), state


def _recompute_steps(config: ModelConfig, params, batch: dict, lengths: np.ndarray, cache_length: int):
    """The step function of the full-recompute path: the prompts in a buffer of ``cache_length`` tokens."""
    widen = lambda key: np.pad(np.asarray(batch[key]), ((0, 0), (0, cache_length - np.shape(batch[key])[1])))
    buffer = {key: widen(key) for key in ("input_ids", "image_mask", "positions", "attention_mask")}
    buffer.update({key: batch[key] for key in ("pixel_values", "image_valid") if batch.get(key) is not None})
    carry = {"batch": buffer, "lengths": jnp.asarray(lengths)}

    def step(tokens):
        if tokens is not None:
            carry["batch"], carry["lengths"] = _append(carry["batch"], carry["lengths"], tokens)
        return _last_logits(config, params, carry["batch"])

    return step


@jax.jit
def _append(batch: dict, lengths, tokens):
    rows = jnp.arange(lengths.shape[0])
    batch = {
        **batch,
        "input_ids": batch["input_ids"].at[rows, lengths].set(tokens),
        "attention_mask": batch["attention_mask"].at[rows, lengths].set(True),
        "positions": batch["positions"].at[rows, lengths].set(lengths),
    }
    return batch, lengths + 1


@functools.partial(jax.jit, static_argnames=("config",))
def _last_logits(config: ModelConfig, params, batch: dict):
    return WingsModel(config).apply({"params": params}, batch, mode="last_logits")


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _choose(logits, key, temperature: float, top_k: int, top_p: float):
    """Next tokens (B,) from float32 logits (B, V): argmax at temperature 0, else a sample from the
    temperature-scaled distribution restricted to the top-k tokens and then to the top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth_best = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if top_p < 1:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # the nucleus: at least the best token
        cutoff = jnp.take_along_axis(descending, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)
