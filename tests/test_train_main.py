"""train.main end to end on the demo recipe (tiny sizes): two stages, the demo report, a non-finite
loss stopping the run, and config validation."""

import importlib.util
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from train.checkpointing import restore_params
from train.main import NonFiniteLossError, run
from train.recipe import ConfigError, validate_config
from wings_jax.checkpoint import save_params

REPO = Path(__file__).resolve().parents[1]


def demo_config(**stage_overrides):
    """configs/demo.py shrunk to a few steps on a few images."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.demo.n_train, config.demo.n_eval, config.demo.examples = 64, 4, 3
    # The 8 test devices as fsdp=4 x tensor=2: batches of 4 rows over 4 batch shards.
    config.sharding.mesh.update(fsdp=4, tensor=2)
    for name in ("stage1", "stage2"):
        config[name].update(dict(num_steps=3, batch_size=4, save_every=1, async_checkpoints=False))
        config[name].update(stage_overrides)
    return config


def flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.slow
def test_two_stages_then_demo_report(tmp_path, capsys):
    results = run(demo_config(), tmp_path)
    assert [r.name for r in results] == ["stage1", "stage2"]
    assert [r.final_step for r in results] == [3, 3]
    stage1, _ = restore_params(tmp_path / "stage1" / "checkpoints")
    stage2, _ = restore_params(tmp_path / "stage2" / "checkpoints")
    stage1, stage2 = flat(stage1), flat(stage2)
    # Stage 2 started from stage 1: the vision tower (frozen in both, and initialised from another
    # seed in stage 2) is stage 1's; the router is new.
    vision = [k for k in stage1 if k.startswith("vision_tower/")]
    assert vision
    for key in vision:
        np.testing.assert_array_equal(stage2[key], stage1[key], err_msg=key)
    assert not any("router" in k for k in stage1) and any("router" in k for k in stage2)
    assert json.loads((tmp_path / "stage2" / "model_config.json").read_text())["wings"]["stage"] == 2

    records = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "grad_norm", "tokens_per_s", "step_time_s", "lr/llm", "lr/router",
            "bad_records/missing_image"} <= records[0].keys()
    assert "lr/vision_tower" not in records[0]
    assert list((tmp_path / "stage2" / "tb").iterdir()), "no TensorBoard events written"
    out = capsys.readouterr().out
    for expected in ("[stage1] 3 steps", "[stage2] bad records: none", "Loss curves", "stage2 loss",
                     "Held-out accuracy after stage2", "colour", "Examples"):
        assert expected in out, f"{expected!r} not in the console output"

    # Rerunning a finished run trains nothing more.
    rerun = run(demo_config(), tmp_path)
    assert [r.records for r in rerun] == [[], []]

    # A stage can start from a converted checkpoint (params + model config), e.g. stage 2 alone. Its
    # vision tower is shifted so that it cannot be mistaken for a fresh initialisation; frozen, it
    # must come out exactly as loaded.
    converted = {k: v + 0.5 if k.startswith("vision_tower/") else v for k, v in stage2.items()}
    converted = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in converted.items()})
    save_params(tmp_path / "converted", converted, results[1].model_config)
    config = demo_config(num_steps=1)
    config.stages, config.init_from, config.stage2.init_from = "stage2", str(tmp_path / "converted"), ""
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "data").symlink_to(tmp_path / "data")
    run(config, tmp_path / "alone")
    alone = flat(restore_params(tmp_path / "alone" / "stage2" / "checkpoints")[0])
    for key in vision:
        np.testing.assert_array_equal(alone[key], stage2[key] + 0.5, err_msg=key)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = demo_config(warmup_ratio=0.0)
    config.stages = "stage1"
    config.stage1.num_steps = 6
    config.stage1.learning_rates.projector = 1e30  # the first update makes the activations overflow
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as error:
        run(config, tmp_path)
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert 2 <= bad_step <= 6
    assert f"Last good checkpoint: step {bad_step - 1}" in str(error.value)
    records = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == bad_step and not math.isfinite(records[-1]["loss"])
    params, step = restore_params(tmp_path / "stage1" / "checkpoints")
    assert step == bad_step - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_config_validation_lists_every_bad_field():
    config = demo_config()
    config.stage1.batch_size = 6
    config.stage1.grad_accum = 4
    config.stage2.learning_rates.llm = -1.0
    config.stage1.learning_rates.router = 1e-3
    config.stage2.data.overflow = "wrap"
    config.stages = "stage1,stage3"
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    message = str(error.value)
    for expected in ("stage1.batch_size: 6 is not divisible by grad_accum=4",
                     "stage1.learning_rates.router: the model has no router (Wings stage 1)",
                     "stages: names 'stage3'"):
        assert expected in message
    config.stages = "stage1,stage2"
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert "stage2.learning_rates.llm: -1.0, expected >= 0" in str(error.value)
    assert "data.overflow='wrap'" in str(error.value)
