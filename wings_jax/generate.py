"""Text generation: greedy or sampled continuation of a batch of (multimodal) prompts.

Two ways to compute each new token's logits, with the same sampling on top:

- ``cache`` (``causal`` mask mode): one prefill over the right-padded prompts fills static-size KV
  caches (main attention, textual learner, visual learner; ``wings_jax.kv_cache``) and chooses the
  first token; then decode steps append one token per row: the textual learner's keys grow with each
  token, the visual learner's stay those of the prompt's images, and the router runs at every step.
  The steps run on the device, ``decode_chunk`` of them per call (a while loop that also chooses the
  tokens and stops once every row is done), with the layers unrolled over per-layer weight and cache
  buffers, the caches updated in place (``wings_jax.kv_cache`` says why).
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
from wings_jax.kv_cache import CACHE, DecodeState, unstack_layers
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


DECODE_CHUNK = 16  # decode steps per device call: on_token sees the tokens in bursts of this many
TEXT_CACHE_ROUNDING = 128


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
    decode_chunk: int = DECODE_CHUNK,
) -> Generation:
    """Continue every prompt of ``batch`` (``wings_jax.batch`` format; a batch without ``pixel_values``
    means no image was passed) by up to ``sampling.max_new_tokens`` tokens.

    ``method``: 'cache', 'recompute' or 'auto' (cache in causal mask mode, recompute in reference mode).
    ``rng``: needed when ``sampling.temperature > 0``. ``on_token(step, tokens (B,), done (B,))`` is
    called for every step, in order, for streaming: right after the first token, then as each chunk of
    ``decode_chunk`` steps comes back from the device (cache method; 1 gives every token as soon as it
    exists, at some cost per token). Stops early once every row is done.

    The cache method decodes with each layer's weights in buffers of their own: with scanned layers
    (``config.scan_layers``) it copies the decoder's weights for the duration of the call.
    """
    sampling.validate()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "auto":
        method = "cache" if config.wings.mask_mode == "causal" else "recompute"
    if sampling.temperature > 0 and rng is None:
        raise ValueError(f"sampling with temperature={sampling.temperature} needs an rng key")
    if decode_chunk < 1:
        raise ValueError(f"decode_chunk={decode_chunk} must be >= 1")
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
    record = _Record(lengths.shape[0], sampling, return_logits, on_token)
    if method == "cache":
        text_cache_length = _text_cache_length(config, batch, cache_length, sampling.max_new_tokens)
        _cached_generation(config, params, batch, cache_length, text_cache_length, sampling, rng, decode_chunk, record)
    else:
        _recomputed_generation(config, params, batch, lengths, cache_length, sampling, rng, record)
    return record.result()


def greedy_generate(model: WingsModel, params, batch: dict, max_new_tokens: int, eos_id: int) -> np.ndarray:
    """Greedy continuation of each prompt by ``max_new_tokens`` tokens; int32 (B, max_new_tokens) holding
    ``eos_id`` after a row's ``eos_id``."""
    sampling = Sampling(max_new_tokens=max_new_tokens, stop_tokens=(eos_id,))
    return generate(model.config, params, batch, sampling).tokens


class _Record:
    """The tokens chosen so far, on the host, and the streaming callback."""

    def __init__(self, batch_size: int, sampling: Sampling, return_logits: bool, on_token):
        self.tokens = np.full((batch_size, sampling.max_new_tokens), sampling.fill_token, np.int32)
        self.num_tokens = np.zeros(batch_size, np.int32)
        self.done = np.zeros(batch_size, bool)
        self.logits = [] if return_logits else None
        self.on_token = on_token
        self.steps = 0

    def add(self, tokens: np.ndarray, done: np.ndarray, logits: np.ndarray | None) -> None:
        """One step: each row's token (the fill token for rows already done), which rows are done after it,
        and the logits the tokens were chosen from."""
        self.tokens[:, self.steps] = tokens
        self.num_tokens += ~self.done
        self.done = done
        if self.logits is not None:
            self.logits.append(logits)
        if self.on_token is not None:
            self.on_token(self.steps, tokens, done)
        self.steps += 1

    @property
    def finished(self) -> bool:
        return bool(self.done.all()) or self.steps == self.tokens.shape[1]

    def result(self) -> Generation:
        logits = None if self.logits is None else np.stack(self.logits, axis=1)
        return Generation(tokens=self.tokens, num_tokens=self.num_tokens, logits=logits)


