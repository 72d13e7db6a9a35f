"""A training run killed with SIGKILL and rerun ends bit for bit where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from train.checkpointing import restore_params

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
SAVE_EVERY = 4
KILL_AFTER = 10  # steps logged before the kill: not a checkpoint step, so steps 9-10 are redone
ARGS = [
    "--config", str(REPO / "configs" / "demo.py"),
    "--config.stages=stage1", f"--config.stage1.num_steps={STEPS}", f"--config.stage1.save_every={SAVE_EVERY}",
    "--config.stage1.batch_size=4", "--config.stage1.keep_checkpoints=2",
    "--config.demo.n_train=64", "--config.demo.n_eval=4", "--config.demo.report=False",
    # sharded over the 8 test devices (conftest's XLA_FLAGS): batches of 4 over fsdp=4, tensor=2
    "--config.sharding.mesh.fsdp=4", "--config.sharding.mesh.tensor=2",
]


def train_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "train.main", *ARGS, "--workdir", str(workdir)]


def losses(workdir: Path) -> list[tuple[int, float]]:
    lines = (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def logged_steps(workdir: Path) -> int:
    path = workdir / "stage1" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    # A shared compilation cache: the later runs load the executables the first one compiled.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_command(whole), cwd=REPO, env=env, check=True, capture_output=True)

    process = subprocess.Popen(train_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_steps(killed) < KILL_AFTER and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    steps_at_kill = logged_steps(killed)
    assert KILL_AFTER <= steps_at_kill < STEPS

    subprocess.run(train_command(killed), cwd=REPO, env=env, check=True, capture_output=True)

    # Same losses at every step (the data order survived), each step logged once.
    assert losses(killed) == losses(whole)
    assert [step for step, _ in losses(whole)] == list(range(1, STEPS + 1))
    whole_params, whole_step = restore_params(whole / "stage1" / "checkpoints")
    killed_params, killed_step = restore_params(killed / "stage1" / "checkpoints")
    assert whole_step == killed_step == STEPS
    flat_whole = traverse_util.flatten_dict(whole_params)
    flat_killed = traverse_util.flatten_dict(killed_params)
    assert flat_whole.keys() == flat_killed.keys()
    for path, value in flat_whole.items():
        np.testing.assert_array_equal(flat_killed[path], value, err_msg="/".join(path))
