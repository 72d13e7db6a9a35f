"""Qwen2 and Llama (llama3 RoPE scaling) decoders against transformers' torch models in fp32.

The learners absent (wings disabled) the logits match torch within 1e-4; with freshly initialised
learners (B factors zero) they are bit-identical to the learner-free model.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.model import WingsModel, init_params
from wings_jax.presets import TINY_LLAMA, TINY_QWEN2, tiny_model

TOLERANCE = 1e-4


def hf_model(text):
    common = dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads, rms_norm_eps=text.rms_norm_eps, rope_theta=text.rope_theta,
        tie_word_embeddings=text.tie_word_embeddings, max_position_embeddings=text.max_position_embeddings,
        attn_implementation="eager",
    )
    if text.architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_scaling=text.rope_scaling_dict, **common))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharp weights: O(1) activations so that any mistake shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    return model.eval()


def load_llm(params, model, scanned):
    """Copy the torch LLM weights into a wings_jax params tree (Linear (out, in) -> kernel (in, out))."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    decoder = params["decoder"]
    decoder["embed_tokens"]["embedding"] = state["model.embed_tokens.weight"]
    decoder["norm"]["scale"] = state["model.norm.weight"]
    if "lm_head" in decoder:
        decoder["lm_head"]["kernel"] = state["lm_head.weight"].T
    n_layers = model.config.num_hidden_layers

    def layer_tensor(suffix, transpose):
        arrays = [state[f"model.layers.{i}.{suffix}"] for i in range(n_layers)]
        arrays = [a.T if transpose else a for a in arrays]
        return np.stack(arrays) if scanned else arrays

    names = {("self_attn", p): f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    names.update({("mlp", p): f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")})
    for (group, proj), torch_name in names.items():
        for leaf, suffix, transpose in (("kernel", "weight", True), ("bias", "bias", False)):
            if f"model.layers.0.{torch_name}.{suffix}" not in state:
                continue
            values = layer_tensor(f"{torch_name}.{suffix}", transpose)
            for i in range(1 if scanned else n_layers):
                layer = decoder["layers"] if scanned else decoder[f"layers_{i}"]
                layer[group][proj][leaf] = values if scanned else values[i]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        values = layer_tensor(f"{norm}.weight", False)
        for i in range(1 if scanned else n_layers):
            layer = decoder["layers"] if scanned else decoder[f"layers_{i}"]
            layer[norm]["scale"] = values if scanned else values[i]
    return params


def text_batch(config, lengths, seed=0):
    rng = np.random.default_rng(seed)
    samples = [Sample(rng.integers(0, config.text.vocab_size, n).tolist()) for n in lengths]
    return {k: v for k, v in pack_batch(samples, config, max(lengths)).items() if k != "pixel_values"}


@pytest.mark.parametrize("text", [TINY_QWEN2, TINY_LLAMA], ids=["qwen2", "llama3"])
@pytest.mark.parametrize("scanned", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("backend", ["xla", "cpu_flash"])
def test_logits_match_transformers(text, scanned, backend):
    config = tiny_model(text=text.architecture == "qwen2" and "tiny_qwen2" or "tiny_llama", scan_layers=scanned)
    config = config.replace(wings=dataclasses.replace(config.wings, enabled=False), attention_backend=backend)
    torch_model = hf_model(config.text)
    params = load_llm(jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0))),
                      torch_model, scanned)
    batch = text_batch(config, [40, 27])  # right-padded second row
    logits = np.asarray(WingsModel(config).apply({"params": params}, batch, mode="logits"))
    with torch.no_grad():
        expected = torch_model(
            input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
            attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        ).logits.numpy()
    real = batch["attention_mask"]
    error = np.abs(logits[real] - expected[real]).max()
    assert np.abs(expected).max() > 1.0
    print(f"{text.architecture} scanned={scanned} {backend}: max abs logit error {error:.3g}")
    assert error <= TOLERANCE, f"max abs logit error {error:.3g}"


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", ["causal", "reference"])
def test_fresh_learners_change_nothing(stage, mode):
    """Fresh learners add exactly zero: logits bit-identical to the model without learners in stage 1.
    In stage 2 the router's value channels ride in the main attention's value product, whose wider
    matmul rounds differently: equal there to float32 rounding."""
    config = tiny_model(scan_layers=True)
    config = config.replace(wings=dataclasses.replace(config.wings, stage=stage, mask_mode=mode))
    plain = config.replace(wings=dataclasses.replace(config.wings, enabled=False))
    params = init_params(config, jax.random.PRNGKey(1))
    plain_params = {k: v for k, v in params.items() if k != "decoder"}
    plain_params["decoder"] = dict(params["decoder"])
    plain_params["decoder"]["layers"] = {
        k: v for k, v in params["decoder"]["layers"].items() if k not in ("visual_learner", "textual_learner", "router")
    }
    size = config.vision.image_size
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (size, size, 3)).astype(np.float32)
    batch = pack_batch([Sample([5, 6, 7, IMAGE_PLACEHOLDER, 8, 9], images=[image]), Sample([3, 4, 5, 6])], config, 24)
    with_learners = WingsModel(config).apply({"params": params}, batch, mode="logits")
    without = WingsModel(plain).apply({"params": plain_params}, batch, mode="logits")
    if stage == 1:
        np.testing.assert_array_equal(np.asarray(with_learners), np.asarray(without))
    else:
        np.testing.assert_allclose(np.asarray(with_learners), np.asarray(without), rtol=0, atol=1e-6)
