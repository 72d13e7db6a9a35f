"""The Wings model: image -> SigLIP features -> projector -> merged sequence -> decoder -> loss.

``WingsModel(config)`` consumes the static batch format of ``wings_jax.batch``. A batch without
``pixel_values`` means "no image passed at all" (text-only inference), which matters in the
``reference`` mask mode (spec section 3).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wings_jax.attention import MaskSpec
from wings_jax.config import IGNORE_INDEX, ModelConfig
from wings_jax.decoder import Decoder, LayerInputs
from wings_jax.kv_cache import DecodeState
from wings_jax.lorra import (
    LearnerSource,
    merge_image_features,
    reference_visual_multiplier,
    textual_source_causal,
    textual_source_reference,
    visual_source_causal,
    visual_source_reference,
)
from wings_jax.projector import Projector
from wings_jax.vision import SiglipVisionTower

MODES = ("loss", "logits", "last_logits", "hidden", "laws", "image_features", "prefill", "decode")


class WingsModel(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, batch: dict, mode: str = "loss", cache_length: int = 0, text_cache_length: int = 0):
        """mode 'loss': {'loss', 'loss_sum', 'num_tokens'}; 'logits': float32 (B, L, V);
        'hidden': final normed hidden states (B, L, d); 'laws': per-layer attention mass on the
        (before-image, image, after-image) key segments, (B, n_layers, 3); 'image_features': the
        projected features (B, M * N, d) of ``pixel_values`` (the batch needs nothing else);
        'last_logits': float32 (B, V) at each row's last real token; 'prefill' and 'decode': KV-cache
        decoding, see ``prefill`` and ``decode_step``."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        config = self.config
        if mode == "image_features":
            return self._image_features(batch["pixel_values"], batch["image_valid"])
        if mode in ("prefill", "decode") and config.wings.mask_mode != "causal":
            raise ValueError(
                f"KV-cache decoding needs wings.mask_mode='causal', not {config.wings.mask_mode!r}: reference-mode "
                "learner keys depend on the whole sequence (generate by full recomputation instead)"
            )
        if mode == "decode":
            return self._decode(batch["input_ids"], batch["decode_state"])
        has_pixels = batch.get("pixel_values") is not None
        flags = self._learner_flags(has_pixels)
        check_static_shapes(config, batch, cache_length if mode == "prefill" else 0, flags["use_router"])
        decoder = Decoder(config, collect_laws=mode == "laws", name="decoder", **flags)
        input_ids = batch["input_ids"]
        image_mask = batch["image_mask"].astype(bool)
        token_embeds = decoder.embed(input_ids)
        embeds, features = token_embeds, None
        if has_pixels:
            features = self._image_features(batch["pixel_values"], batch["image_valid"])
            embeds = merge_image_features(token_embeds, features, image_mask)
        # The textual learner reads text positions only, where the token embeddings are the merged ones:
        # reading them before the merge, its cotangents (a sum over every layer) go to the embedding table
        # alone, not through the merge's select into both the table and the image features, which
        # XLA:CPU computed once for each.
        inputs = self._layer_inputs(batch, token_embeds, features, flags, with_laws=mode == "laws")
        if mode == "prefill":
            inputs, state = _prefill_inputs(inputs, batch, cache_length, text_cache_length or cache_length,
                                            config.wings.system_prompt_length)
        hidden, laws = decoder(embeds, inputs)
        if mode in ("prefill", "last_logits"):
            lengths = batch["attention_mask"].astype(jnp.int32).sum(axis=1)
            logits = self._head_logits(decoder, hidden[jnp.arange(hidden.shape[0]), lengths - 1])
            return (logits, state) if mode == "prefill" else logits
        if mode == "hidden":
            return hidden
        if mode == "laws":
            return jnp.transpose(laws, (1, 0, 2))
        if mode == "logits":
            return self._head_logits(decoder, hidden)
        head = decoder.head_weight().astype(hidden.dtype)
        loss_sum, num_tokens = chunked_cross_entropy(hidden, head, batch["labels"], config.loss_chunk_size)
        return {"loss": loss_sum / jnp.maximum(num_tokens, 1), "loss_sum": loss_sum, "num_tokens": num_tokens}

    def logits(self, batch: dict) -> jnp.ndarray:
        return self(batch, mode="logits")

    def prefill(self, batch: dict, cache_length: int, text_cache_length: int = 0) -> tuple[jnp.ndarray, DecodeState]:
        """Run right-padded prompts (the batch format, L <= ``cache_length``) and fill the ``cache``
        collection (apply with ``mutable=["cache"]``) with ``cache_length`` slots (the textual learner's:
        ``text_cache_length``, by default as many; it holds only the textual keys, see ``DecodeState``);
        returns the float32 logits (B, V) of each prompt's last token and the ``DecodeState``. Causal mask
        mode only. Each decode step takes one slot of each cache: room for the decode steps is the caller's
        to leave."""
        return self(batch, mode="prefill", cache_length=cache_length, text_cache_length=text_cache_length)

    def decode_step(self, tokens: jnp.ndarray, state: DecodeState) -> tuple[jnp.ndarray, DecodeState]:
        """Append one token per row (B,) at slot ``state.lengths``; returns its float32 next-token logits
        (B, V) and the new state. Apply with ``mutable=["cache"]``: the token's keys/values are written to
        the caches. Decode with unrolled layers (``kv_cache.unstack_layers``): scanned, each step copies
        every layer's weights and caches (``wings_jax.kv_cache``)."""
        return self({"input_ids": tokens, "decode_state": state}, mode="decode")

    def laws(self, batch: dict) -> jnp.ndarray:
        return self(batch, mode="laws")

    def encode_images(self, pixel_values: jnp.ndarray, image_valid: jnp.ndarray) -> jnp.ndarray:
        """(B, M, H, W, 3) pixels -> projected features (B, M * N, d); unused slots see zero pixels."""
        return self({"pixel_values": pixel_values, "image_valid": image_valid}, mode="image_features")

    def _image_features(self, pixel_values: jnp.ndarray, image_valid: jnp.ndarray) -> jnp.ndarray:
        config = self.config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        batch, slots = pixel_values.shape[:2]
        pixels = jnp.where(image_valid[:, :, None, None, None], pixel_values, 0.0)
        tower = SiglipVisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, scan_layers=config.scan_layers,
                                  remat_policy=config.remat_policy, attention_backend=config.attention_backend,
                                  name="vision_tower")
        # The tower is frozen in both stages: no gradient, and no backward pass through it.
        features = jax.lax.stop_gradient(tower(pixels.reshape(batch * slots, *pixels.shape[2:])))
        projected = Projector(config.projector, config.text.hidden_size, dtype=dtype, param_dtype=param_dtype,
                              name="projector")(features)
        return projected.reshape(batch, slots * config.image_tokens, -1)

    def _head_logits(self, decoder: Decoder, hidden: jnp.ndarray) -> jnp.ndarray:
        head = decoder.head_weight().astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, head).astype(jnp.float32)

    def _decode(self, tokens: jnp.ndarray, state: DecodeState):
        """One decoding step over the cache (see ``decode_step``); the new tokens are text."""
        flags = self._learner_flags(has_pixels=state.visual_index is not None)
        decoder = Decoder(self.config, name="decoder", **flags)
        rows, slots = jnp.arange(tokens.shape[0]), state.lengths[:, None]  # main cache: slot == position
        embeds = decoder.embed(tokens[:, None])
        is_key = state.lengths >= self.config.wings.system_prompt_length  # text past the system prompt
        # Every attention writes this token's key/value at its slot, then attends over its whole cache. The
        # textual slot goes on to the next token unless this one is a key.
        kv_valid = state.kv_valid.at[rows, state.lengths].set(True)
        text_index = state.text_index.at[rows, state.text_length].set(state.lengths)
        text_valid = state.text_valid.at[rows, state.text_length].set(is_key)
        cache_index = jnp.broadcast_to(jnp.arange(kv_valid.shape[1]), kv_valid.shape)
        inputs = LayerInputs(positions=slots, mask=MaskSpec(slots, cache_index, kv_valid, causal=True),
                             cache_slots=slots)
        if flags["use_visual"]:
            visual_mask = MaskSpec(slots, state.visual_index, state.visual_valid, causal=True)
            inputs = inputs._replace(visual=LearnerSource(None, None, visual_mask),
                                     visual_weight=jnp.ones(tokens.shape, jnp.float32))
        if flags["use_textual"]:
            text_mask = MaskSpec(slots, text_index, text_valid, causal=True)
            inputs = inputs._replace(textual=LearnerSource(embeds, slots, text_mask,
                                                           cache_slots=state.text_length[:, None]))
        hidden, _ = decoder(embeds, inputs)
        state = state._replace(lengths=state.lengths + 1, kv_valid=kv_valid, text_index=text_index,
                               text_valid=text_valid, text_length=state.text_length + is_key)
        return self._head_logits(decoder, hidden[:, 0]), state

    def _learner_flags(self, has_pixels: bool) -> dict:
        wings = self.config.wings
        if not wings.enabled:
            return dict(use_visual=False, use_textual=False, use_router=False)
        if wings.stage == 1:
            return dict(use_visual=has_pixels, use_textual=False, use_router=False)
        if wings.mask_mode == "reference" and not has_pixels:
            return dict(use_visual=False, use_textual=True, use_router=False)
        return dict(use_visual=has_pixels, use_textual=True, use_router=True)

    def _layer_inputs(self, batch, token_embeds, features, flags, with_laws) -> LayerInputs:
        config, wings = self.config, self.config.wings
        image_mask = batch["image_mask"].astype(bool)
        attention_mask = batch["attention_mask"].astype(bool)
        positions = batch["positions"]
        index = jnp.broadcast_to(jnp.arange(image_mask.shape[1]), image_mask.shape)
        inputs = LayerInputs(positions=positions, mask=MaskSpec(index, index, attention_mask, causal=True))
        if with_laws:
            inputs = inputs._replace(laws_channels=segment_indicators(image_mask, attention_mask))
        if not (flags["use_visual"] or flags["use_textual"]):
            return inputs
        s = wings.system_prompt_length
        if wings.mask_mode == "causal":
            if flags["use_visual"]:
                valid = jnp.repeat(batch["image_valid"].astype(bool), config.image_tokens, axis=1)
                inputs = inputs._replace(visual=visual_source_causal(features, valid, image_mask, positions),
                                         visual_weight=jnp.ones(image_mask.shape[:1], jnp.float32))
            if flags["use_textual"]:
                inputs = inputs._replace(textual=textual_source_causal(token_embeds, image_mask, attention_mask,
                                                                       positions, s))
            return inputs
        if flags["use_visual"]:
            has_image = batch["image_valid"].astype(bool)[:, 0]
            inputs = inputs._replace(visual=visual_source_reference(features, batch["image_valid"].astype(bool),
                                                                    image_mask, positions, config.image_tokens))
        else:
            has_image = jnp.zeros(image_mask.shape[:1], bool)
        if flags["use_textual"]:
            textual, pad = textual_source_reference(token_embeds, image_mask, attention_mask, has_image, s,
                                                    config.image_tokens)
            inputs = inputs._replace(textual=textual)
            if flags["use_router"]:
                # The reference adds the learners more than once (spec section 3).
                multiplier = reference_visual_multiplier(pad, image_mask.shape[1], config.image_tokens)
                inputs = inputs._replace(visual_weight=multiplier, textual_weight=2.0)
        return inputs


