"""The attention kernel shared by the decoder and the Wings learners, behind a backend switch.

Masks are described, not materialised by callers: a key j is visible to a query i when
``kv_valid[j]`` and, for causal masks, ``kv_index[j] <= q_index[i]``. A query with no visible key
gets a zero output. ``extra_values`` are value channels shared by every head, e.g. the router's
position weights or MLLM-Laws segment indicators: their attention-weighted sums, added over heads,
come back without the (batch, heads, L, L) probabilities leaving the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from wings_jax.config import ATTENTION_BACKENDS


@struct.dataclass
class MaskSpec:
    q_index: jnp.ndarray  # (B, Lq) int
    kv_index: jnp.ndarray  # (B, Lk) int
    kv_valid: jnp.ndarray  # (B, Lk) bool
    causal: bool = struct.field(pytree_node=False, default=True)


# ``auto`` picks the blockwise kernel once queries and keys both reach this length; below it (decode
# steps with one query, tiny models) the reference is cheapest. Measured on CPU (fwd + bwd, causal,
# 8 heads of 64): flash vs xla 1.7 vs 2.3 ms at L=128, 5.3 vs 12 ms at 256, 18 vs 66 ms at 512.
AUTO_FLASH_MIN_LENGTH = 128
# Tile edge of the blockwise kernel by platform. On CPU, 64 measured fastest (fwd + bwd of a causal
# L=1024 and L=4096 attention: 64 beat 32, 128, 256 and 512 by 1.1-4.7x): small tiles stay in cache
# and skip more of the causal mask. Elsewhere (untuned) larger tiles keep the loop short.
FLASH_BLOCKS = {"cpu": 64}
FLASH_BLOCK_DEFAULT = 512
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without inf - inf = nan


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: MaskSpec,
    extra_values: jnp.ndarray | None = None,
    backend: str = "xla",
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Scaled dot-product attention with grouped key/value heads.

    q (B, Lq, H, hd); k, v (B, Lk, KV, hd) with H a multiple of KV; extra_values (B, Lk, C).
    Returns the output (B, Lq, H, hd) and, with extra_values, their weighted sums over keys added
    over heads (B, Lq, C) in float32.

    Backends: ``xla`` (reference: materialises the (B, H, Lq, Lk) probabilities), ``flash``
    (blockwise, memory linear in the length, blockwise backward too), ``cudnn`` (GPU, bf16/fp16
    only), ``auto`` (chosen by ``resolve_backend``).
    """
    backend = resolve_backend(backend, q.dtype, q.shape[1], k.shape[1])
    if backend == "xla":
        return _xla_attention(q, k, v, mask, extra_values)
    if backend == "flash":
        return flash_attention(q, k, v, mask, extra_values)
    return dot_product_attention(q, k, v, mask, extra_values, implementation="cudnn")


def resolve_backend(backend: str, dtype, q_len: int, kv_len: int, platform: str | None = None) -> str:
    """The concrete backend for ``backend`` ('auto' picks by ``platform``, default ``jax.default_backend()``)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if min(q_len, kv_len) < AUTO_FLASH_MIN_LENGTH:
        return "xla"
    return "flash"


def visibility(mask: MaskSpec) -> jnp.ndarray:
    """The (B, Lq, Lk) boolean visibility that ``mask`` describes."""
    visible = jnp.broadcast_to(mask.kv_valid[:, None, :], (mask.kv_valid.shape[0], mask.q_index.shape[1],
                                                           mask.kv_valid.shape[1]))
    if mask.causal:
        visible = visible & (mask.kv_index[:, None, :] <= mask.q_index[:, :, None])
    return visible


def _xla_attention(q, k, v, mask, extra_values):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    probs = _masked_softmax(jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(head_dim).astype(q.dtype), mask)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(batch, q_len, heads, head_dim)
    return out, _routed(probs, extra_values)


def _masked_softmax(scores, mask: MaskSpec):
    """float32 probabilities (B, KV, G, Lq, Lk) from scaled scores; zero for a query that sees no key."""
    visible = visibility(mask)[:, None, None]  # (B, 1, 1, Lq, Lk)
    scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)


def _routed(probs, extra_values):
    """The extra value channels' attention-weighted sums, added over heads (B, Lq, C), or None."""
    if extra_values is None:
        return None
    return jnp.einsum("bkgqs,bsc->bqc", probs, extra_values.astype(jnp.float32))


