"""Wings learners (LoRRA: low-rank residual attention) and the attention-based router.

The learners' key/value sources are the same at every layer, so the functions here build them
once per forward pass, together with their masks, for both mask modes (spec section 3):
``causal`` (correct semantics, any number of images) and ``reference`` (what the authors'
PyTorch implementation computes, one image per sample, quirks included).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wings_jax.attention import MaskSpec, attention
from wings_jax.dense import TokenDense
from wings_jax.kv_cache import attend_with_cache
from wings_jax.rope import Rotation, apply_rope


class LearnerSource(NamedTuple):
    """What one learner attends to: the same at every layer.

    KV-cache decoding: with ``cache_slots`` the keys/values of ``values`` are written to the learner's
    cache at those slots and ``mask`` indexes cache slots; ``values=None`` reads the cache unchanged.
    """

    values: jnp.ndarray | None  # (B, S, d) source vectors (image features or input embeddings)
    positions: jnp.ndarray | None  # (B, S) RoPE positions of the keys
    mask: MaskSpec
    # reference mode only: query rows that attend uniformly to every existing key, and which keys exist
    uniform_rows: jnp.ndarray | None = None  # (B, L) bool
    key_exists: jnp.ndarray | None = None  # (B, S) bool
    cache_slots: jnp.ndarray | None = None  # (B, S) int
    rotation: Rotation | None = None  # of ``positions``, plain RoPE (set by ``Decoder``)


class LoRRA(nn.Module):
    """Attention whose q/k/v projections are identity plus a rank-r update and whose output
    projection is purely low-rank; H heads for keys and values (no GQA)."""

    hidden_size: int
    num_heads: int
    rank: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"

    def _factor(self, name: str, x: jnp.ndarray, in_axis: str, out_axis: str, features: int, init) -> jnp.ndarray:
        return TokenDense(
            features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(init, (in_axis, out_axis)),
        )(x)

    def _low_rank(self, prefix: str, x: jnp.ndarray) -> jnp.ndarray:
        down = self._factor(f"{prefix}_a", x, "embed", "lora", self.rank, nn.initializers.truncated_normal(0.02))
        return self._factor(f"{prefix}_b", down, "lora", "embed", self.hidden_size, nn.initializers.zeros)

    @nn.compact
    def __call__(self, query: jnp.ndarray, query_rotation: Rotation, source: LearnerSource,
                 weight: jnp.ndarray | None = None) -> jnp.ndarray:
        """``query_rotation`` and ``source.rotation``: plain RoPE, never scaled.

        ``weight`` (a scalar or per token, (B, L, 1); e.g. the router's) multiplies the output. It scales
        the rank-r factor before the last projection (the same product), so that its gradient sums r
        values per token, not the hidden size: over the hidden size XLA:CPU ran it as a reduction that
        took 3 ms per learner and layer at bench_small's shapes.
        """
        batch, q_len, _ = query.shape
        head_dim = self.hidden_size // self.num_heads
        q = (query + self._low_rank("q", query)).reshape(batch, q_len, self.num_heads, head_dim)
        q = apply_rope(q, query_rotation)
        k = v = None
        if source.values is not None:
            src = source.values.astype(self.dtype)
            k = (src + self._low_rank("k", src)).reshape(batch, src.shape[1], self.num_heads, head_dim)
            v = (src + self._low_rank("v", src)).reshape(batch, src.shape[1], self.num_heads, head_dim)
            k = apply_rope(k, source.rotation)
        if source.values is None or source.cache_slots is not None:
            out, _ = attend_with_cache(self, q, k, v, source.cache_slots, source.mask, backend=self.backend)
        else:
            out, _ = attention(q, k, v, source.mask, backend=self.backend)
        if source.uniform_rows is not None:
            # Reference quirk: these rows' mask is the most negative float on every key, so their
            # softmax is uniform over all existing keys: the mean of the values.
            weights = source.key_exists.astype(jnp.float32)
            mean_v = jnp.einsum("bs,bshd->bhd", weights, v.astype(jnp.float32)) / weights.sum(-1)[:, None, None]
            out = jnp.where(source.uniform_rows[:, :, None, None], mean_v[:, None].astype(out.dtype), out)
        out = out.reshape(batch, q_len, self.hidden_size)
        down = self._factor("o_a", out, "embed", "lora", self.rank, nn.initializers.truncated_normal(0.02))
        if weight is not None:
            down = down * weight.astype(down.dtype)
        return self._factor("o_b", down, "lora", "embed", self.hidden_size, nn.initializers.zeros)


class Router(nn.Module):
    """Linear router over the main attention's probabilities, one weight column per key position.

    ``value_channels`` gives the per-key values W[:, k] that ride along the main attention; the
    attention returns a = sum_h P_h W^T, and ``__call__`` turns it into the two learner weights.
    """

    positions: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        bound = 1.0 / jnp.sqrt(self.positions)  # torch nn.Linear's default initialisation
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.kernel = self.param(
            "kernel", nn.with_logical_partitioning(uniform, ("router_pos", "router_out")), (self.positions, 2),
            self.param_dtype,
        )
        self.bias = self.param("bias", nn.with_logical_partitioning(uniform, ("router_out",)), (2,), self.param_dtype)

    def value_channels(self, key_positions: jnp.ndarray) -> jnp.ndarray:
        """(B, Lk) key positions (clipped to the table) -> (B, Lk, 2) router weight columns."""
        return jnp.take(self.kernel, jnp.clip(key_positions, 0, self.positions - 1), axis=0).astype(jnp.float32)

    def __call__(self, routed: jnp.ndarray) -> jnp.ndarray:
        """(B, L, 2) attention-weighted router columns -> (B, L, 2) softmax weights [visual, textual]."""
        return jax.nn.softmax(jax.nn.silu(routed + self.bias.astype(jnp.float32)), axis=-1)


def _flat_image_positions(image_mask: jnp.ndarray, n_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sequence index of every image feature slot (B, F), and the feature index of every position (B, L)."""
    batch, seq_len = image_mask.shape
    rank = jnp.cumsum(image_mask, axis=1) - 1
    feature_index = jnp.where(image_mask, rank, n_features)  # out of range for text: dropped below
    rows = jnp.arange(batch)[:, None]
    index = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    slot_index = jnp.zeros((batch, n_features), jnp.int32).at[rows, feature_index].set(index, mode="drop")
    return slot_index, jnp.clip(feature_index, 0, n_features - 1)


def merge_image_features(embeds: jnp.ndarray, features: jnp.ndarray, image_mask: jnp.ndarray) -> jnp.ndarray:
    """Put the flattened image features (B, F, d) into the image slots of ``embeds`` (B, L, d)."""
    _, feature_index = _flat_image_positions(image_mask, features.shape[1])
    gathered = jnp.take_along_axis(features, feature_index[..., None], axis=1)
    return jnp.where(image_mask[..., None], gathered.astype(embeds.dtype), embeds)


def visual_source_causal(features, feature_valid, image_mask, positions) -> LearnerSource:
    """Every image token at true position k is a key for queries at positions >= k."""
    slot_index, _ = _flat_image_positions(image_mask, features.shape[1])
    key_positions = jnp.take_along_axis(positions, slot_index, axis=1)
    query_index = jnp.broadcast_to(jnp.arange(image_mask.shape[1]), image_mask.shape)
    mask = MaskSpec(q_index=query_index, kv_index=slot_index, kv_valid=feature_valid, causal=True)
    return LearnerSource(values=features, positions=key_positions, mask=mask)


def textual_source_causal(embeds, image_mask, attention_mask, positions, system_prompt_length) -> LearnerSource:
    """Text tokens past the system prompt are keys for queries at or after their position."""
    index = jnp.broadcast_to(jnp.arange(image_mask.shape[1]), image_mask.shape)
    valid = attention_mask & ~image_mask & (positions >= system_prompt_length)
    mask = MaskSpec(q_index=index, kv_index=index, kv_valid=valid, causal=True)
    return LearnerSource(values=embeds, positions=positions, mask=mask)


def visual_source_reference(features, image_valid, image_mask, positions, image_tokens) -> LearnerSource:
    """Reference visual learner: every query sees all N tokens of its sample's image (no mask).

    A text-only sample in a batch with images gets the all-zero image's features at key positions
    0..N-1, truncated to the sequence length.
    """
    seq_len = image_mask.shape[1]
    first = features[:, :image_tokens]
    slot_index, _ = _flat_image_positions(image_mask, image_tokens)
    true_positions = jnp.take_along_axis(positions, slot_index, axis=1)
    has_image = image_valid[:, 0]
    key_positions = jnp.where(has_image[:, None], true_positions, jnp.arange(image_tokens)[None])
    valid = has_image[:, None] | (jnp.arange(image_tokens) < seq_len)[None]
    mask = MaskSpec(q_index=jnp.zeros_like(positions), kv_index=key_positions, kv_valid=valid, causal=False)
    return LearnerSource(values=first, positions=key_positions, mask=mask)


def textual_source_reference(embeds, image_mask, attention_mask, has_image, system_prompt_length, image_tokens):
    """Reference textual learner: gathered text keys, the causal mask sliced in gathered index space,
    repeated-last-index padding and its uniform query rows (spec section 3).

    Returns the source and pad (B,): how many repeated indices each sample got.
    """
    batch, seq_len = image_mask.shape
    index = jnp.arange(seq_len)
    member = jnp.where(has_image[:, None], (index >= system_prompt_length)[None] & ~image_mask, True)
    lengths = member.sum(axis=1)
    order = jnp.argsort(~member, axis=1, stable=True)  # member positions first, in order
    last = jnp.take_along_axis(order, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
    gathered = jnp.where(index[None] < lengths[:, None], order, last)  # (B, L) padded by repeating the last
    gathered_length = lengths.max()
    pad = gathered_length - lengths
    key_exists = jnp.broadcast_to(index < gathered_length, (batch, seq_len))
    mask = MaskSpec(
        q_index=jnp.broadcast_to(index, (batch, seq_len)), kv_index=jnp.broadcast_to(index, (batch, seq_len)),
        kv_valid=attention_mask & key_exists, causal=True,
    )
    values = jnp.take_along_axis(embeds, gathered[..., None], axis=1)
    source = LearnerSource(
        values=values, positions=gathered, mask=mask,
        uniform_rows=index[None] >= (seq_len - pad)[:, None], key_exists=key_exists,
    )
    return source, pad


def reference_visual_multiplier(pad: jnp.ndarray, seq_len: int, image_tokens: int) -> jnp.ndarray:
    """How many times the reference adds w_v * v for each sample in stage 2 (spec section 3)."""
    if seq_len < image_tokens:
        return jnp.ones(pad.shape, jnp.float32)
    return jnp.where((pad == 0).all(), 2.0, 1.0 + (pad != 0)).astype(jnp.float32)
