"""Static-size key/value caches for incremental decoding (``WingsModel`` modes 'prefill' and 'decode').

Every attention that decodes incrementally (the main attention, the textual learner, the visual
learner) keeps its keys and values, after projection and RoPE, in the Flax ``cache`` collection of
its own module. Slot ``j`` of the main and textual caches holds sequence position ``j`` (prompts are
right-padded and positions run 0..len-1, so slot and position agree); the visual cache holds the
image features in their batch order. Which slots are keys is carried beside the cache in
``DecodeState``, so the masks are plain ``MaskSpec`` over cache slots.

The prefill writes the caches (``cache`` mutable). A decode step only reads them (``cache``
immutable): each attention attends to its cache followed by the step's own key, and puts that key
and value in the ``NEW_ENTRIES`` collection; ``write_new_entries`` then stores them at their slots,
once for all layers and outside the layer scan. Were the cache mutable inside the scan, every step
would copy all of it (the scan stacks its outputs into fresh buffers): on bench_small that copying
cost more than half of a decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from wings_jax.attention import MaskSpec, attention, cached_attention

CACHE = "cache"
NEW_ENTRIES = "cache_new_entries"
SLOT_AXIS = {"key": -1, "value": -2}  # keys are cached (B, heads, hd, T), values (B, heads, T, hd)


class DecodeState(NamedTuple):
    """Per-row bookkeeping of a decoding batch (the same for every layer)."""

    lengths: jnp.ndarray  # (B,) int32: tokens in the cache, i.e. the slot (= position) of the next token
    kv_valid: jnp.ndarray  # (B, T) bool: filled slots of the main attention cache
    text_valid: jnp.ndarray  # (B, T) bool: slots that are textual learner keys
    visual_index: jnp.ndarray | None = None  # (B, F) int: sequence index of each visual cache slot
    visual_valid: jnp.ndarray | None = None  # (B, F) bool: visual cache slots that hold an image token


def attend_with_cache(
    module: nn.Module, q: jnp.ndarray, k: jnp.ndarray | None, v: jnp.ndarray | None, slots: jnp.ndarray | None,
    mask: MaskSpec, extra_values: jnp.ndarray | None = None, backend: str = "xla",
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """``attention`` of q (B, Lq, H, hd) over ``module``'s cached keys (B, heads, hd, T) and values
    (B, heads, T, hd): the layouts in which a decode step multiplies them without transposing
    (``cached_attention``).

    - prefill (``cache`` mutable): the new keys/values k, v (B, S, heads, hd) go to cache ``slots`` (B, S)
      (the cache is created as zeros with as many slots as ``mask`` has keys); attend over the whole cache.
    - decode (``cache`` immutable): attend over the cache followed by k, v, which go to ``NEW_ENTRIES``
      for ``write_new_entries``; ``mask`` and ``extra_values`` cover both. ``k = v = None`` attends over
      the cache alone (keys fixed after the prefill, e.g. the image).
    """
    if module.is_mutable_collection(CACHE):
        if k is None:
            raise ValueError(f"{module.name}: the prefill needs keys and values to cache")
        batch, _, heads, head_dim = k.shape
        size = mask.kv_index.shape[1]
        key = module.variable(CACHE, "key", jnp.zeros, (batch, heads, head_dim, size), k.dtype)
        value = module.variable(CACHE, "value", jnp.zeros, (batch, heads, size, head_dim), v.dtype)
        rows = jnp.arange(batch)[:, None]
        # indices split by slices put their (B, S) axes first: the written entries are (B, S, heads, hd)
        key.value = key.value.at[rows, :, :, slots].set(k.astype(key.value.dtype))
        value.value = value.value.at[rows, :, slots].set(v.astype(value.value.dtype))
        return attention(q, jnp.transpose(key.value, (0, 3, 1, 2)), jnp.swapaxes(value.value, 1, 2), mask,
                         extra_values, backend)
    if not module.has_variable(CACHE, "key"):
        raise ValueError(f"{module.name}: no cached keys to read; run the prefill first")
    cache_k, cache_v = module.get_variable(CACHE, "key"), module.get_variable(CACHE, "value")
    if k is not None:
        k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
        module.put_variable(NEW_ENTRIES, "key", k)
        module.put_variable(NEW_ENTRIES, "value", v)
    return cached_attention(q, cache_k, cache_v, k, v, mask, extra_values)


def write_new_entries(cache: dict, new_entries: dict, slots: jnp.ndarray) -> dict:
    """The cache with a decode step's ``NEW_ENTRIES`` (one key/value per row, (..., B, 1, heads, hd); the
    leading axis is the layer when the layers are scanned) written at ``slots`` (B,). Donate ``cache`` to
    the jitted caller so that the write happens in place."""
    flat = traverse_util.flatten_dict(cache)
    rows = jnp.arange(slots.shape[0])
    for path, entry in traverse_util.flatten_dict(new_entries).items():
        if path not in flat:
            raise ValueError(f"decode step produced {'/'.join(path)} but the cache has no such entry")
        batch_axis = entry.ndim - 4
        index = [slice(None)] * entry.ndim
        index[batch_axis] = rows
        index[SLOT_AXIS[path[-1]]] = slots
        # indices split by slices put their (B,) axis first: each row's (layers..., heads, hd)
        new = jnp.moveaxis(entry[(*(slice(None),) * batch_axis, slice(None), 0)], batch_axis, 0)
        flat[path] = flat[path].at[tuple(index)].set(new)
    return traverse_util.unflatten_dict(flat)
