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

from wings_jax import cpu_attention
from wings_jax.config import ATTENTION_BACKENDS
from wings_jax.cpu_attention import cpu_flash_attention


@struct.dataclass
class MaskSpec:
    q_index: jnp.ndarray  # (B, Lq) int
    kv_index: jnp.ndarray  # (B, Lk) int
    kv_valid: jnp.ndarray  # (B, Lk) bool
    causal: bool = struct.field(pytree_node=False, default=True)


# ``auto`` picks the blockwise kernel once queries and keys both reach this length; below it (decode
# steps with one query, tiny models) the reference is cheapest. Measured on CPU (fwd + bwd, causal,
# 8 heads of 64 over 4 key/value heads, 2 router channels; re-measured after the keys-first backward):
# flash vs xla 0.56-0.61 vs 0.47 ms at L=64, 1.2 vs 1.3-1.5 ms at 96, 1.7 vs 1.9-3.0 ms at 128,
# 4.1-4.3 vs 5.3-5.7 ms at 256, 11 vs 17 ms at 512.
AUTO_FLASH_MIN_LENGTH = 128
# Tiles of the blockwise kernel, (query rows, keys), by platform and by whether the mask is causal; a
# row is one query of one head, and the query heads sharing a key/value head share a tile, so a query
# block holds rows // (heads per key/value head) queries. On CPU, measured fwd + bwd at L = 1024:
# causal, 512 x 256 beat 256 x 256, 1024 x 256 and 512 x 512 by 10-30 % (large enough products for the
# matmul kernels, small enough tiles to skip most of the causal mask); without a causal mask there is
# nothing to skip and fewer, longer key blocks save loop overhead (1024 x 729: 62 ms at 256 x 256,
# 43 at 256 x 1024). On an H100 every tile is a handful of kernel launches, so the largest tiles win:
# 2048 x 1024 against 1024 x 512, fwd + bwd, main attention 0.40 vs 0.75 ms at L = 1024 and 4.0 vs
# 6.9 ms at 4096, the visual learner 0.32 vs 0.61 ms (bench_small's shapes, float32; bfloat16 alike).
# Elsewhere (untuned) large tiles keep the loop short.
FLASH_TILES = {("cpu", True): (512, 256), ("cpu", False): (256, 1024), ("gpu", True): (2048, 1024),
               ("gpu", False): (2048, 1024)}
FLASH_TILE_DEFAULT = (1024, 512)
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without inf - inf = nan
# Where the blockwise kernel's running row maximum starts. Any real score lies far above it, so a row
# that has seen a key has its true maximum, and a hidden entry's exp(_NEG - m) is exactly 0 even in a
# row that has seen nothing yet (m = _FLOOR). That spares a second select over every tile.
_FLOOR = -1e20


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
    only), ``splash`` (Pallas TPU kernels, interpreted off TPU: ``pallas_attention``), ``auto``
    (chosen by ``resolve_backend``).
    """
    backend = resolve_backend(backend, q.dtype, q.shape[1], k.shape[1])
    if backend == "xla":
        return _xla_attention(q, k, v, mask, extra_values)
    if backend == "flash":
        return flash_attention(q, k, v, mask, extra_values)
    if backend == "cpu_flash":
        return cpu_flash_attention(q, k, v, mask, extra_values)
    if backend == "splash":
        from wings_jax.pallas_attention import splash_attention  # imported here: it imports this module

        return splash_attention(q, k, v, mask, extra_values)
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
    if platform == "cpu" and cpu_attention.usable(dtype):
        return "cpu_flash"
    return "splash" if platform == "tpu" else "flash"


def visibility(mask: MaskSpec) -> jnp.ndarray:
    """The (B, Lq, Lk) boolean visibility that ``mask`` describes."""
    visible = jnp.broadcast_to(mask.kv_valid[:, None, :], (mask.kv_valid.shape[0], mask.q_index.shape[1],
                                                           mask.kv_valid.shape[1]))
    if mask.causal:
        visible = visible & (mask.kv_index[:, None, :] <= mask.q_index[:, :, None])
    return visible


def _xla_attention(q, k, v, mask, extra_values):
    """The reference: materialised probabilities, in the layout of the blockwise kernel (query heads of a
    group folded into rows, extra channels riding in the values), whose products XLA runs as batched
    matmuls (the (B, Lq, KV, G) layout cost 4x on CPU, in transposes and channel reductions)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, kv_heads, group * q_len, head_dim)
    kt, vt = k.transpose(0, 2, 1, 3), _ride_along(v.transpose(0, 2, 1, 3), extra_values)
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, kt, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, group, q_len, -1) / jnp.sqrt(jnp.float32(head_dim))
    probs = _masked_softmax(scores, mask).reshape(batch, kv_heads, group * q_len, -1)
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return _split_rows(out.reshape(batch, kv_heads, group, q_len, -1), head_dim, q.dtype, group_axis=2)


