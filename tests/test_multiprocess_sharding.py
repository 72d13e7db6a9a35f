"""Two processes x four CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train three steps on
a hybrid mesh (DCN data=2 over the processes, ICI fsdp=2 x tensor=2) and match one process; their
Orbax checkpoint (with each process's data-iterator state) restores in one process onto one device.

Run as a script, this file is one of the worker processes.
"""

import os
import sys

if __name__ == "__main__":  # a worker: four host devices of its own, before JAX is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding_setup import GLOBAL_BATCH, SEQ_LEN, batches, model_config, optimizer  # noqa: E402

from sharding import Partitioner  # noqa: E402
from train import checkpointing  # noqa: E402
from train.state import abstract_train_state, create_train_state  # noqa: E402
from train.step import make_train_step  # noqa: E402
from wings_jax.model import WingsModel  # noqa: E402

PROCESSES = 2
TOLERANCE = 1e-5


def worker(process_id: int, port: int, out_dir: Path) -> None:
    """Train three steps on this process's half of every batch, save a checkpoint, write losses and params."""
    from jax.experimental import multihost_utils

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", PROCESSES, process_id)
    config = model_config()
    tx, labels = optimizer(config)
    partitioner = Partitioner.from_config({"mesh": {"fsdp": 2, "tensor": 2}, "dcn_mesh": {"data": PROCESSES}})
    partitioner.check(config, GLOBAL_BATCH)
    shardings = partitioner.state_shardings(config, abstract_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN))
    state = create_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN, state_sharding=shardings)
    step = partitioner.in_context(make_train_step(WingsModel(config), tx, labels, state_sharding=shardings,
                                                  batch_sharding=partitioner.batch_sharding()))
    rows = GLOBAL_BATCH // PROCESSES
    losses = []
    for batch in batches(config):
        local = {key: value[process_id * rows:(process_id + 1) * rows] for key, value in batch.items()}
        state, metrics = step(state, partitioner.global_batch(local))
        losses.append(float(metrics["loss"]))
    manager = checkpointing.make_manager(out_dir / "checkpoints", keep=1)
    checkpointing.save(manager, 3, state, {"position": 3, "process": process_id})
    manager.wait_until_finished()
    manager.close()
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if process_id == 0:
        np.savez(out_dir / "result.npz", losses=np.asarray(losses), **by_name(params))
    jax.distributed.shutdown()


def by_name(params) -> dict:
    """{'decoder/lm_head/kernel': array, ...}"""
    return {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_and_restore_in_one(tmp_path):
    port = free_port()
    workers = [
        subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(PROCESSES)
    ]
    # The single-process reference runs here while the workers compile.
    config = model_config()
    tx, labels = optimizer(config)
    device = jax.devices()[0]
    with jax.default_device(device):
        state = create_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN)
        step = make_train_step(WingsModel(config), tx, labels)
        ref_losses = []
        for batch in batches(config):
            state, metrics = step(state, batch)
            ref_losses.append(float(metrics["loss"]))
    reference = jax.device_get(state)
    for pid, process in enumerate(workers):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"worker {pid} failed:\n{output[-4000:]}"

    result = np.load(tmp_path / "result.npz")
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=0, atol=TOLERANCE)
    flat_reference = by_name(reference.params)
    assert set(flat_reference) == set(result.files) - {"losses"}
    for name, value in flat_reference.items():
        np.testing.assert_allclose(result[name], value, rtol=0, atol=TOLERANCE, err_msg=name)

    # The checkpoint both processes wrote, restored by this one process onto a single device.
    abstract = abstract_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN)
    single = Partitioner.from_config({"mesh": {}}, devices=[device])
    target = single.abstract_sharded(abstract, single.state_shardings(config, abstract))
    manager = checkpointing.make_manager(tmp_path / "checkpoints", keep=1)
    restored, data_states = checkpointing.restore(manager, 3, target)
    manager.close()
    assert data_states == [{"position": 3, "process": 0}, {"position": 3, "process": 1}]
    # Each process read its own shard of the data: one process cannot take over their order.
    with pytest.raises(ValueError, match="holds the data-iterator states of 2 processes, but this run has 1"):
        checkpointing.own_data_state(data_states, "step 3")
    assert int(restored.step) == 3
    for name, value in by_name(restored.params).items():
        np.testing.assert_array_equal(value, result[name], err_msg=name)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
