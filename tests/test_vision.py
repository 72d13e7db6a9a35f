"""SigLIP tower: parity with transformers' SiglipVisionModel (fp32), scan vs unrolled, remat, bf16, tiny preset."""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from wings_jax import attention as attention_module
from wings_jax.presets import TINY_VISION, tiny_model
from wings_jax.projector import Projector
from wings_jax.remat import maybe_remat, remat_policy
from wings_jax.vision import SiglipEncoderLayer, SiglipVisionTower

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
NUM_IMAGES = 3
LAYER_KEYS = {"layer_norm1", "layer_norm2", "self_attn", "mlp"}


def _sharpen(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-initialise every weight at unit scale (std 1/sqrt(fan_in)) so that any mismatch shows.

    HF's default 0.02-scale weights make every layer nearly the identity, which would hide
    mistakes such as a transposed kernel or a wrong softmax axis.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                std = 1.0 / np.sqrt(param[0].numel()) if "position_embedding" not in name else 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def torch_tower() -> SiglipVisionModel:
    config = SiglipVisionConfig(
        hidden_size=TINY_VISION.hidden_size, intermediate_size=TINY_VISION.intermediate_size,
        num_hidden_layers=TINY_VISION.num_layers, num_attention_heads=TINY_VISION.num_heads,
        image_size=TINY_VISION.image_size, patch_size=TINY_VISION.patch_size,
        layer_norm_eps=TINY_VISION.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = SiglipVisionModel(config).eval()
    _sharpen(model)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """(n, H, W, 3) values in [-1, 1], like normalised images."""
    size = TINY_VISION.image_size
    return np.random.default_rng(0).uniform(-1, 1, (NUM_IMAGES, size, size, 3)).astype(np.float32)


def _torch_hidden_states(model: SiglipVisionModel, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    return tuple(h.numpy() for h in out.hidden_states)


def jax_params_from_torch(model: SiglipVisionModel, kept_layers: int, scanned: bool) -> dict:
    """The tower's params from the torch weights.

    Conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out); Linear weight (out, in) -> kernel (in, out).
    """
    state = {k.removeprefix("vision_model."): v.numpy() for k, v in model.state_dict().items()}

    def linear(prefix):
        return {"kernel": state[f"{prefix}.weight"].T, "bias": state[f"{prefix}.bias"]}

    def norm(prefix):
        return {"scale": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"]}

    def layer(j):
        p = f"encoder.layers.{j}"
        return {
            "layer_norm1": norm(f"{p}.layer_norm1"),
            "layer_norm2": norm(f"{p}.layer_norm2"),
            "self_attn": {name: linear(f"{p}.self_attn.{name}") for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "mlp": {name: linear(f"{p}.mlp.{name}") for name in ("fc1", "fc2")},
        }

    params = {
        "embeddings": {
            "patch_embedding": {
                "kernel": state["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                "bias": state["embeddings.patch_embedding.bias"],
            },
            "position_embedding": {"embedding": state["embeddings.position_embedding.weight"]},
        },
        "post_layernorm": norm("post_layernorm"),
    }
    layers = [layer(j) for j in range(kept_layers)]
    if scanned and layers:
        params["layers"] = jax.tree.map(lambda *leaves: np.stack(leaves), *layers)
    else:
        params.update({f"layers_{j}": p for j, p in enumerate(layers)})
    return params


def _init_params(tower: SiglipVisionTower, pixels) -> dict:
    return nn.unbox(tower.init(jax.random.key(0), jnp.asarray(pixels))["params"])


def _shapes(tree) -> dict:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


@pytest.mark.parametrize("scanned", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0])
def test_features_match_torch_hidden_states(torch_tower, pixels, select_layer, scanned):
    config = dataclasses.replace(TINY_VISION, select_layer=select_layer)
    tower = SiglipVisionTower(config, scan_layers=scanned)
    params = jax_params_from_torch(torch_tower, config.kept_layers, scanned)
    assert _shapes(params) == _shapes(_init_params(tower, pixels)), "converted tree differs from the tower's own"

    features = np.asarray(jax.jit(tower.apply)({"params": params}, jnp.asarray(pixels)))
    expected = _torch_hidden_states(torch_tower, pixels)[select_layer]

    error = float(np.max(np.abs(features - expected)))
    logger.info("select_layer=%d scanned=%s max abs error %.3g (feature scale %.3g)",
                select_layer, scanned, error, float(np.max(np.abs(expected))))
    assert features.shape == (NUM_IMAGES, config.num_patches, config.hidden_size)
    assert np.max(np.abs(expected)) > 1.0, "the reference features are too small to reveal errors"
    assert error <= TOLERANCE, f"select_layer={select_layer} scanned={scanned}: max abs error {error} > {TOLERANCE}"


@pytest.mark.parametrize("scanned", [True, False], ids=["scan", "unrolled"])
def test_blockwise_attention_backend_matches_torch(torch_tower, pixels, scanned, monkeypatch):
    """The tower on the ``flash`` backend, its 16 patches cut into tiles of 8 queries x 6 keys (the last
    key block padded), follows the torch tower as closely as the materialised path."""
    monkeypatch.setitem(attention_module.FLASH_TILES, (jax.default_backend(), False), (8, 6))
    tower = SiglipVisionTower(TINY_VISION, scan_layers=scanned, attention_backend="flash")
    params = jax_params_from_torch(torch_tower, TINY_VISION.kept_layers, scanned)
    features = np.asarray(jax.jit(tower.apply)({"params": params}, jnp.asarray(pixels)))
    error = float(np.max(np.abs(features - _torch_hidden_states(torch_tower, pixels)[TINY_VISION.select_layer])))
    assert error <= TOLERANCE, f"scanned={scanned}: max abs error {error} > {TOLERANCE}"


def test_wings_features_differ_from_last_layer_and_post_layernorm(torch_tower, pixels):
    """Guards the parity test: the three candidate outputs are far apart, so a wrong pick would fail it."""
    hidden = _torch_hidden_states(torch_tower, pixels)
    with torch.no_grad():
        last = torch_tower(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    assert np.max(np.abs(hidden[-2] - hidden[-1])) > 0.1
    assert np.max(np.abs(hidden[-1] - last)) > 0.1


def test_param_tree_layout(pixels):
    """Names, shapes and logical axes as in the model API (HF SigLIP names, leading 'layers' axis when scanned)."""
    tower = SiglipVisionTower(TINY_VISION, scan_layers=True)
    boxed = tower.init(jax.random.key(0), jnp.asarray(pixels))["params"]
    kept, width, patch = TINY_VISION.kept_layers, TINY_VISION.hidden_size, TINY_VISION.patch_size
    shapes = _shapes(nn.unbox(boxed))
    assert set(shapes) == {"embeddings", "layers", "post_layernorm"}
    assert shapes["embeddings"]["patch_embedding"] == {"kernel": (patch, patch, 3, width), "bias": (width,)}
    assert shapes["embeddings"]["position_embedding"] == {"embedding": (TINY_VISION.num_patches, width)}
    assert set(shapes["layers"]) == LAYER_KEYS
    assert shapes["layers"]["mlp"]["fc1"] == {"kernel": (kept, width, 64), "bias": (kept, 64)}
    assert shapes["layers"]["self_attn"]["out_proj"]["kernel"] == (kept, width, width)
    assert shapes["post_layernorm"] == {"scale": (width,), "bias": (width,)}

    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "vit_embed", "vit_heads")
    assert tuple(specs["layers"]["mlp"]["fc2"]["kernel"]) == ("layers", "vit_mlp", "vit_embed")
    assert tuple(specs["embeddings"]["position_embedding"]["embedding"]) == ("vit_pos", "vit_embed")
    every_leaf_named = jax.tree.leaves(jax.tree.map(lambda leaf: isinstance(leaf, nn.Partitioned), boxed,
                                                    is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned)))
    assert all(every_leaf_named), "every parameter needs logical axis names"


def _unstack_layers(params: dict) -> dict:
    """Scanned params -> the unrolled tree (layers_{j})."""
    stacked = params["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{j}": jax.tree.map(lambda leaf, j=j: leaf[j], stacked) for j in range(count)})
    return out


def test_wrong_image_shape_is_an_error(pixels):
    tower = SiglipVisionTower(TINY_VISION)
    nchw = jnp.asarray(pixels).transpose(0, 3, 1, 2)
    message = r"pixel_values has shape \(3, 3, 28, 28\), expected \(images, \*\(28, 28, 3\)\)"
    with pytest.raises(ValueError, match=message):
        tower.init(jax.random.key(0), nchw)


def test_scan_equals_unrolled(pixels):
    scanned_tower = SiglipVisionTower(TINY_VISION, scan_layers=True)
    unrolled_tower = SiglipVisionTower(TINY_VISION, scan_layers=False)
    params = _init_params(scanned_tower, pixels)
    unrolled_params = _unstack_layers(params)
    assert _shapes(unrolled_params) == _shapes(_init_params(unrolled_tower, pixels))

    scanned_out = scanned_tower.apply({"params": params}, jnp.asarray(pixels))
    unrolled_out = unrolled_tower.apply({"params": unrolled_params}, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(scanned_out), np.asarray(unrolled_out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_attention"])
def test_remat_keeps_outputs_and_gradients(pixels, policy):
    plain = SiglipVisionTower(TINY_VISION, scan_layers=True, remat_policy="none")
    remat = SiglipVisionTower(TINY_VISION, scan_layers=True, remat_policy=policy)
    params = _init_params(plain, pixels)

    def loss(tower, p):
        return jnp.sum(tower.apply({"params": p}, jnp.asarray(pixels)) ** 2)

    plain_grads = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    remat_grads = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for (path, expected), actual in zip(jax.tree_util.tree_leaves_with_path(plain_grads),
                                        jax.tree.leaves(remat_grads), strict=True):
        # recomputation may fuse and round differently: allow float32 rounding at the gradient's own scale
        # (the patch kernel's entries reach 160), far below what a wrong gradient would give
        error = np.abs(np.asarray(actual) - np.asarray(expected)).max()
        bound = 1e-5 + 1e-6 * np.abs(np.asarray(expected)).max()
        assert error <= bound, f"{jax.tree_util.keystr(path)}: max abs error {error:.2e} > {bound:.2e}"


def test_remat_policy_names():
    assert remat_policy("none") is None
    assert maybe_remat(SiglipEncoderLayer, "none", scanned=True) is SiglipEncoderLayer
    for name in ("full", "dots", "dots_no_batch", "save_attention"):
        assert callable(remat_policy(name)), name
    with pytest.raises(ValueError, match="remat_policy='offload'"):
        remat_policy("offload")


def test_bfloat16_forward_is_finite_and_close(pixels):
    fp32 = SiglipVisionTower(TINY_VISION)
    bf16 = SiglipVisionTower(TINY_VISION, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = _init_params(fp32, pixels)
    expected = fp32.apply({"params": params}, jnp.asarray(pixels))
    bf16_params = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    features = bf16.apply({"params": bf16_params}, jnp.asarray(pixels))

    assert features.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(features)))
    relative = float(jnp.max(jnp.abs(features.astype(jnp.float32) - expected)) / jnp.max(jnp.abs(expected)))
    assert relative < 5e-2, f"bf16 features differ from fp32 by {relative:.3g} of their scale"


def test_tiny_preset_end_to_end():
    """Tiny model config -> tower -> projector -> LLM-width features, jitted, with finite gradients."""
    config = tiny_model()
    tower = SiglipVisionTower(config.vision, scan_layers=config.scan_layers, remat_policy="full")
    projector = Projector(config.projector, out_dim=config.text.hidden_size)
    size = config.vision.image_size
    pixels = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    tower_params = _init_params(tower, pixels)
    features = tower.apply({"params": tower_params}, pixels)
    projector_params = nn.unbox(projector.init(jax.random.key(2), features)["params"])

    @jax.jit
    def embed(tower_params, projector_params):
        return projector.apply({"params": projector_params}, tower.apply({"params": tower_params}, pixels))

    embeddings = embed(tower_params, projector_params)
    assert embeddings.shape == (2, config.image_tokens, config.text.hidden_size)
    assert bool(jnp.all(jnp.isfinite(embeddings)))
    grads = jax.grad(lambda tp, pp: jnp.mean(embed(tp, pp) ** 2), argnums=(0, 1))(tower_params, projector_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[0]["embeddings"]["patch_embedding"]["kernel"]).sum()) > 0
