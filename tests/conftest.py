"""Test setup: JAX on CPU in float32 with 8 simulated devices for mesh tests; the shared tiny-checkpoint fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

from wings_jax.api import Assistant  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny saved stage-2 checkpoint with its tokenizer and a test image (tests/tiny_checkpoint.py)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return Assistant.load(checkpoint)
