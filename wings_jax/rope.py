"""Rotary position embeddings in HF's rotate-half layout, with optional llama3 frequency scaling."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The (head_dim // 2,) inverse frequencies, llama3-scaled when ``scaling`` says so."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class Rotation(NamedTuple):
    """cos and sin of every (position, frequency) angle, each (B, L, head_dim / 2) float32.

    Built once per forward pass (``Decoder``) and shared by every layer's queries and keys: built inside
    each attention, XLA:CPU fused the cosine into the per-head rotation and called libm's cosine once
    per element of q and k (5 % of a bench_small training step).
    """

    cos: jnp.ndarray
    sin: jnp.ndarray


def rotation(positions: jnp.ndarray, inv_freq: np.ndarray) -> Rotation:
    """The rotation of ``positions`` (B, L) at frequencies ``inv_freq`` (head_dim / 2,)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return Rotation(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x: jnp.ndarray, by: Rotation) -> jnp.ndarray:
    """Rotate ``x`` (batch, length, heads, head_dim) by the rotation of its positions."""
    cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :].astype(x.dtype) for t in by)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