def _prefill_inputs(inputs: LayerInputs, batch: dict, cache_length: int, text_cache_length: int,
                    system_prompt_length: int):
    """Turn full-sequence layer inputs into cache-writing ones: the main mask indexes ``cache_length`` slots
    (only the prompt's are valid) and the textual learner's ``text_cache_length`` slots, which take its
    keys (text past the system prompt) in order; the prompt's keys/values go to the caches. Returns them
    and the initial ``DecodeState``."""
    attention_mask = batch["attention_mask"].astype(bool)
    batch_size, seq_len = attention_mask.shape
    if seq_len > cache_length:
        raise ValueError(f"prompt batch length {seq_len} exceeds cache_length={cache_length}")
    cache_index = jnp.broadcast_to(jnp.arange(cache_length), (batch_size, cache_length))
    query_index = inputs.mask.q_index
    kv_valid = jnp.pad(attention_mask, ((0, 0), (0, cache_length - seq_len)))
    inputs = inputs._replace(mask=MaskSpec(query_index, cache_index, kv_valid, causal=True), cache_slots=query_index)
    # The textual keys, packed: key k of a row in slot k; everything else to slot text_cache_length (dropped).
    text_key = attention_mask & ~batch["image_mask"].astype(bool) & (batch["positions"] >= system_prompt_length)
    text_length = text_key.sum(axis=1).astype(jnp.int32)
    text_slots = jnp.where(text_key, jnp.cumsum(text_key, axis=1) - 1, text_cache_length)
    rows = jnp.arange(batch_size)[:, None]
    text_index = jnp.zeros((batch_size, text_cache_length), jnp.int32).at[rows, text_slots].set(
        batch["positions"].astype(jnp.int32), mode="drop")
    text_valid = jnp.arange(text_cache_length)[None] < text_length[:, None]
    state = DecodeState(lengths=attention_mask.sum(axis=1).astype(jnp.int32), kv_valid=kv_valid,
                        text_index=text_index, text_valid=text_valid, text_length=text_length)
    if inputs.textual is not None:
        text_mask = MaskSpec(query_index, text_index, text_valid, causal=True)
        inputs = inputs._replace(textual=inputs.textual._replace(mask=text_mask, cache_slots=text_slots))
    if inputs.visual is not None:
        visual = inputs.visual
        feature_slots = jnp.broadcast_to(jnp.arange(visual.values.shape[1]), visual.mask.kv_index.shape)
        inputs = inputs._replace(visual=visual._replace(cache_slots=feature_slots))
        state = state._replace(visual_index=visual.mask.kv_index, visual_valid=visual.mask.kv_valid)
    return inputs, state


