"""A plain, materialised float64 NumPy implementation of spec sections 2 and 3, for tests only.

Written independently of wings_jax: explicit loops over samples, full probability tensors, the
reference implementation's quirks spelled out one by one. ``errors`` switches on deliberate
mistakes so that tests can show the comparison would catch them.
"""

from __future__ import annotations

import numpy as np

from wings_jax.config import ModelConfig
from wings_jax.rope import inverse_frequencies


def _rms(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, positions, inv_freq):
    """x (L, H, hd), positions (L,)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None].astype(np.float64)
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def _softmax(scores, visible):
    if scores.shape[-1] == 0:
        return scores
    scores = np.where(visible, scores, -np.inf)
    peak = np.max(np.where(visible, scores, -1e300), axis=-1, keepdims=True)
    weights = np.where(visible, np.exp(scores - peak), 0.0)
    total = weights.sum(-1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def _silu(x):
    return x / (1 + np.exp(-x))


def _learner(p, query, query_pos, keys, key_pos, visible, heads, theta, uniform_rows=None):
    """LoRRA for one sample: query (L, d), keys (S, d), visible (L, S) bool."""
    d = query.shape[-1]
    hd = d // heads
    lora = lambda x, name: x @ p[f"{name}_a"]["kernel"] @ p[f"{name}_b"]["kernel"]
    q = (query + lora(query, "q")).reshape(-1, heads, hd)
    k = (keys + lora(keys, "k")).reshape(-1, heads, hd)
    v = (keys + lora(keys, "v")).reshape(-1, heads, hd)
    inv_freq = inverse_frequencies(hd, theta)
    q, k = _rope(q, query_pos, inv_freq), _rope(k, key_pos, inv_freq)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    probs = _softmax(scores, visible[None])
    if uniform_rows is not None:
        probs[:, uniform_rows, :] = 1.0 / keys.shape[0]
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(-1, d)
    return out @ p["o_a"]["kernel"] @ p["o_b"]["kernel"]


def _gqa_attention(p, x, positions, visible, text):
    hd = text.head_dim
    bias = lambda name: p[name]["bias"] if "bias" in p[name] else 0.0
    q = (x @ p["q_proj"]["kernel"] + bias("q_proj")).reshape(-1, text.num_heads, hd)
    k = (x @ p["k_proj"]["kernel"] + bias("k_proj")).reshape(-1, text.num_kv_heads, hd)
    v = (x @ p["v_proj"]["kernel"] + bias("v_proj")).reshape(-1, text.num_kv_heads, hd)
    inv_freq = inverse_frequencies(hd, text.rope_theta, text.rope_scaling_dict)
    q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
    group = text.num_heads // text.num_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    probs = _softmax(np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd), visible[None])
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(x.shape[0], -1)
    return out @ p["o_proj"]["kernel"], probs


def forward_logits(params, config: ModelConfig, batch: dict, features=None, errors=(), attention_probs=None):
    """Logits (B, L, V) in float64. ``params`` unscanned; ``features`` (B, M*N, d) projected image
    features (None: no image passed at all). ``errors``: deliberate mistakes, e.g. 'shift_key_position',
    'drop_mask', 'visual_once', 'no_router'. ``attention_probs``: a list that receives each layer's main
    attention probabilities (B, H, L, L)."""
    params = _to_numpy(params)
    text = config.text
    n_tokens = config.image_tokens
    ids = np.asarray(batch["input_ids"])
    image_mask = np.asarray(batch["image_mask"], bool)
    attn = np.asarray(batch["attention_mask"], bool)
    positions = np.asarray(batch["positions"])
    image_valid = np.asarray(batch["image_valid"], bool)
    n_batch, seq_len = ids.shape
    dec = params["decoder"]
    x0 = dec["embed_tokens"]["embedding"][ids]
    if features is not None:
        features = np.asarray(features, np.float64)
        for b in range(n_batch):
            slots = np.nonzero(image_mask[b])[0]
            x0[b, slots] = features[b, : slots.size]
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    sources = [_sources(b, config, x0, features, image_mask, attn, positions, image_valid, errors)
               for b in range(n_batch)]
    multipliers = _reference_multipliers(sources, seq_len, n_tokens)
    x = x0.copy()
    for layer in range(text.num_layers):
        p = dec[f"layers_{layer}"]
        layer_probs = np.zeros((n_batch, text.num_heads, seq_len, seq_len))
        for b in range(n_batch):
            visible = causal & attn[b][None]
            if "drop_mask" in errors:
                visible = np.ones_like(visible)
            h = _rms(x[b], p["input_layernorm"]["scale"], text.rms_norm_eps)
            attn_out, probs = _gqa_attention(p["self_attn"], h, positions[b], visible, text)
            layer_probs[b] = probs
            h1 = x[b] + attn_out
            h2 = h1 + _learner_update(p, h1, probs, sources[b], multipliers[b], config, positions[b], errors)
            h = _rms(h2, p["post_attention_layernorm"]["scale"], text.rms_norm_eps)
            mlp = p["mlp"]
            gate, up = h @ mlp["gate_proj"]["kernel"], h @ mlp["up_proj"]["kernel"]
            x[b] = h2 + (_silu(gate) * up) @ mlp["down_proj"]["kernel"]
        if attention_probs is not None:
            attention_probs.append(layer_probs)
    x = _rms(x, dec["norm"]["scale"], text.rms_norm_eps)
    head = dec["embed_tokens"]["embedding"].T if text.tie_word_embeddings else dec["lm_head"]["kernel"]
    return x @ head


def forward_attention_probs(params, config: ModelConfig, batch: dict, features=None) -> np.ndarray:
    """Every layer's main attention probabilities, float64 (n_layers, B, H, L, L)."""
    probs = []
    forward_logits(params, config, batch, features, attention_probs=probs)
    return np.stack(probs)