class _Chooser(NamedTuple):
    """What choosing a token needs of ``Sampling`` (a static argument: no recompiling per max_new_tokens)."""

    temperature: float
    top_k: int
    top_p: float
    stop_tokens: tuple[int, ...]
    fill_token: int

    @classmethod
    def of(cls, sampling: Sampling) -> _Chooser:
        return cls(sampling.temperature, sampling.top_k, sampling.top_p, sampling.stop_tokens or (-1,),
                   sampling.fill_token)

    def __call__(self, logits, rng, done):
        """Next tokens (B,) int32 from ``logits`` (rows already ``done`` get the fill token), which rows are
        done after them, and the rng for the next step."""
        rng, key = jax.random.split(rng)
        chosen = _choose(logits, key, self.temperature, self.top_k, self.top_p)
        chosen = jnp.where(done, self.fill_token, chosen).astype(jnp.int32)
        return chosen, done | jnp.isin(chosen, jnp.asarray(self.stop_tokens, jnp.int32)), rng


@functools.partial(jax.jit, static_argnames=("chooser",))
def _pick(chooser: _Chooser, logits, rng, done):
    return chooser(logits, rng, done)


class _Decoding(NamedTuple):
    """What a decode step carries to the next: the caches and their state, the last chosen tokens."""

    cache: dict
    state: DecodeState
    tokens: jnp.ndarray  # (B,) int32
    done: jnp.ndarray  # (B,) bool
    rng: jax.Array