def check_static_shapes(config: ModelConfig, batch: dict, cache_length: int, uses_router: bool) -> None:
    """Raise ValueError for what the shapes alone show is wrong (run at trace time)."""
    if batch.get("pixel_values") is not None:
        size = config.vision.image_size
        expected = (config.max_images, size, size, config.vision.num_channels)
        found = tuple(batch["pixel_values"].shape[1:])
        if found != expected:
            raise ValueError(f"pixel_values has shape (B, *{found}), expected (B, *{expected}) "
                             "(max_images, image_size, image_size, channels)")
    key_length = max(batch["input_ids"].shape[1], cache_length)
    if uses_router and key_length > config.wings.router_positions:
        raise ValueError(f"sequence length {key_length} exceeds the router's position table "
                         f"wings.router_positions={config.wings.router_positions}")


def segment_indicators(image_mask: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """(B, L, 3) float32 indicators of the MLLM-Laws key segments: text before the first image,
    the image tokens, text after the last image (spec section 5)."""
    seq_len = image_mask.shape[1]
    index = jnp.arange(seq_len)[None]
    first = jnp.where(image_mask.any(1), jnp.argmax(image_mask, axis=1), seq_len)[:, None]
    last = jnp.where(image_mask.any(1), seq_len - 1 - jnp.argmax(image_mask[:, ::-1], axis=1), seq_len)[:, None]
    text = attention_mask & ~image_mask
    segments = jnp.stack([text & (index < first), image_mask & attention_mask, text & (index > last)], axis=-1)
    return segments.astype(jnp.float32)


def count_label_tokens(labels: jnp.ndarray) -> jnp.ndarray:
    """How many positions of ``labels`` (B, L) the loss counts: every labelled position but each row's first
    (the labels are shifted: position i predicts label i + 1)."""
    return jnp.sum(labels[:, 1:] != IGNORE_INDEX).astype(jnp.int32)


def chunked_cross_entropy(hidden, head, labels, chunk_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    The float32 logits exist for one chunk of positions at a time, forward and backward.
    """
    batch, seq_len, width = hidden.shape
    targets = jnp.concatenate([labels[:, 1:], jnp.full((batch, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    chunk = min(chunk_size, seq_len)
    padded = -(-seq_len // chunk) * chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, padded - seq_len), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded - seq_len)), constant_values=IGNORE_INDEX)
    hidden = hidden.reshape(batch, padded // chunk, chunk, width).swapaxes(0, 1)
    targets = targets.reshape(batch, padded // chunk, chunk).swapaxes(0, 1)

    def chunk_loss(h, t):
        # one 2-D matmul over the chunk's tokens (see ``TokenDense``: the 3-D form's backward transposes)
        logits = (h.reshape(-1, width) @ head).astype(jnp.float32)
        t = t.reshape(-1)
        valid = t != IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * valid)

    if padded == chunk:  # one chunk: its logits are needed whole anyway, so keep them for the backward
        return chunk_loss(hidden[0], targets[0]), count_label_tokens(labels)
    # several chunks: recompute each chunk's logits in the backward instead of storing them all
    sums = jax.lax.map(lambda xs: jax.checkpoint(chunk_loss)(*xs), (hidden, targets))
    return sums.sum(), count_label_tokens(labels)


def dummy_batch(config: ModelConfig, batch_size: int = 1, seq_len: int = 8) -> dict:
    """An all-padding batch of the right shapes, for initialisation and shape inference."""
    size = config.vision.image_size
    return {
        "input_ids": np.zeros((batch_size, seq_len), np.int32),
        "image_mask": np.zeros((batch_size, seq_len), bool),
        "pixel_values": np.zeros((batch_size, config.max_images, size, size, 3), np.float32),
        "image_valid": np.zeros((batch_size, config.max_images), bool),
        "labels": np.full((batch_size, seq_len), IGNORE_INDEX, np.int32),
        "positions": np.zeros((batch_size, seq_len), np.int32),
        "attention_mask": np.ones((batch_size, seq_len), bool),
    }


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Freshly initialised parameters (plain arrays, logical-axis metadata removed)."""
    model = WingsModel(config.validate())
    variables = jax.jit(model.init)(rng, dummy_batch(config, seq_len=seq_len))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> dict:
    """Parameter shapes and dtypes (boxed with their logical axes) without allocating anything."""
    model = WingsModel(config.validate())
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_batch(config))["params"]


def param_logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of ``PartitionSpec``."""
    return nn.get_partition_spec(abstract_params(config))