def _sources(b, config, x0, features, image_mask, attn, positions, image_valid, errors):
    """Keys, their positions and visibility for sample b's learners."""
    wings, n_tokens = config.wings, config.image_tokens
    seq_len = x0.shape[1]
    s = wings.system_prompt_length
    index = np.arange(seq_len)
    out = {}
    shift = 1 if "shift_key_position" in errors else 0
    if wings.mask_mode == "causal":
        if features is not None:
            slots = np.nonzero(image_mask[b])[0]
            out["visual"] = dict(keys=x0[b, slots], key_pos=positions[b, slots] + shift,
                                 visible=slots[None, :] <= index[:, None])
        member = attn[b] & ~image_mask[b] & (positions[b] >= s)
        cols = np.nonzero(member)[0]
        out["textual"] = dict(keys=x0[b, cols], key_pos=positions[b, cols] + shift,
                              visible=cols[None, :] <= index[:, None])
        return out
    has_image = features is not None and image_valid[b, 0]
    if features is not None:
        if has_image:
            slots = np.nonzero(image_mask[b])[0]
            keys, key_pos = x0[b, slots], slots
        else:  # the all-zero image of a text-only sample, truncated to the sequence length
            count = min(n_tokens, seq_len)
            keys, key_pos = features[b, :count], np.arange(count)
        out["visual"] = dict(keys=keys, key_pos=key_pos + shift, visible=np.ones((seq_len, keys.shape[0]), bool))
    if has_image:
        begin = int(np.argmax(image_mask[b]))
        gathered = np.concatenate([np.arange(s, begin), np.arange(begin + n_tokens, seq_len)])
    else:
        gathered = np.arange(seq_len)
    out["gathered"] = gathered
    out["attn"] = attn[b]
    out["x0"] = x0[b]
    out["shift"] = shift
    return out


def _reference_multipliers(sources, seq_len, n_tokens):
    """Pad the textual keys of reference mode to a common length; return each sample's visual multiplier."""
    if "gathered" not in sources[0]:
        return [1.0] * len(sources)
    longest = max(src["gathered"].size for src in sources)
    pads = []
    for src in sources:
        gathered = src.pop("gathered")
        pad = longest - gathered.size
        pads.append(pad)
        gathered = np.concatenate([gathered, np.full(pad, gathered[-1])])
        cols = np.arange(longest)
        visible = (cols[None, :] <= np.arange(seq_len)[:, None]) & src.pop("attn")[cols][None, :]
        uniform = np.zeros(seq_len, bool)
        if pad:
            uniform[seq_len - pad:] = True
        src["textual"] = dict(keys=src.pop("x0")[gathered], key_pos=gathered + src.pop("shift"), visible=visible,
                              uniform_rows=uniform)
    if seq_len < n_tokens:
        return [1.0] * len(sources)
    if all(pad == 0 for pad in pads):
        return [2.0] * len(sources)
    return [1.0 + (pad != 0) for pad in pads]


def _learner_update(p, h1, probs, src, multiplier, config, positions, errors):
    wings, text = config.wings, config.text
    if not wings.enabled:
        return 0.0
    run = lambda name: _learner(p[f"{name}_learner"], h1, positions, heads=text.num_heads, theta=text.rope_theta,
                                **src[name])
    reference = wings.mask_mode == "reference"
    if wings.stage == 1:
        return run("visual") if "visual" in src else 0.0
    if reference and "visual" not in src:
        return run("textual")  # text-only inference: no router weight
    summed = probs.sum(axis=0)  # (L, L) attention summed over heads
    router = p["router"]
    logits = _silu(summed @ router["kernel"][: summed.shape[1]] + router["bias"])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if "no_router" in errors:
        weights = np.full_like(weights, 0.5)
    visual = run("visual") if "visual" in src else 0.0
    textual = run("textual")
    if reference:
        visual_times = 1.0 if "visual_once" in errors else multiplier
        return visual_times * weights[:, :1] * visual + 2.0 * weights[:, 1:] * textual
    return weights[:, :1] * visual + weights[:, 1:] * textual


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
