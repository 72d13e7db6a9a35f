"""Greedy decoding by full recomputation: the whole sequence runs through the model for every new
token (no KV cache). Simple and exact; meant for tiny models (the demo and tests), not for speed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def greedy_generate(model, params, batch: dict, max_new_tokens: int, eos_id: int) -> np.ndarray:
    """Continue each prompt of ``batch`` (the ``wings_jax.batch`` format, right-padded, with room for
    ``max_new_tokens`` after the longest prompt) with the most likely token, ``max_new_tokens`` times.

    Returns int32 (B, max_new_tokens): the new tokens; after a row's ``eos_id`` the row holds ``eos_id``.
    """
    lengths = np.asarray(batch["attention_mask"]).sum(axis=1)
    seq_len = np.shape(batch["input_ids"])[1]
    if lengths.max() + max_new_tokens > seq_len:
        raise ValueError(f"a prompt of {lengths.max()} tokens + max_new_tokens={max_new_tokens} exceeds the batch's "
                         f"sequence length {seq_len}")
    lengths = jnp.asarray(lengths, jnp.int32)
    return np.asarray(_generate(model, params, dict(batch), lengths, max_new_tokens=max_new_tokens, eos_id=eos_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id"))
def _generate(model, params, batch, lengths, max_new_tokens: int, eos_id: int):
    rows = jnp.arange(lengths.shape[0])

    def add_token(i, carry):
        batch, tokens, done = carry
        logits = model.apply({"params": params}, batch, mode="logits")  # (B, L, V) float32
        position = lengths + i  # where the new token goes
        token = jnp.argmax(logits[rows, position - 1], axis=-1).astype(jnp.int32)
        token = jnp.where(done, eos_id, token)
        batch = {
            **batch,
            "input_ids": batch["input_ids"].at[rows, position].set(token),
            "attention_mask": batch["attention_mask"].at[rows, position].set(True),
            "positions": batch["positions"].at[rows, position].set(position),
        }
        return batch, tokens.at[:, i].set(token), done | (token == eos_id)

    tokens = jnp.zeros((lengths.shape[0], max_new_tokens), jnp.int32)
    done = jnp.zeros(lengths.shape, bool)
    return jax.lax.fori_loop(0, max_new_tokens, add_token, (batch, tokens, done))[1]
