"""Static-size key/value caches for incremental decoding (``WingsModel`` modes 'prefill' and 'decode').

Every attention that decodes incrementally (the main attention, the textual learner, the visual
learner) keeps its keys and values, after projection and RoPE, in the Flax ``cache`` collection of
its own module. Slot ``j`` of the main and textual caches holds sequence position ``j`` (prompts are
right-padded and positions run 0..len-1, so slot and position agree); the visual cache holds the
image features in their batch order. Which slots are keys is carried beside the cache in
``DecodeState``, so the masks are plain ``MaskSpec`` over cache slots.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

CACHE = "cache"


class DecodeState(NamedTuple):
    """Per-row bookkeeping of a decoding batch (the same for every layer)."""

    lengths: jnp.ndarray  # (B,) int32: tokens in the cache, i.e. the slot (= position) of the next token
    kv_valid: jnp.ndarray  # (B, T) bool: filled slots of the main attention cache
    text_valid: jnp.ndarray  # (B, T) bool: slots that are textual learner keys
    visual_index: jnp.ndarray | None = None  # (B, F) int: sequence index of each visual cache slot
    visual_valid: jnp.ndarray | None = None  # (B, F) bool: visual cache slots that hold an image token


def cached_keys_values(
    module: nn.Module, k: jnp.ndarray | None, v: jnp.ndarray | None, slots: jnp.ndarray | None, size: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Write new keys/values (B, S, heads, hd) at cache ``slots`` (B, S) of ``module``'s cache (created as
    zeros with ``size`` slots on first use) and return the whole cache (B, size, heads, hd) for both.

    ``k = v = None`` reads the cache without writing (keys fixed after the prefill, e.g. the image).
    """
    if k is None:
        if not module.has_variable(CACHE, "key"):
            raise ValueError(f"{module.name}: no cached keys to read; run the prefill first")
        return module.get_variable(CACHE, "key"), module.get_variable(CACHE, "value")
    batch = k.shape[0]
    key = module.variable(CACHE, "key", jnp.zeros, (batch, size, *k.shape[2:]), k.dtype)
    value = module.variable(CACHE, "value", jnp.zeros, (batch, size, *v.shape[2:]), v.dtype)
    rows = jnp.arange(batch)[:, None]
    key.value = key.value.at[rows, slots].set(k.astype(key.value.dtype))
    value.value = value.value.at[rows, slots].set(v.astype(value.value.dtype))
    return key.value, value.value