def _ride_along(vt, extra_values):
    """Values (B, KV, Lk, hd) with the extra channels (B, Lk, C) appended to every head, in the values' dtype."""
    if extra_values is None:
        return vt
    channels = jnp.broadcast_to(extra_values[:, None].astype(vt.dtype), (*vt.shape[:3], extra_values.shape[-1]))
    return jnp.concatenate([vt, channels], axis=-1)


def _split_rows(out, head_dim: int, dtype, group_axis: int):
    """(B, KV, ..., hd + C) outputs with the group and query axes among ``...`` -> the attention output
    (B, Lq, H, hd) and the extra channels summed over heads (B, Lq, C) float32, or None without channels."""
    query_axis = 3 if group_axis == 2 else 2
    attended = jnp.moveaxis(out[..., :head_dim], (query_axis, 1, group_axis), (1, 2, 3))
    attended = attended.reshape(*attended.shape[:2], -1, head_dim).astype(dtype)
    if out.shape[-1] == head_dim:
        return attended, None
    return attended, out[..., head_dim:].astype(jnp.float32).sum(axis=(1, group_axis))


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


def dot_product_attention(q, k, v, mask: MaskSpec, extra_values, implementation: str):
    """``jax.nn.dot_product_attention`` (``implementation`` 'cudnn' on GPU; 'xla' runs anywhere).

    The kernel returns no probabilities, so the shared value channels take a second pass with
    ``extra_values`` as the values of every key/value head, zero-padded to the head width the
    kernel demands; summing its first C channels over heads gives the routed sums. cuDNN's kernel
    differentiates a masked attention only over even lengths (the visual learner's 729 image keys
    are not), so an odd query axis gains a row that is dropped and an odd key axis a key nobody sees.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads, channels = k.shape[2], 0 if extra_values is None else extra_values.shape[-1]
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use 'flash' or 'xla' for float32")
    if channels > head_dim:
        raise ValueError(f"{channels} extra value channels do not fit the head width {head_dim}")
    pad_q, pad_k = q_len % 2, k.shape[1] % 2
    q, k, v = _pad_axis(q, 1, pad_q), _pad_axis(k, 1, pad_k), _pad_axis(v, 1, pad_k)
    visible = _pad_axis(_pad_axis(visibility(mask), 1, pad_q), 2, pad_k)  # padding is False: hidden
    run = functools.partial(jax.nn.dot_product_attention, mask=visible[:, None], implementation=implementation)
    has_key = visible.any(axis=-1)[:, :, None, None]  # a query with no visible key gets zeros
    out = jnp.where(has_key, run(q, k, v), 0.0).astype(q.dtype)[:, :q_len]
    if extra_values is None:
        return out, None
    padded = jnp.pad(extra_values, ((0, 0), (0, pad_k), (0, head_dim - channels))).astype(v.dtype)
    routed = jnp.where(has_key, run(q, k, jnp.broadcast_to(padded[:, :, None], (batch, k.shape[1], kv_heads,
                                                                                    head_dim))), 0.0)
    return out, routed[:, :q_len, :, :channels].astype(jnp.float32).sum(axis=2)


def flash_attention(q, k, v, mask: MaskSpec, extra_values=None, block_q: int | None = None,
                    block_k: int | None = None):
    """Blockwise attention with an online softmax (same contract as ``attention``); blocks default to
    ``FLASH_TILES`` for the platform.

    Query and key blocks that the mask hides entirely are skipped, forward and backward; nothing
    of size (Lq, Lk) is ever held, only (block_q, block_k) tiles. The backward pass recomputes the
    tiles from the saved log-sum-exp instead of storing probabilities.

    Layout: the G query heads that share a key/value head are folded into the query rows
    (B, KV, Lq * G, hd), and the extra value channels ride in each value head (B, KV, Lk, hd + C), so
    that every tile product, forward and backward, is one batched matmul. Any other layout left XLA:CPU
    transposing tiles and turning the channel sums into slow reductions (2x slower at L = 1024).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    tile_rows, tile_keys = FLASH_TILES.get((jax.default_backend(), mask.causal), FLASH_TILE_DEFAULT)
    block_q = min(block_q or max(1, tile_rows // group), q_len)
    block_k = min(block_k or tile_keys, kv_len)
    pad_q, pad_k = -q_len % block_q, -kv_len % block_k
    rows = _pad_axis(q, 1, pad_q).reshape(batch, q_len + pad_q, kv_heads, group, head_dim)
    rows = rows.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, (q_len + pad_q) * group, head_dim)
    kt, vt = (_pad_axis(x, 1, pad_k).transpose(0, 2, 1, 3) for x in (k, v))  # (B, KV, Lk, hd)
    vt = _ride_along(vt, None if extra_values is None else _pad_axis(extra_values, 1, pad_k))
    tiles = _Tiles(
        q_index=_pad_axis(mask.q_index, 1, pad_q), kv_index=_pad_axis(mask.kv_index, 1, pad_k),
        kv_valid=_pad_axis(mask.kv_valid, 1, pad_k), causal=mask.causal, block_q=block_q, block_k=block_k,
        group=group,
    )
    out = _flash(rows, kt, vt, tiles)  # (B, KV, Lq * G, hd + C)
    out = out.reshape(batch, kv_heads, q_len + pad_q, group, vt.shape[-1])[:, :, :q_len]
    return _split_rows(out, head_dim, q.dtype, group_axis=3)


def _pad_axis(x, axis, amount):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, amount)
    return jnp.pad(x, widths)


