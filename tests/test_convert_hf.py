"""HF checkpoints (tiny random Qwen2 / Llama / SigLIP saved with ``save_pretrained``) -> wings_jax -> HF.

Parity in fp32: LLM logits (fresh learners add nothing, with or without an image in the sequence) and SigLIP
features (the Wings tower's output vs HF ``hidden_states[-2]``) within 1e-4 of torch; the ``hf-llm`` export
reloads in ``transformers`` with logits within 1e-5 of the JAX model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from test_convert_reference import hf_llm_config, hf_siglip_vision_config

from convert import jax_to_torch, torch_to_jax
from wings_jax.checkpoint import load_params
from wings_jax.model import WingsModel
from wings_jax.vision import SiglipVisionTower

SEQ_LEN, IMAGE_START, IMAGE_TOKENS = 24, 3, 16


def build_hf_checkpoints(tmp_path, text: str, full_siglip: bool):
    """Save a random HF LLM and SigLIP (with its text tower when ``full_siglip``); return the torch models."""
    torch.manual_seed(0)
    llm = transformers.AutoModelForCausalLM.from_config(hf_llm_config(text)).eval()
    llm.save_pretrained(tmp_path / "llm")
    vision_config = hf_siglip_vision_config()
    if full_siglip:
        text_config = transformers.SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=100, bos_token_id=1,
                                                    eos_token_id=2, pad_token_id=0)
        siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=text_config.to_dict(),
                                                                    vision_config=vision_config.to_dict()))
    else:
        siglip = transformers.SiglipVisionModel(vision_config)
    siglip.eval().save_pretrained(tmp_path / "siglip")
    return llm, siglip.vision_model if full_siglip else siglip


def _batch(rng: np.random.Generator, with_image: bool) -> dict:
    image_mask = np.zeros((1, SEQ_LEN), bool)
    batch = {
        "input_ids": rng.integers(0, 256, (1, SEQ_LEN)).astype(np.int32),
        "image_mask": image_mask,
        "positions": np.arange(SEQ_LEN, dtype=np.int32)[None],
        "attention_mask": np.ones((1, SEQ_LEN), bool),
        "labels": np.full((1, SEQ_LEN), -100, np.int32),
    }
    if with_image:
        image_mask[0, IMAGE_START:IMAGE_START + IMAGE_TOKENS] = True
        batch["input_ids"][image_mask] = 0
        batch["pixel_values"] = rng.uniform(-1, 1, (1, 1, 28, 28, 3)).astype(np.float32)
        batch["image_valid"] = np.ones((1, 1), bool)
    return batch


def _torch_logits(llm, batch: dict, features: np.ndarray | None) -> np.ndarray:
    """The HF LLM's logits, with the image features placed at the image positions of the embeddings."""
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(torch.from_numpy(batch["input_ids"]).long())
        if features is not None:
            embeds[torch.from_numpy(batch["image_mask"])] = torch.from_numpy(np.array(features[0]))
        return llm(inputs_embeds=embeds).logits.numpy()


@pytest.mark.parametrize("text,full_siglip,scan,projector_file", [
    ("tiny_qwen2", True, False, True),
    ("tiny_llama", False, True, False),
])
def test_hf_checkpoints_convert_with_parity_and_export_back(tmp_path, text, full_siglip, scan, projector_file):
    llm, siglip = build_hf_checkpoints(tmp_path, text, full_siglip)
    rng = np.random.default_rng(0)
    projector = {"model.mm_projector.0.weight": rng.standard_normal((64, 32)).astype(np.float32),
                 "model.mm_projector.0.bias": rng.standard_normal(64).astype(np.float32),
                 "model.mm_projector.2.weight": rng.standard_normal((64, 64)).astype(np.float32),
                 "model.mm_projector.2.bias": rng.standard_normal(64).astype(np.float32)}
    save_file(projector, str(tmp_path / "projector.safetensors"))
    argv = ["--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "siglip"), "--dst", str(tmp_path / "jax"),
            "--lora-dim", "8", "--system-prompt-length", "3"]
    argv += ["--scan"] if scan else []
    argv += ["--projector", str(tmp_path / "projector.safetensors")] if projector_file else []
    assert torch_to_jax.main(argv) == 0
    params, config = load_params(tmp_path / "jax")
    assert (config.wings.stage, config.wings.lora_dim, config.vision.kept_layers, config.scan_layers) == (1, 8, 2, scan)

    layers = [params["decoder"]["layers"]] if scan else [params["decoder"][f"layers_{i}"] for i in range(2)]
    for layer in layers:
        for learner in ("visual_learner", "textual_learner"):
            for proj in "qkvo":
                a, b = layer[learner][f"{proj}_a"]["kernel"], layer[learner][f"{proj}_b"]["kernel"]
                assert not b.any() and 0.01 < a.std() < 0.03 and np.abs(a).max() <= 0.04 + 1e-6
    if projector_file:
        placed = params["projector"]
        np.testing.assert_array_equal(placed["linear_0"]["kernel"], projector["model.mm_projector.0.weight"].T)
        np.testing.assert_array_equal(placed["linear_1"]["bias"], projector["model.mm_projector.2.bias"])

    model = WingsModel(config)
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b, method=WingsModel.logits))
    text_batch, image_batch = _batch(rng, with_image=False), _batch(rng, with_image=True)
    text_logits = np.asarray(logits(params, text_batch))
    assert np.abs(text_logits - _torch_logits(llm, text_batch, None)).max() <= 1e-4

    features = model.apply({"params": params}, image_batch["pixel_values"], image_batch["image_valid"],
                           method=WingsModel.encode_images)
    image_logits = np.asarray(logits(params, image_batch))
    assert np.abs(image_logits - _torch_logits(llm, image_batch, features)).max() <= 1e-4

    tower = SiglipVisionTower(config.vision, scan_layers=scan)
    pixels = image_batch["pixel_values"][:, 0]
    jax_features = tower.apply({"params": params["vision_tower"]}, jnp.asarray(pixels))
    with torch.no_grad():
        torch_out = siglip(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    assert np.abs(np.asarray(jax_features) - torch_out.hidden_states[-2].numpy()).max() <= 1e-4

    assert jax_to_torch.main(["--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hf"), "--format", "hf-llm"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(llm)
    with torch.no_grad():
        reloaded_logits = reloaded(torch.from_numpy(text_batch["input_ids"]).long()).logits.numpy()
    assert np.abs(reloaded_logits - text_logits).max() <= 1e-5
