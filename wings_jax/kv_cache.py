"""Static-size key/value caches for incremental decoding (``WingsModel`` modes 'prefill' and 'decode').

Every attention that decodes incrementally (the main attention, the textual learner, the visual
learner) keeps its keys and values, after projection and RoPE, in the Flax ``cache`` collection of
its own module. Slot ``j`` of the main cache holds sequence position ``j`` (prompts are right-padded
and positions run 0..len-1, so slot and position agree); the textual learner's holds only its keys
(text past the system prompt), packed in order, so that it skips the image tokens' slots (729 of a
1024-token prompt with one image); the visual cache holds the image features in their batch order,
fixed after the prefill. Which slots are keys, and at which positions, is carried beside the caches
in ``DecodeState``, so the masks are plain ``MaskSpec`` over cache slots.

Both the prefill and a decode step apply the model with ``cache`` mutable: each attention first writes
its new keys/values at their slots, then attends over the whole cache. A decode step (one query) does
so with ``decode_attention``, which reads the cache where it lies. Written before it is read, the cache
needs no copy: with the cache donated (or carried by a loop) the one-token write happens in place. Two
things would undo that, and ``wings_jax.generate`` avoids both by decoding with unrolled layers over
per-layer parameter and cache buffers (``unstack_layers``): a layer scan slices every layer's weights
and caches into fresh buffers and stacks its cache outputs into new ones; and reading the old cache
after a write forces XLA to copy it first.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wings_jax.attention import MaskSpec, _masked_softmax, _routed, attention

CACHE = "cache"


class DecodeState(NamedTuple):
    """Per-row bookkeeping of a decoding batch (the same for every layer)."""

    lengths: jnp.ndarray  # (B,) int32: tokens in the cache, i.e. the slot (= position) of the next token
    kv_valid: jnp.ndarray  # (B, T) bool: filled slots of the main attention cache
    text_index: jnp.ndarray  # (B, Tt) int32: sequence position of each textual learner cache slot
    text_valid: jnp.ndarray  # (B, Tt) bool: textual learner cache slots that hold a key
    text_length: jnp.ndarray  # (B,) int32: textual keys in the cache, i.e. the slot of the next one
    visual_index: jnp.ndarray | None = None  # (B, F) int: sequence index of each visual cache slot
    visual_valid: jnp.ndarray | None = None  # (B, F) bool: visual cache slots that hold an image token


def attend_with_cache(
    module: nn.Module, q: jnp.ndarray, k: jnp.ndarray | None, v: jnp.ndarray | None, slots: jnp.ndarray | None,
    mask: MaskSpec, extra_values: jnp.ndarray | None = None, backend: str = "xla",
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """``attention`` of q (B, Lq, H, hd) over ``module``'s cached keys (B * heads, T, hd) and values
    (B * heads, hd, T), after writing the new keys/values k, v (B, S, heads, hd) at cache ``slots`` (B, S);
    ``mask`` and ``extra_values`` cover the T cache slots. The first write creates the cache as zeros,
    with as many slots as ``mask`` has keys. ``k = v = None`` attends over the cache as it is (keys fixed
    after the prefill, e.g. the image's); entries for slots past the cache are dropped.

    One query (a decode step): ``decode_attention`` over the cache where it lies. More (the prefill): the
    ``backend`` kernel over the cache transposed to its (B, T, heads, hd) layout.
    """
    if k is not None:
        if not module.is_mutable_collection(CACHE):
            raise ValueError(f"{module.name}: writing keys/values needs the '{CACHE}' collection mutable")
        batch, _, heads, head_dim = k.shape
        size = mask.kv_index.shape[1]
        key = module.variable(CACHE, "key", jnp.zeros, (batch * heads, size, head_dim), k.dtype)
        value = module.variable(CACHE, "value", jnp.zeros, (batch * heads, head_dim, size), v.dtype)
        key.value, value.value = _write(key.value, value.value, k, v, slots)
        cache_k, cache_v = key.value, value.value
    elif module.has_variable(CACHE, "key"):
        cache_k, cache_v = module.get_variable(CACHE, "key"), module.get_variable(CACHE, "value")
    else:
        raise ValueError(f"{module.name}: no cached keys to read; run the prefill first")
    if q.shape[1] == 1:
        return decode_attention(q, cache_k, cache_v, mask, extra_values)
    batch = q.shape[0]
    keys = cache_k.reshape(batch, -1, *cache_k.shape[1:]).transpose(0, 2, 1, 3)
    values = cache_v.reshape(batch, -1, *cache_v.shape[1:]).transpose(0, 3, 1, 2)
    return attention(q, keys, values, mask, extra_values, backend)


def _write(cache_k, cache_v, k, v, slots):
    """The caches (B * heads, T, hd) and (B * heads, hd, T) with k, v (B, S, heads, hd) at ``slots`` (B, S);
    entries for slots past the cache are dropped."""
    batch, length, heads, head_dim = k.shape
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    if length == 1:
        # A decode step: one (heads, hd) entry per row, scattered into the flat caches as they are (through a
        # (B, heads, ...) view, XLA copied the whole cache where the written view met the products)
        rows = (jnp.arange(batch)[:, None] * heads + jnp.arange(heads)).reshape(-1)
        columns = jnp.repeat(slots[:, 0], heads)
        return (cache_k.at[rows, columns].set(k.reshape(-1, head_dim), mode="drop"),
                cache_v.at[rows, :, columns].set(v.reshape(-1, head_dim), mode="drop"))
    rows = jnp.arange(batch)[:, None]
    # indices split by slices put their (B, S) axes first: the written entries are (B, S, heads, hd)
    cache_k = cache_k.reshape(batch, heads, *cache_k.shape[1:]).at[rows, :, slots].set(k, mode="drop")
    cache_v = cache_v.reshape(batch, heads, *cache_v.shape[1:]).at[rows, :, :, slots].set(v, mode="drop")
    return cache_k.reshape(batch * heads, *cache_k.shape[2:]), cache_v.reshape(batch * heads, *cache_v.shape[2:])


def decode_attention(q, cache_k, cache_v, mask: MaskSpec, extra_values=None):
    """The reference attention kernel for few queries over a cache: q (B, Lq, H, hd), keys (B * KV, T, hd),
    values (B * KV, hd, T) with H a multiple of KV; the results of ``attention``.

    Measured on CPU, XLA multiplies these layouts as they lie, as matrix-vector products at memory speed
    (the cache is the matrix, its summed axis minor); laid out (B, KV, ...) or in another order, XLA
    copies the whole cache at every step, to transpose it or where a reshape of the just-written cache
    meets the product. The query heads that share a key/value head (GQA) take one product each: all of
    them at once make a matrix product with ``group`` rows, which XLA:CPU ran 2-3x slower per byte than
    a matrix-vector product, slower than reading the cache once per head.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = cache_k.shape[0] // batch
    group = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(3, 0, 2, 1, 4)
    q = q.reshape(group, batch * kv_heads, q_len, head_dim)
    scale = jnp.sqrt(head_dim).astype(q.dtype)
    scores = jnp.stack([jnp.einsum("nqd,nsd->nqs", q[g], cache_k) / scale for g in range(group)], axis=1)
    probs = _masked_softmax(scores.reshape(batch, kv_heads, group, q_len, -1), mask)
    flat = probs.reshape(scores.shape).astype(cache_v.dtype)  # (B * KV, group, Lq, T)
    out = jnp.stack([jnp.einsum("nqs,nds->nqd", flat[:, g], cache_v) for g in range(group)], axis=1)
    out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, head_dim), _routed(probs, extra_values)


def unstack_layers(tree: dict, num_layers: int) -> dict:
    """A ``params`` or ``cache`` tree of scanned layers (``decoder/layers`` stacked on a leading axis) as
    the tree of unrolled ones (``decoder/layers_0`` ...), each layer's arrays their own buffers; a tree
    without stacked layers is returned as it is."""
    decoder = dict(tree["decoder"])
    if "layers" not in decoder:
        return tree
    stacked = decoder.pop("layers")
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**tree, "decoder": decoder}