@struct.dataclass
class _Tiles:
    """The mask, padded to whole blocks, the block sizes, and the query heads folded into each row block."""

    q_index: jnp.ndarray  # (B, Lq)
    kv_index: jnp.ndarray  # (B, Lk)
    kv_valid: jnp.ndarray  # (B, Lk)
    causal: bool = struct.field(pytree_node=False)
    block_q: int = struct.field(pytree_node=False)
    block_k: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)

    @property
    def block_rows(self) -> int:
        return self.block_q * self.group

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
        """(B, 1, block_q * group, block_k) visibility of query block i's rows to key block j."""
        q_index = jax.lax.dynamic_slice_in_dim(self.q_index, i * self.block_q, self.block_q, axis=1)
        kv_index = jax.lax.dynamic_slice_in_dim(self.kv_index, j * self.block_k, self.block_k, axis=1)
        kv_valid = jax.lax.dynamic_slice_in_dim(self.kv_valid, j * self.block_k, self.block_k, axis=1)
        seen = jnp.broadcast_to(kv_valid[:, None, :], (kv_valid.shape[0], self.block_q, self.block_k))
        if self.causal:
            seen = seen & (kv_index[:, None, :] <= q_index[:, :, None])
        seen = jnp.broadcast_to(seen[:, :, None], (seen.shape[0], self.block_q, self.group, self.block_k))
        return seen.reshape(seen.shape[0], 1, self.block_rows, self.block_k)


def _block(x, index, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _tile_scores(a, b, visible, spec="bkrd,bksd->bkrs"):
    """Scaled scores of one tile in float32, hidden entries set to a huge negative number; ``spec`` says
    which of ``a`` and ``b`` holds the query rows (rows first by default, keys first in the backward)."""
    scale = 1.0 / jnp.sqrt(jnp.float32(a.shape[-1]))
    scores = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) * scale
    return jnp.where(visible, scores, _NEG)


@jax.custom_vjp
def _flash(rows, kt, vt, tiles: _Tiles):
    return _flash_forward(rows, kt, vt, tiles)[0]


def _flash_forward(rows, kt, vt, tiles: _Tiles):
    """rows (B, KV, Lq * G, hd), kt (B, KV, Lk, hd), vt (B, KV, Lk, hd + C) -> out (B, KV, Lq * G, hd + C)
    in the rows' dtype, and the residuals with the log-sum-exp (B, KV, Lq * G)."""
    n_q, n_k = tiles.counts()
    live = tiles.live()
    r, bk = tiles.block_rows, tiles.block_k

    def query_block(i):
        q_blk = _block(rows, i, r, 2)
        shape = q_blk.shape[:-1]

        def key_block(j, carry):
            def update(carry):
                row_max, denom, acc = carry
                visible = tiles.visible(i, j)
                scores = _tile_scores(q_blk, _block(kt, j, bk, 2), visible)
                new_max = jnp.maximum(row_max, scores.max(axis=-1))
                probs = jnp.exp(scores - new_max[..., None])  # 0 where hidden (see _FLOOR)
                rescale = jnp.exp(row_max - new_max)
                denom = rescale * denom + probs.sum(axis=-1)
                acc = rescale[..., None] * acc + jnp.einsum(
                    "bkrs,bksd->bkrd", probs.astype(vt.dtype), _block(vt, j, bk, 2),
                    preferred_element_type=jnp.float32)
                return new_max, denom, acc

            return jax.lax.cond(live[i, j], update, lambda c: c, carry)

        init = (jnp.full(shape, _FLOOR, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, vt.shape[-1]), jnp.float32))
        row_max, denom, acc = _while(n_k, key_block, init)
        seen = denom > 0
        inverse = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)[..., None]
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        return (acc * inverse).astype(rows.dtype), lse

    def store(i, outputs):
        return tuple(jax.lax.dynamic_update_slice_in_dim(full, part, i * r, axis=2)
                     for full, part in zip(outputs, query_block(i), strict=True))

    outputs = (jnp.zeros((*rows.shape[:-1], vt.shape[-1]), rows.dtype), jnp.zeros(rows.shape[:-1], jnp.float32))
    out, lse = _while(n_q, store, outputs)
    return out, (rows, kt, vt, tiles, out, lse)


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