def cached_attention(q, cache_k, cache_v, k, v, mask: MaskSpec, extra_values=None):
    """Attention of a decode step (the reference kernel): queries q (B, Lq, H, hd) over cached keys
    (B, KV, hd, T) and values (B, KV, T, hd) followed by the step's own S keys/values k, v (B, S, KV, hd),
    or over the cache alone (k = v = None). ``mask`` and ``extra_values`` (B, T [+ S], C) cover the cache
    then the new keys.

    The cache is never concatenated with the new keys (that would copy it at every layer and step), only
    the small (Lq, T + S) scores. In these layouts both products read the cache as it lies; any other
    makes XLA transpose the cache first (measured on CPU: the transposes cost more than the products).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads, cached = cache_k.shape[1], cache_k.shape[3]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bkds->bkgqs", q, cache_k)
    if k is not None:
        scores = jnp.concatenate([scores, jnp.einsum("bqkgd,bskd->bkgqs", q, k)], axis=-1)
    probs = _masked_softmax(scores / jnp.sqrt(head_dim).astype(q.dtype), mask)
    out = jnp.einsum("bkgqs,bksd->bqkgd", probs[..., :cached].astype(cache_v.dtype), cache_v)
    if v is not None:
        out = out + jnp.einsum("bkgqs,bskd->bqkgd", probs[..., cached:].astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, head_dim), _routed(probs, extra_values)


def dot_product_attention(q, k, v, mask: MaskSpec, extra_values, implementation: str):
    """``jax.nn.dot_product_attention`` (``implementation`` 'cudnn' on GPU; 'xla' runs anywhere).

    The kernel returns no probabilities, so the shared value channels take a second pass with
    ``extra_values`` as the values of every key/value head, zero-padded to the head width the
    kernel demands; summing its first C channels over heads gives the routed sums.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads, channels = k.shape[2], 0 if extra_values is None else extra_values.shape[-1]
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use 'flash' or 'xla' for float32")
    if channels > head_dim:
        raise ValueError(f"{channels} extra value channels do not fit the head width {head_dim}")
    visible = visibility(mask)
    run = functools.partial(jax.nn.dot_product_attention, mask=visible[:, None], implementation=implementation)
    has_key = visible.any(axis=-1)[:, :, None, None]  # a query with no visible key gets zeros
    out = jnp.where(has_key, run(q, k, v), 0.0).astype(q.dtype)
    if extra_values is None:
        return out, None
    padded = jnp.pad(extra_values, ((0, 0), (0, 0), (0, head_dim - channels))).astype(v.dtype)
    routed = jnp.where(has_key, run(q, k, jnp.broadcast_to(padded[:, :, None], (batch, k.shape[1], kv_heads,
                                                                                    head_dim))), 0.0)
    return out, routed[..., :channels].astype(jnp.float32).sum(axis=2)


