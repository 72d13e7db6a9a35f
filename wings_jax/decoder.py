"""Qwen2 / Llama decoder whose layers carry the Wings learners and router (spec sections 1.5 and 2)."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from wings_jax.attention import MaskSpec, attention
from wings_jax.config import ModelConfig
from wings_jax.dense import TokenDense
from wings_jax.kv_cache import CACHE, attend_with_cache
from wings_jax.lorra import LearnerSource, LoRRA, Router
from wings_jax.remat import ATTENTION_OUTPUT, maybe_remat
from wings_jax.rope import Rotation, apply_rope, inverse_frequencies, rotation


def _dense(features, in_axis, out_axis, dtype, param_dtype, name, use_bias=False, init_std=0.02):
    return TokenDense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), (in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
    )


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        # Over (tokens, d) rather than (B, L, d): the same reason as ``TokenDense`` (XLA:CPU's backward
        # of the 3-D form, the scale's gradient above all, ran 2.8x slower).
        x32 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * normed.astype(self.dtype)).reshape(x.shape)


class LayerInputs(NamedTuple):
    """Everything a decoder layer reads besides the hidden state; the same at every layer."""

    positions: jnp.ndarray  # (B, L) RoPE positions
    mask: MaskSpec  # the main causal + padding mask
    visual: LearnerSource | None = None
    textual: LearnerSource | None = None
    visual_weight: jnp.ndarray | None = None  # (B,) multiplier of the visual term
    textual_weight: float = 1.0
    laws_channels: jnp.ndarray | None = None  # (B, L, 3) segment indicators for MLLM-Laws
    # KV-cache decoding: the cache slots (B, L) that these tokens' keys/values are written to; ``mask``
    # then indexes cache slots (``wings_jax.kv_cache``)
    cache_slots: jnp.ndarray | None = None
    # the rotations of ``positions``, set by ``Decoder``: the main attention's (scaled where the model
    # says so) and the learners' queries' (plain RoPE)
    rotation: Rotation | None = None
    learner_rotation: Rotation | None = None


class SelfAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, by: Rotation, mask, extra_values=None, cache_slots=None):
        text = self.config.text
        dtype, param_dtype = jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        hd, batch, seq_len = text.head_dim, x.shape[0], x.shape[1]
        bias = text.attention_bias
        q = _dense(text.num_heads * hd, "embed", "q_heads", dtype, param_dtype, "q_proj", bias)(x)
        k = _dense(text.num_kv_heads * hd, "embed", "kv_heads", dtype, param_dtype, "k_proj", bias)(x)
        v = _dense(text.num_kv_heads * hd, "embed", "kv_heads", dtype, param_dtype, "v_proj", bias)(x)
        q = q.reshape(batch, seq_len, text.num_heads, hd)
        k = k.reshape(batch, seq_len, text.num_kv_heads, hd)
        v = v.reshape(batch, seq_len, text.num_kv_heads, hd)
        q, k = apply_rope(q, by), apply_rope(k, by)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        if cache_slots is None:
            out, extra = attention(q, k, v, mask, extra_values, backend=self.config.attention_backend)
        else:
            out, extra = attend_with_cache(self, q, k, v, cache_slots, mask, extra_values,
                                           self.config.attention_backend)
        out = checkpoint_name(out.reshape(batch, seq_len, text.num_heads * hd), ATTENTION_OUTPUT)
        return _dense(text.hidden_size, "q_heads", "embed", dtype, param_dtype, "o_proj")(out), extra


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        text = self.config.text
        dtype, param_dtype = jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        gate = _dense(text.intermediate_size, "embed", "mlp", dtype, param_dtype, "gate_proj")(x)
        up = _dense(text.intermediate_size, "embed", "mlp", dtype, param_dtype, "up_proj")(x)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return _dense(text.hidden_size, "mlp", "embed", dtype, param_dtype, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    """x -> h1 = x + attn(norm(x)) -> h2 = h1 + learners -> h2 + mlp(norm(h2)).

    Static switches say which learner terms this forward pass uses; the arrays come in ``inputs``.
    Returns (hidden, per-layer MLLM-Laws masses (B, 3) or None).
    """

    config: ModelConfig
    has_learners: bool = True
    use_visual: bool = False
    use_textual: bool = False
    use_router: bool = False
    collect_laws: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, inputs: LayerInputs):
        config, text = self.config, self.config.text
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        router = None
        channels = []
        if self.has_learners and config.wings.stage == 2:
            router = Router(config.wings.router_positions, param_dtype=param_dtype, name="router")
            if self.use_router or self.is_initializing():
                channels.append(router.value_channels(inputs.mask.kv_index))
        if self.collect_laws:
            channels.append(inputs.laws_channels)
        extra_values = jnp.concatenate(channels, axis=-1) if channels else None

        normed = RMSNorm(text.rms_norm_eps, dtype, param_dtype, name="input_layernorm")(x)
        attn_out, extra = SelfAttention(config, name="self_attn")(normed, inputs.rotation, inputs.mask, extra_values,
                                                             inputs.cache_slots)
        hidden = x + attn_out
        if self.has_learners:
            hidden = hidden + self._learners(hidden, inputs, router, extra)
        normed = RMSNorm(text.rms_norm_eps, dtype, param_dtype, name="post_attention_layernorm")(hidden)
        hidden = hidden + MLP(config, name="mlp")(normed)
        laws = None
        if self.collect_laws:
            valid_queries = inputs.mask.kv_valid.astype(jnp.float32)  # queries are the real tokens
            laws = jnp.einsum("bqc,bq->bc", extra[..., -3:], valid_queries) / text.num_heads
        return hidden, laws

    def _learners(self, h1, inputs: LayerInputs, router: Router | None, extra) -> jnp.ndarray:
        config, text = self.config, self.config.text
        make = lambda name: LoRRA(
            text.hidden_size, text.num_heads, config.wings.lora_dim, dtype=jnp.dtype(config.dtype),
            param_dtype=jnp.dtype(config.param_dtype), backend=config.attention_backend, name=name,
        )
        visual_learner, textual_learner = make("visual_learner"), make("textual_learner")
        if self.is_initializing():
            # Create both learners' parameters whatever this pass uses: checkpoints hold both.
            for learner, source in ((visual_learner, inputs.visual), (textual_learner, inputs.textual)):
                if source is None:
                    source = _self_source(h1, inputs)
                learner(h1, inputs.learner_rotation, source)
        # each learner's output multiplier: a scalar or per token (B, L, 1); ``textual_weight`` may be traced
        # (remat passes the layer inputs as arguments), so it is multiplied whatever its value
        visual_weight = None
        textual_weight = jnp.asarray(inputs.textual_weight, h1.dtype)
        if self.use_router:
            weights = router(extra[..., :2]).astype(h1.dtype)  # (B, L, 2)
            if self.use_visual:
                visual_weight = inputs.visual_weight[:, None, None].astype(h1.dtype) * weights[..., :1]
            textual_weight = textual_weight * weights[..., 1:]
        update = jnp.zeros_like(h1)
        if self.use_visual:
            update += visual_learner(h1, inputs.learner_rotation, inputs.visual, visual_weight)
        if self.use_textual:
            update += textual_learner(h1, inputs.learner_rotation, inputs.textual, textual_weight)
        return update


def _self_source(h1, inputs: LayerInputs) -> LearnerSource:
    """A stand-in source (the layer's own causal context) used only to create unused learners' parameters."""
    return LearnerSource(values=h1, positions=inputs.positions, mask=inputs.mask, rotation=inputs.learner_rotation)


class Decoder(nn.Module):
    """Token embedding, the Wings decoder layers (scanned or unrolled) and the final norm."""

    config: ModelConfig
    use_visual: bool = False
    use_textual: bool = False
    use_router: bool = False
    collect_laws: bool = False

    def setup(self):
        text = self.config.text
        self.embed_tokens = nn.Embed(
            text.vocab_size, text.hidden_size, dtype=jnp.dtype(self.config.dtype),
            param_dtype=jnp.dtype(self.config.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        self.norm = RMSNorm(text.rms_norm_eps, jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype))
        if not text.tie_word_embeddings:
            self.lm_head = LMHead(text.hidden_size, text.vocab_size, jnp.dtype(self.config.param_dtype))
        flags = dict(use_visual=self.use_visual, use_textual=self.use_textual, use_router=self.use_router,
                     collect_laws=self.collect_laws)
        layer_cls = maybe_remat(DecoderLayer, self.config.remat_policy, scanned=self.config.scan_layers)
        if self.config.scan_layers:
            scanned = nn.scan(
                layer_cls, variable_axes={"params": 0, CACHE: 0}, split_rngs={"params": True},
                in_axes=nn.broadcast, length=text.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(self.config, has_learners=self.config.wings.enabled, **flags)
        else:
            self.layers = [
                layer_cls(self.config, has_learners=self.config.wings.has_learners(i), **flags, name=f"layers_{i}")
                for i in range(text.num_layers)
            ]

    def embed(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        return self.embed_tokens(input_ids)

    def __call__(self, embeds: jnp.ndarray, inputs: LayerInputs):
        """Input embeddings (B, L, d) -> final normed hidden states, and laws (n_layers, B, 3) or None."""
        inputs = self._with_rotations(inputs)
        if self.config.scan_layers:
            hidden, laws = self.layers(embeds, inputs)
        else:
            hidden, per_layer = embeds, []
            for layer in self.layers:
                hidden, layer_laws = layer(hidden, inputs)
                per_layer.append(layer_laws)
            laws = jnp.stack(per_layer) if self.collect_laws else None
        return self.norm(hidden), laws

    def _with_rotations(self, inputs: LayerInputs) -> LayerInputs:
        """``inputs`` with the RoPE rotations every layer shares, computed here once (see ``Rotation``)."""
        text = self.config.text
        plain = inverse_frequencies(text.hidden_size // text.num_heads, text.rope_theta)  # the learners'
        inputs = inputs._replace(
            rotation=rotation(inputs.positions, inverse_frequencies(text.head_dim, text.rope_theta,
                                                                    text.rope_scaling_dict)),
            learner_rotation=rotation(inputs.positions, plain),
        )
        for name in ("visual", "textual"):
            source = getattr(inputs, name)
            if source is not None and source.positions is not None:
                inputs = inputs._replace(**{name: source._replace(rotation=rotation(source.positions, plain))})
        return inputs

    def head_weight(self) -> jnp.ndarray:
        """The (d, V) output projection: the transposed embedding when tied."""
        if self.config.text.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head()


class LMHead(nn.Module):
    """Holds the untied output projection as lm_head/kernel (d, V); the loss applies it in chunks."""

    hidden_size: int
    vocab_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        return self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                          (self.hidden_size, self.vocab_size), self.param_dtype)