def _flash_fwd(rows, kt, vt, tiles):
    return _flash_forward(rows, kt, vt, tiles)


def _flash_bwd(residuals, d_out):
    """Tiles are recomputed keys-first, (keys, rows), so that all five products of a tile are plain or
    right-transposed matmuls. The row-first tile needed two left-transposed ones (dK = dS^T Q and
    dV = P^T dO), which XLA:CPU hands to Eigen at half YNNPACK's speed; keys-first, only dQ = dS K is
    left-transposed, and it becomes dQ^T = K^T dS^T with K^T transposed once per key block."""
    rows, kt, vt, tiles, out, lse = residuals
    d_out = d_out.astype(jnp.float32)  # (B, KV, Lq * G, hd + C): the extra channels' cotangents included
    # softmax backward: dS = P * (dP - rowsum(dO * O)), over the values and the riding channels alike
    # (an einsum: XLA:CPU ran the same multiply-and-sum as a reduction 10x slower)
    delta = jnp.einsum("bkrd,bkrd->bkr", d_out, out.astype(jnp.float32))
    n_q, n_k = tiles.counts()
    live = tiles.live()
    r, bk = tiles.block_rows, tiles.block_k
    scale = 1.0 / jnp.sqrt(jnp.float32(rows.shape[-1]))

    def key_block(d_q_t, j):
        k_blk, v_blk = _block(kt, j, bk, 2), _block(vt, j, bk, 2)
        # the barrier keeps the transpose a copy: folded into the product, it would be left-transposed again
        k_blk_t = jax.lax.optimization_barrier(jnp.swapaxes(k_blk, 2, 3))  # (B, KV, hd, bk)

        def query_block(i, carry):
            def update(carry):
                d_q_t, d_k, d_v = carry
                q_blk, do_blk = _block(rows, i, r, 2), _block(d_out, i, r, 2)
                visible = jnp.swapaxes(tiles.visible(i, j), 2, 3)  # (B, 1, bk, r)
                scores = _tile_scores(k_blk, q_blk, visible, "bksd,bkrd->bksr")
                # hidden: exp(_NEG - lse) = 0, as a row that sees nothing has lse = 0
                probs = jnp.exp(scores - _block(lse, i, r, 2)[..., None, :])
                d_v = d_v + jnp.einsum("bksr,bkrd->bksd", probs, do_blk)
                d_probs = jnp.einsum("bksd,bkrd->bksr", v_blk, do_blk, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - _block(delta, i, r, 2)[..., None, :]) * scale
                d_q_t_blk = _block(d_q_t, i, r, 3) + jnp.einsum("bkds,bksr->bkdr", k_blk_t, d_scores,
                                                                 preferred_element_type=jnp.float32)
                d_q_t = jax.lax.dynamic_update_slice_in_dim(d_q_t, d_q_t_blk, i * r, axis=3)
                d_k = d_k + jnp.einsum("bksr,bkrd->bksd", d_scores, q_blk, preferred_element_type=jnp.float32)
                return d_q_t, d_k, d_v

            return jax.lax.cond(live[i, j], update, lambda c: c, carry)

        init = (d_q_t, jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))
        d_q_t, d_k, d_v = jax.lax.fori_loop(0, n_q, query_block, init)
        return d_q_t, (d_k, d_v)

    d_q_t = jnp.zeros((*rows.shape[:2], rows.shape[3], rows.shape[2]), jnp.float32)  # (B, KV, hd, Lq * G)
    d_q_t, (d_k, d_v) = jax.lax.scan(key_block, d_q_t, jnp.arange(n_k))
    d_k, d_v = _unblock(d_k, 2), _unblock(d_v, 2)
    return jnp.swapaxes(d_q_t, 2, 3).astype(rows.dtype), d_k.astype(kt.dtype), d_v.astype(vt.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