def flash_attention(q, k, v, mask: MaskSpec, extra_values=None, block_q: int | None = None,
                    block_k: int | None = None):
    """Blockwise attention with an online softmax (same contract as ``attention``); blocks default to
    ``FLASH_BLOCKS`` for the platform.

    Query and key blocks that the mask hides entirely are skipped, forward and backward; nothing
    of size (Lq, Lk) is ever held, only (block_q, block_k) tiles. The backward pass recomputes the
    tiles from the saved log-sum-exp instead of storing probabilities.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    extra = jnp.zeros((batch, kv_len, 0), jnp.float32) if extra_values is None else extra_values
    default = FLASH_BLOCKS.get(jax.default_backend(), FLASH_BLOCK_DEFAULT)
    block_q, block_k = min(block_q or default, q_len), min(block_k or default, kv_len)
    pad_q, pad_k = -q_len % block_q, -kv_len % block_k
    qt = _pad_axis(q, 1, pad_q).reshape(batch, q_len + pad_q, kv_heads, heads // kv_heads, head_dim)
    qt = qt.transpose(0, 2, 3, 1, 4)  # (B, KV, G, Lq, hd)
    kt, vt = (_pad_axis(x, 1, pad_k).transpose(0, 2, 1, 3) for x in (k, v))  # (B, KV, Lk, hd)
    tiles = _Tiles(
        q_index=_pad_axis(mask.q_index, 1, pad_q), kv_index=_pad_axis(mask.kv_index, 1, pad_k),
        kv_valid=_pad_axis(mask.kv_valid, 1, pad_k), causal=mask.causal, block_q=block_q, block_k=block_k,
    )
    out, routed = _flash(qt, kt, vt, _pad_axis(extra, 1, pad_k), tiles)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len + pad_q, heads, head_dim)[:, :q_len]
    return out, None if extra_values is None else routed[:, :q_len]


def _pad_axis(x, axis, amount):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, amount)
    return jnp.pad(x, widths)


@struct.dataclass
class _Tiles:
    """The mask, padded to whole blocks, and the block sizes."""

    q_index: jnp.ndarray  # (B, Lq)
    kv_index: jnp.ndarray  # (B, Lk)
    kv_valid: jnp.ndarray  # (B, Lk)
    causal: bool = struct.field(pytree_node=False)
    block_q: int = struct.field(pytree_node=False)
    block_k: int = struct.field(pytree_node=False)

    def counts(self) -> tuple[int, int]:
        return self.q_index.shape[1] // self.block_q, self.kv_index.shape[1] // self.block_k

    def live(self) -> jnp.ndarray:
        """(n_q_blocks, n_k_blocks) bool: does any query of the block see any key of the block (any row)?"""
        n_q, n_k = self.counts()
        valid = self.kv_valid.reshape(-1, n_k, self.block_k)
        if not self.causal:
            return jnp.broadcast_to(valid.any(axis=(0, 2))[None], (n_q, n_k))
        big = jnp.iinfo(self.kv_index.dtype).max
        first_key = jnp.where(valid, self.kv_index.reshape(valid.shape), big).min(axis=2)  # (B, n_k)
        last_query = self.q_index.reshape(-1, n_q, self.block_q).max(axis=2)  # (B, n_q)
        return (first_key[:, None, :] <= last_query[:, :, None]).any(axis=0)

    def visible(self, i, j) -> jnp.ndarray:
        """(B, 1, 1, block_q, block_k) visibility of query block i to key block j."""
        q_index = jax.lax.dynamic_slice_in_dim(self.q_index, i * self.block_q, self.block_q, axis=1)
        kv_index = jax.lax.dynamic_slice_in_dim(self.kv_index, j * self.block_k, self.block_k, axis=1)
        kv_valid = jax.lax.dynamic_slice_in_dim(self.kv_valid, j * self.block_k, self.block_k, axis=1)
        seen = jnp.broadcast_to(kv_valid[:, None, :], (kv_valid.shape[0], self.block_q, self.block_k))
        if self.causal:
            seen = seen & (kv_index[:, None, :] <= q_index[:, :, None])
        return seen[:, None, None]


def _block(x, index, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _tile_scores(q_blk, k_blk, visible):
    """Scaled scores of one tile in float32, hidden entries set to a huge negative number."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_blk.shape[-1]))
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible, scores, _NEG)
    return scores


@jax.custom_vjp
def _flash(qt, kt, vt, extra, tiles: _Tiles):
    return _flash_forward(qt, kt, vt, extra, tiles)[0]


def _flash_forward(qt, kt, vt, extra, tiles: _Tiles):
    """qt (B, KV, G, Lq, hd), kt/vt (B, KV, Lk, hd), extra (B, Lk, C) -> (out like qt, routed (B, Lq, C) f32),
    and the residuals: per-head routed sums and the log-sum-exp (B, KV, G, Lq)."""
    n_q, n_k = tiles.counts()
    live = tiles.live()
    bq, bk = tiles.block_q, tiles.block_k

    def query_block(i):
        q_blk = _block(qt, i, bq, 3)
        shape = q_blk.shape[:-1]

        def key_block(j, carry):
            def update(carry):
                row_max, denom, acc, acc_extra = carry
                visible = tiles.visible(i, j)
                scores = _tile_scores(q_blk, _block(kt, j, bk, 2), visible)
                new_max = jnp.maximum(row_max, scores.max(axis=-1))
                probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(row_max - new_max)
                denom = rescale * denom + probs.sum(axis=-1)
                acc = rescale[..., None] * acc + jnp.einsum(
                    "bkgqs,bksd->bkgqd", probs.astype(vt.dtype), _block(vt, j, bk, 2),
                    preferred_element_type=jnp.float32)
                acc_extra = rescale[..., None] * acc_extra + jnp.einsum(
                    "bkgqs,bsc->bkgqc", probs, _block(extra, j, bk, 1).astype(jnp.float32))
                return new_max, denom, acc, acc_extra

            return jax.lax.cond(live[i, j], update, lambda c: c, carry)

        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, qt.shape[-1]), jnp.float32), jnp.zeros((*shape, extra.shape[-1]), jnp.float32))
        row_max, denom, acc, acc_extra = _while(n_k, key_block, init)
        seen = denom > 0
        inverse = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)[..., None]
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        return (acc * inverse).astype(qt.dtype), acc_extra * inverse, lse

    def store(i, outputs):
        return tuple(jax.lax.dynamic_update_slice_in_dim(full, part, i * bq, axis=3)
                     for full, part in zip(outputs, query_block(i), strict=True))

    rows = qt.shape[:-1]
    outputs = (jnp.zeros(qt.shape, qt.dtype), jnp.zeros((*rows, extra.shape[-1]), jnp.float32),
               jnp.zeros(rows, jnp.float32))
    out, per_head_extra, lse = _while(n_q, store, outputs)
    routed = per_head_extra.sum(axis=(1, 2))  # (B, Lq, C)
    return (out, routed), (qt, kt, vt, extra, tiles, out, per_head_extra, lse)


