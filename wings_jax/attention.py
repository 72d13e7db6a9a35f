"""The attention kernel shared by the decoder and the Wings learners, behind a backend switch.

Masks are described, not materialised by callers: a key j is visible to a query i when
``kv_valid[j]`` and, for causal masks, ``kv_index[j] <= q_index[i]``. A query with no visible key
gets a zero output. ``extra_values`` are value channels shared by every head, e.g. the router's
position weights or MLLM-Laws segment indicators: their attention-weighted sums, added over heads,
come back without the (batch, heads, L, L) probabilities leaving the kernel.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MaskSpec:
    q_index: jnp.ndarray  # (B, Lq) int
    kv_index: jnp.ndarray  # (B, Lk) int
    kv_valid: jnp.ndarray  # (B, Lk) bool
    causal: bool = struct.field(pytree_node=False, default=True)


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: MaskSpec,
    extra_values: Optional[jnp.ndarray] = None,
    backend: str = "xla",
) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    """Scaled dot-product attention with grouped key/value heads.

    q (B, Lq, H, hd); k, v (B, Lk, KV, hd) with H a multiple of KV; extra_values (B, Lk, C).
    Returns the output (B, Lq, H, hd) and, with extra_values, their weighted sums over keys added
    over heads (B, Lq, C) in float32.
    """
    if backend in ("xla", "auto"):
        return _xla_attention(q, k, v, mask, extra_values)
    raise ValueError(f"attention backend {backend!r} is not one of ('xla', 'auto')")


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
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    visible = visibility(mask)[:, None, None]  # (B, 1, 1, Lq, Lk)
    scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(batch, q_len, heads, head_dim)
    extra = None
    if extra_values is not None:
        extra = jnp.einsum("bkgqs,bsc->bqc", probs, extra_values.astype(jnp.float32))
    return out, extra