def _text_cache_length(config: ModelConfig, batch: dict, cache_length: int, max_new_tokens: int) -> int:
    """Slots for the textual learner's keys (``WingsModel.prefill``): each row's prompt keys and new tokens,
    rounded up to ``TEXT_CACHE_ROUNDING`` (fewer distinct shapes to compile), at most ``cache_length``."""
    keys = (np.asarray(batch["attention_mask"], bool) & ~np.asarray(batch["image_mask"], bool)
            & (np.asarray(batch["positions"]) >= config.wings.system_prompt_length)).sum(axis=1)
    needed = int(keys.max()) + max_new_tokens
    return min(cache_length, -(-needed // TEXT_CACHE_ROUNDING) * TEXT_CACHE_ROUNDING)


def _cached_generation(config: ModelConfig, params, batch: dict, cache_length: int, text_cache_length: int,
                       sampling: Sampling, rng, decode_chunk: int, record: _Record) -> None:
    chooser = _Chooser.of(sampling)
    logits, cache, state = _prefill(config, params, dict(batch), cache_length, text_cache_length)
    tokens, done, rng = _pick(chooser, logits, rng, jnp.zeros(logits.shape[:1], bool))
    decoder = params["decoder"]
    if "layers" in decoder and sampling.max_new_tokens > 1:
        # scanned: every layer's weights in buffers of their own (kv_cache.unstack_layers); dispatched before
        # the first token is waited for, so that it runs right after the prefill
        decoder = _unstack_params(decoder, config.text.num_layers)
    record.add(np.asarray(tokens), np.asarray(done), None if record.logits is None else np.asarray(logits))
    carry = _Decoding(cache, state, tokens, done, rng)
    decode_config = config.replace(scan_layers=False)
    while not record.finished:
        left = jnp.int32(record.tokens.shape[1] - record.steps)
        count, carry, tokens, done, logits = _decode_chunk(decode_config, chooser, decode_chunk,
                                                           record.logits is not None, {"decoder": decoder}, carry, left)
        count, tokens, done = int(count), np.asarray(tokens), np.asarray(done)
        logits = None if logits is None else np.asarray(logits)
        for step in range(count):
            record.add(tokens[step], done[step], None if logits is None else logits[step])


@functools.partial(jax.jit, static_argnames=("config", "cache_length", "text_cache_length"))
def _prefill(config: ModelConfig, params, batch: dict, cache_length: int, text_cache_length: int):
    """The prompts' last logits, caches and ``DecodeState``; the caches of unrolled layers
    (``kv_cache.unstack_layers``)."""
    (logits, state), variables = WingsModel(config).apply(
        {"params": params}, batch, cache_length, text_cache_length, method=WingsModel.prefill, mutable=[CACHE])
    return logits, unstack_layers(variables[CACHE], config.text.num_layers), state


@functools.partial(jax.jit, static_argnums=(1,))
def _unstack_params(decoder_params, num_layers: int):
    return unstack_layers({"decoder": decoder_params}, num_layers)["decoder"]


@functools.partial(jax.jit, static_argnames=("config", "chooser", "steps", "with_logits"), donate_argnames=("carry",))
def _decode_chunk(config: ModelConfig, chooser: _Chooser, steps: int, with_logits: bool, params, carry: _Decoding,
                  left):
    """Up to ``min(steps, left)`` decode steps, fewer once every row is done: a while loop on the device that
    feeds each step's tokens to the next. Returns how many ran, the carry, and per step (steps, B) the
    tokens, the rows done after them and, ``with_logits``, the logits (steps, B, V) they were chosen from."""
    model = WingsModel(config)
    batch_size = carry.tokens.shape[0]

    def body(loop):
        step, carry, tokens, done, seen = loop
        (logits, state), variables = model.apply({"params": params, CACHE: carry.cache}, carry.tokens, carry.state,
                                                 method=WingsModel.decode_step, mutable=[CACHE])
        chosen, now_done, rng = chooser(logits, carry.rng, carry.done)
        carry = _Decoding(variables[CACHE], state, chosen, now_done, rng)
        seen = None if seen is None else seen.at[step].set(logits)
        return step + 1, carry, tokens.at[step].set(chosen), done.at[step].set(now_done), seen

    def more(loop):
        return (loop[0] < jnp.minimum(left, steps)) & ~loop[1].done.all()

    seen = jnp.zeros((steps, batch_size, config.text.vocab_size), jnp.float32) if with_logits else None
    init = (jnp.int32(0), carry, jnp.zeros((steps, batch_size), jnp.int32), jnp.zeros((steps, batch_size), bool), seen)
    return jax.lax.while_loop(more, body, init)


def _recomputed_generation(config: ModelConfig, params, batch: dict, lengths: np.ndarray, cache_length: int,
                           sampling: Sampling, rng, record: _Record) -> None:
    """The full-recompute path, one step per call: the prompts in a buffer of ``cache_length`` tokens."""
    widen = lambda key: np.pad(np.asarray(batch[key]), ((0, 0), (0, cache_length - np.shape(batch[key])[1])))
    buffer = {key: widen(key) for key in ("input_ids", "image_mask", "positions", "attention_mask")}
    buffer.update({key: batch[key] for key in ("pixel_values", "image_valid") if batch.get(key) is not None})
    lengths, done, chooser = jnp.asarray(lengths), jnp.zeros(lengths.shape, bool), _Chooser.of(sampling)
    while True:
        logits = _last_logits(config, params, buffer)
        tokens, done, rng = _pick(chooser, logits, rng, done)
        record.add(np.asarray(tokens), np.asarray(done), None if record.logits is None else np.asarray(logits))
        if record.finished:
            return
        buffer, lengths = _append(buffer, lengths, tokens)


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