def _while(count: int, body, init):
    """``fori_loop(0, count, body, init)`` as a while loop. The forward pass must not be a scan: inside an
    outer scan that is differentiated (the scanned layers), JAX would linearise a scan here and keep every
    tile's probabilities as residuals, undoing the point of the kernel; a while loop it only evaluates."""
    return jax.lax.while_loop(lambda carry: carry[0] < count, lambda carry: (carry[0] + 1, body(*carry)),
                              (jnp.int32(0), init))[1]


def _unblock(x, axis):
    """Per-block results stacked on a leading axis -> the blocks joined along ``axis`` of one result."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _flash_fwd(qt, kt, vt, extra, tiles):
    return _flash_forward(qt, kt, vt, extra, tiles)


def _flash_bwd(residuals, cotangents):
    qt, kt, vt, extra, tiles, out, per_head_extra, lse = residuals
    d_out, d_routed = cotangents  # (B, KV, G, Lq, hd), (B, Lq, C)
    d_out = d_out.astype(jnp.float32)
    d_routed = d_routed.astype(jnp.float32)
    # softmax backward: dS = P * (dP - rowsum(dO_all * O_all)) with the routed channels as extra values
    delta = (d_out * out.astype(jnp.float32)).sum(-1) + jnp.einsum("bkgqc,bqc->bkgq", per_head_extra, d_routed)
    n_q, n_k = tiles.counts()
    live = tiles.live()
    bq, bk = tiles.block_q, tiles.block_k
    scale = 1.0 / jnp.sqrt(jnp.float32(qt.shape[-1]))

    def key_block(d_q, j):
        k_blk, v_blk, e_blk = _block(kt, j, bk, 2), _block(vt, j, bk, 2), _block(extra, j, bk, 1)
        e_blk = e_blk.astype(jnp.float32)

        def query_block(i, carry):
            def update(carry):
                d_q, d_k, d_v, d_e = carry
                q_blk, do_blk, dr_blk = _block(qt, i, bq, 3), _block(d_out, i, bq, 3), _block(d_routed, i, bq, 1)
                visible = tiles.visible(i, j)
                scores = _tile_scores(q_blk, k_blk, visible)
                probs = jnp.where(visible, jnp.exp(scores - _block(lse, i, bq, 3)[..., None]), 0.0)
                d_v = d_v + jnp.einsum("bkgqs,bkgqd->bksd", probs, do_blk)
                d_e = d_e + jnp.einsum("bkgqs,bqc->bsc", probs, dr_blk)
                d_probs = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk.astype(jnp.float32))
                d_probs = d_probs + jnp.einsum("bqc,bsc->bqs", dr_blk, e_blk)[:, None, None]
                d_scores = probs * (d_probs - _block(delta, i, bq, 3)[..., None]) * scale
                d_q_blk = _block(d_q, i, bq, 3) + jnp.einsum("bkgqs,bksd->bkgqd", d_scores, k_blk,
                                                              preferred_element_type=jnp.float32)
                d_q = jax.lax.dynamic_update_slice_in_dim(d_q, d_q_blk, i * bq, axis=3)
                d_k = d_k + jnp.einsum("bkgqs,bkgqd->bksd", d_scores, q_blk, preferred_element_type=jnp.float32)
                return d_q, d_k, d_v, d_e

            return jax.lax.cond(live[i, j], update, lambda c: c, carry)

        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        init = (d_q, zeros, zeros, jnp.zeros(e_blk.shape, jnp.float32))
        d_q, d_k, d_v, d_e = jax.lax.fori_loop(0, n_q, query_block, init)
        return d_q, (d_k, d_v, d_e)

    d_q, (d_k, d_v, d_e) = jax.lax.scan(key_block, jnp.zeros(qt.shape, jnp.float32), jnp.arange(n_k))
    d_k, d_v, d_e = _unblock(d_k, 2), _unblock(d_v, 2), _unblock(d_e, 1)
    return d_q.astype(qt.dtype), d_k.astype(kt.dtype), d_v.astype(vt.dtype), d_e.astype(extra.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
