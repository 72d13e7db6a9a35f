"""Model FLOPs of a training step, counted analytically (2 per multiply-add; recomputation not counted).

Attention is counted over the (query, key) pairs the masks allow, as taken from the batch: a causal
main attention costs about half a full one, and so does the blockwise kernel that skips hidden tiles.
The frozen vision tower runs forward only; the projector's backward computes only its weight
gradients (its input is the frozen tower's output); every decoder part runs forward and backward
(input and weight gradients: twice the forward) when the LLM trains, input gradients only otherwise.
"""

from __future__ import annotations

import numpy as np

from wings_jax.config import ModelConfig


def visible_pairs(keys: np.ndarray) -> int:
    """Causal (query i, key j <= i) pairs with key j in ``keys`` (B, L) bool; positions are sequence indices
    in the synthetic batches (one image per row)."""
    return int(np.cumsum(keys, axis=1).sum())


def train_step_flops(model: ModelConfig, batch: dict, trained_groups: set[str]) -> dict[str, float]:
    """Model FLOPs of one step on ``batch`` (numpy arrays in the ``wings_jax.batch`` format), by part."""
    text, vision, wings = model.text, model.vision, model.wings
    d, hd, rank = text.hidden_size, text.head_dim, wings.lora_dim
    batch_size, seq_len = batch["input_ids"].shape
    tokens = batch_size * seq_len
    attention_mask = np.asarray(batch["attention_mask"], bool)
    image_mask = np.asarray(batch["image_mask"], bool)
    layers = text.num_layers

    dense = 2 * d * (2 * text.num_heads * hd + 2 * text.num_kv_heads * hd + 3 * text.intermediate_size)
    main_pairs = visible_pairs(attention_mask)
    router_channels = 2 if wings.enabled and wings.stage == 2 else 0
    decoder = layers * (tokens * dense + main_pairs * text.num_heads * (4 * hd + 2 * router_channels))
    learners = 0.0
    if wings.enabled:
        n_image = int(image_mask.sum())
        lorra_query_side = 2 * 2 * (2 * d * rank)  # q and o low-rank pairs, per query token
        lorra_key_side = 2 * 2 * (2 * d * rank)  # k and v low-rank pairs, per source token
        visual_pairs = visible_pairs(image_mask & attention_mask)
        learners += tokens * lorra_query_side + n_image * lorra_key_side + visual_pairs * 4 * d
        if wings.stage == 2:
            text_keys = attention_mask & ~image_mask & (np.arange(seq_len)[None] >= wings.system_prompt_length)
            learners += tokens * lorra_query_side + int(text_keys.sum()) * lorra_key_side
            learners += visible_pairs(text_keys) * 4 * d
        learners *= layers
    lm_head = 2 * tokens * d * text.vocab_size
    images = int(np.asarray(batch["image_valid"]).sum())
    n, width = vision.num_patches, vision.hidden_size
    tower_layer = 2 * n * (4 * width * width + 2 * width * vision.intermediate_size) + 4 * n * n * width
    tower = images * (2 * n * vision.patch_size**2 * vision.num_channels * width + vision.kept_layers * tower_layer)
    depth = model.projector.mlp_depth
    projector = images * 2 * n * (width * d + (depth - 1) * d * d) if depth else 0

    llm_backward = 2 if "llm" in trained_groups else 1
    parts = {
        "vision_tower_forward": float(tower),
        "projector": float(projector * (2 if "projector" in trained_groups else 1)),
        "decoder": float(decoder * (1 + llm_backward)),
        "learners_and_router": float(learners * 3),
        "lm_head": float(lm_head * (1 + llm_backward)),
    }
    parts["total"] = sum(parts.values())
    return parts
