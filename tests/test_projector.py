"""Projector: parity with torch Linear / GELU stacks (the reference mm_projector), identity and bad types."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wings_jax.config import ProjectorConfig
from wings_jax.projector import Projector

logger = logging.getLogger(__name__)

IN_DIM, OUT_DIM = 32, 48


def _torch_projector(depth: int) -> torch.nn.Sequential:
    """Linear(in, out), then depth - 1 times [GELU (exact), Linear(out, out)], as the reference builds it."""
    torch.manual_seed(depth)
    modules = [torch.nn.Linear(IN_DIM, OUT_DIM)]
    for _ in range(depth - 1):
        modules += [torch.nn.GELU(), torch.nn.Linear(OUT_DIM, OUT_DIM)]
    model = torch.nn.Sequential(*modules).eval()
    with torch.no_grad():  # sharp weights and biases, so that a missing bias or GELU shows
        for param in model.parameters():
            fan_in = param.shape[-1] if param.ndim == 2 else 1
            param.copy_(torch.randn(param.shape) / np.sqrt(fan_in))
    return model


def _jax_params(model: torch.nn.Sequential) -> dict:
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return {
        f"linear_{i}": {"kernel": m.weight.detach().numpy().T, "bias": m.bias.detach().numpy()}
        for i, m in enumerate(linears)
    }


@pytest.mark.parametrize("kind, depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_matches_torch_sequential(kind, depth):
    features = np.random.default_rng(0).normal(size=(2, 5, IN_DIM)).astype(np.float32) * 2
    reference = _torch_projector(depth)
    with torch.no_grad():
        expected = reference(torch.from_numpy(features)).numpy()

    projector = Projector(ProjectorConfig(kind), out_dim=OUT_DIM)
    params = _jax_params(reference)
    init_shapes = jax.tree.map(jnp.shape, nn.unbox(projector.init(jax.random.key(0), features)["params"]))
    assert jax.tree.map(np.shape, params) == init_shapes

    out = np.asarray(projector.apply({"params": params}, jnp.asarray(features)))
    error = float(np.max(np.abs(out - expected)))
    logger.info("projector %s: max abs error %.3g", kind, error)
    assert error <= 1e-5, f"{kind}: max abs error {error}"


def test_logical_axes():
    projector = Projector(ProjectorConfig("mlp2x_gelu"), out_dim=OUT_DIM)
    specs = nn.get_partition_spec(projector.init(jax.random.key(0), jnp.zeros((1, IN_DIM)))["params"])
    assert tuple(specs["linear_0"]["kernel"]) == ("vit_embed", "embed")
    assert tuple(specs["linear_1"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["linear_1"]["bias"]) == ("embed",)


def test_identity_passes_features_through():
    projector = Projector(ProjectorConfig("identity"), out_dim=IN_DIM)
    features = jax.random.normal(jax.random.key(0), (2, 3, IN_DIM))
    variables = projector.init(jax.random.key(1), features)
    assert not variables.get("params")
    np.testing.assert_array_equal(np.asarray(projector.apply(variables, features)), np.asarray(features))


def test_identity_with_different_widths_is_an_error():
    projector = Projector(ProjectorConfig("identity"), out_dim=OUT_DIM)
    with pytest.raises(ValueError, match=f"vision width {IN_DIM} to equal the LLM hidden size {OUT_DIM}"):
        projector.init(jax.random.key(0), jnp.zeros((1, IN_DIM)))


@pytest.mark.parametrize("kind", ["mlp", "mlp0x_gelu", "mlp2x_relu", "conv"])
def test_unknown_type_is_an_error(kind):
    projector = Projector(ProjectorConfig(kind), out_dim=OUT_DIM)
    with pytest.raises(ValueError, match=f"projector.type={kind!r}"):
        projector.init(jax.random.key(0), jnp.zeros((1, IN_DIM)))
