"""``python -m train.main`` on a mesh: the demo's stage 1 on 8 simulated devices (fsdp=4 x tensor=2) gives
the losses of one device, resumes on another mesh (data=2 x fsdp=2 x tensor=2) where one device resumes on its own,
and a mesh that cannot work stops the run with a clear message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_STEPS, ALL_STEPS = 2, 4
TOLERANCE = 1e-5
# Batches of 8 in two micro-batches of 4: each micro-batch spreads over the 4 batch shards (data x fsdp) of
# either mesh.
ARGS = [
    "--config", str(REPO / "configs" / "demo.py"), "--config.stages=stage1",
    "--config.stage1.batch_size=8", "--config.stage1.grad_accum=2", f"--config.stage1.save_every={FIRST_STEPS}",
    "--config.stage1.async_checkpoints=False",
    "--config.demo.n_train=64", "--config.demo.n_eval=4", "--config.demo.report=False",
]


def start(workdir: Path, devices: int, mesh: dict, steps: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    mesh_args = [f"--config.sharding.mesh.{axis}={size}" for axis, size in mesh.items()]
    command = [sys.executable, "-m", "train.main", *ARGS, *mesh_args, f"--config.stage1.num_steps={steps}",
               "--workdir", str(workdir)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


def losses(workdir: Path) -> list[tuple[int, float]]:
    lines = (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_eight_devices_match_one_and_resume_on_another_mesh(tmp_path):
    """Two runs side by side, each stopped after 2 steps and resumed to 4: one device throughout, and
    fsdp=4 x tensor=2 resumed on data=2 x fsdp=2 x tensor=2."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    chains = [(single, 1, {}, {}), (sharded, 8, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2})]
    first = [start(workdir, devices, mesh, FIRST_STEPS) for workdir, devices, mesh, _ in chains]
    for process in first:
        finish(process)
    # (a) Same losses on one device and on 8 (the demo's Adam, eps=1e-8).
    assert [step for step, _ in losses(sharded)] == [1, 2]
    np.testing.assert_allclose([x for _, x in losses(sharded)], [x for _, x in losses(single)], rtol=0,
                               atol=TOLERANCE)

    resumed = [start(workdir, devices, mesh, ALL_STEPS) for workdir, devices, _, mesh in chains]
    outputs = [finish(process) for process in resumed]
    # (c) Both continue from their step-2 checkpoint; the sharded one on a mesh it was not saved on.
    for output in outputs:
        assert f"resuming at step {FIRST_STEPS} of {ALL_STEPS}" in output
    assert "mesh data=2 x fsdp=2 x tensor=2 over 8 devices" in outputs[1]
    assert [step for step, _ in losses(sharded)] == [1, 2, 3, 4]
    np.testing.assert_allclose([x for _, x in losses(sharded)], [x for _, x in losses(single)], rtol=0,
                               atol=TOLERANCE)


@pytest.mark.parametrize("mesh, message", [
    ({"fsdp": 3}, "sharding.mesh: mesh data=1 x fsdp=3 x tensor=1 needs 3 devices, but there are 8"),
    ({"fsdp": 1, "tensor": 8}, "[stage1] config.sharding.mesh gives data=1 x fsdp=1 x tensor=8, which does not fit "
                               "this stage (batch_size=8, grad_accum=2): the model does not divide over the mesh:\n"
                               "  text.num_heads=4 is not divisible by mesh tensor=8"),
])
def test_a_mesh_that_cannot_work_stops_the_run_with_the_reason(tmp_path, mesh, message):
    process = start(tmp_path, 8, mesh, FIRST_STEPS)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert message in output
    assert not list(tmp_path.glob("stage1/checkpoints/*"))
