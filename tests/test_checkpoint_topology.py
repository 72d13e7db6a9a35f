"""Checkpoints written from params sharded over 8 devices load, as host arrays, in a process with one device:
a model trained on a pod or a GPU must open on a laptop. Orbax's default restore puts each array back on the
devices that wrote it and fails there ("topology mismatch")."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import checkpointing
from wings_jax.checkpoint import save_params
from wings_jax.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
READ_ON_ONE_DEVICE = """
import sys
import numpy as np
from flax import traverse_util
from train.checkpointing import restore_params
from wings_jax.checkpoint import load_params
kind, source, out = sys.argv[1:]
params = load_params(source)[0] if kind == "model" else restore_params(source)[0]
leaves = traverse_util.flatten_dict(params, sep="/")
assert all(isinstance(leaf, np.ndarray) for leaf in leaves.values()), {k: type(v) for k, v in leaves.items()}
np.savez(out, **leaves)
"""


def sharded_params() -> dict:
    """A small params tree over 8 devices: fsdp x tensor sharded, replicated, and a scalar leaf."""
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    rng = np.random.default_rng(0)
    placed = {
        "decoder/kernel": (rng.standard_normal((8, 6), np.float32), P("fsdp", "tensor")),
        "decoder/bias": (rng.standard_normal(6, np.float32), P()),
        "router/scale": (np.float32(0.5), P()),
    }
    return traverse_util.unflatten_dict({
        path: jax.device_put(value, NamedSharding(mesh, spec)) for path, (value, spec) in placed.items()
    }, sep="/")


def read_on_one_device(kind: str, source: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{kind}.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-c", READ_ON_ONE_DEVICE, kind, str(source), str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    # every saved item has a handler, so Orbax warns of none it "could not restore" (the data item)
    assert "could not be restored" not in result.stderr, result.stderr[-4000:]
    with np.load(out) as saved:
        return dict(saved)


def assert_same_leaves(read: dict, params: dict) -> None:
    expected = traverse_util.flatten_dict(params, sep="/")
    assert sorted(read) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(read[path], np.asarray(value), err_msg=path)


def test_model_checkpoint_from_eight_devices_loads_on_one(tmp_path):
    params = sharded_params()
    save_params(tmp_path / "model", params, ModelConfig())
    assert_same_leaves(read_on_one_device("model", tmp_path / "model", tmp_path), params)


def test_training_checkpoint_from_eight_devices_gives_its_params_on_one(tmp_path):
    params = sharded_params()
    state = {"params": params, "opt_state": jax.tree.map(lambda x: 2 * x, params), "step": np.int32(3)}
    manager = checkpointing.make_manager(tmp_path / "checkpoints", keep=1, async_save=False)
    checkpointing.save(manager, 3, state, data_state={"position": 0})
    manager.close()
    assert_same_leaves(read_on_one_device("training", tmp_path / "checkpoints", tmp_path), params)
