"""Train Wings: ``python -m train.main --config configs/<recipe>.py[:args] [--config.key=value ...] --workdir DIR``.

Runs the config's stages in order, each in ``DIR/<stage name>/`` (checkpoints, metrics.jsonl,
TensorBoard events, model_config.json). Rerunning the same command resumes from the latest
checkpoint, on whatever mesh the config now gives; a finished stage is skipped. Without ``--config``
the demo recipe runs.

The state is sharded over the mesh of ``config.sharding`` (FSDP over every device by default;
e.g. ``--config.sharding.mesh.fsdp=4 --config.sharding.mesh.tensor=2``). Several processes (TPU pod,
SLURM, or ``config.sharding.distributed``) each run the same command; each reads its own share of
every batch, and process 0 writes the metrics and the model config (the others write their metrics
under ``DIR/<stage>/process_<index>/``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from sharding import Partitioner, ShardingError, distributed
from sharding.mesh import describe
from train import checkpointing
from train.data import make_train_iterator
from train.metrics import MetricsWriter, run_summary
from train.optim import build_optimizer, optimizer_labels
from train.recipe import (
    PREVIOUS_STAGE,
    WORKDIR_MARK,
    ConfigError,
    model_config_from,
    runtime_data_config,
    stage_names,
    trained_groups,
    validate_config,
)
from train.state import abstract_train_state, create_train_state
from train.step import make_train_step
from wings_jax.checkpoint import CONFIG_FILE, load_params
from wings_jax.config import ModelConfig
from wings_jax.conversation import system_prompt_length
from wings_jax.model import WingsModel, init_params
from wings_jax.sources import make_source

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "training recipe (configs/*.py[:args])")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and generated data")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the run stops, checkpoints stay as they were."""


@dataclasses.dataclass
class StageResult:
    name: str
    directory: Path
    model_config: ModelConfig
    final_step: int
    records: list  # this run's metric records (resumed runs: those after the resume step)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> list[StageResult]:
    """Validate ``config``, then train its stages in ``workdir``; returns one result per stage."""
    validate_config(config)
    try:
        partitioner = Partitioner.from_config(config.sharding)
    except ShardingError as error:
        raise ConfigError(f"invalid training config:\n  sharding.mesh: {error}") from error
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if "demo" in config:
        from train.demo import prepare_demo_data

        if jax.process_index() == 0:
            prepare_demo_data(config, workdir)
        wait_for_all_processes("demo data written")
    tokenizer = load_tokenizer(config.tokenizer.replace(WORKDIR_MARK, str(workdir)))
    results = []
    for index, name in enumerate(stage_names(config)):
        previous = results[-1].directory / CHECKPOINT_DIR if results else None
        results.append(train_stage(config, name, index, workdir, tokenizer, previous, partitioner))
    if "demo" in config and config.demo.report:
        from train.demo import report_demo

        if jax.process_count() == 1:
            report_demo(config, workdir, tokenizer, results)
        else:
            logging.info("the demo report runs in single-process runs only; rerun with one process for it")
    return results


def wait_for_all_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing to wait for in one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initial_params(source: str, previous_checkpoints: Path | None):
    """(params, model config or None) to start a stage from: a converted checkpoint (with its
    config), a stage's checkpoint directory, or the previous stage's last checkpoint."""
    if source == PREVIOUS_STAGE:
        source = str(previous_checkpoints)
    if (Path(source) / CONFIG_FILE).is_file():
        logging.info("initialising from the converted checkpoint %s", source)
        return load_params(source)
    checkpoints = find_checkpoints(Path(source))
    params, step = checkpointing.restore_params(checkpoints)
    logging.info("initialising from step %d of %s", step, checkpoints)
    return params, None


def find_checkpoints(source: Path) -> Path:
    """The checkpoint directory in ``source``: a run's workdir with one stage, a stage's directory, or
    the checkpoint directory itself."""
    if (source / CHECKPOINT_DIR).is_dir():
        return source / CHECKPOINT_DIR
    stages = sorted(source.glob(f"*/{CHECKPOINT_DIR}"))
    if len(stages) > 1:
        raise ValueError(f"{source} holds several stages' checkpoints {[str(p.parent) for p in stages]}; "
                         "name the stage's directory")
    return stages[0] if stages else source


def count_steps(stage: ml_collections.ConfigDict, data_config) -> int:
    """``stage.num_steps``, or ``num_epochs`` passes over every source's records."""
    if stage.num_steps != -1:
        return stage.num_steps
    records = sum(len(make_source(spec)) for spec in data_config.sources)
    steps = stage.num_epochs * records // stage.batch_size
    if steps < 1:
        raise ValueError(f"{records} records make no full batch of {stage.batch_size}")
    return steps


def check_sharding(partitioner: Partitioner, name: str, model_config: ModelConfig, stage) -> None:
    """ShardingError naming the stage and the mesh if the model or the batch does not divide over it."""
    try:
        partitioner.check(model_config, stage.batch_size, stage.grad_accum)
    except ShardingError as error:
        raise ShardingError(f"[{name}] config.sharding.mesh gives {describe(partitioner.sizes)}, which does not fit "
                            f"this stage (batch_size={stage.batch_size}, grad_accum={stage.grad_accum}): "
                            f"{error}") from error


def train_stage(config, name: str, index: int, workdir: Path, tokenizer, previous_checkpoints: Path | None,
                partitioner: Partitioner):
    """Train (or resume, or skip if finished) one stage on ``partitioner``'s mesh; returns its StageResult."""
    stage = config[name]
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    manager = checkpointing.make_manager(directory / CHECKPOINT_DIR, stage.keep_checkpoints, stage.async_checkpoints)
    latest = manager.latest_step()
    source = stage.init_from or (config.init_from if index == 0 else "")
    loaded, base = (None, None)
    if latest is None and source:
        loaded, base = initial_params(source, previous_checkpoints)
    data_config = runtime_data_config(stage, str(workdir), jax.process_count())
    tokenizer_values = {"vocab_size": len(tokenizer),
                        "system_prompt_length": system_prompt_length(tokenizer, data_config.template,
                                                                     data_config.system_prompt)}
    if latest is not None and (directory / MODEL_CONFIG_FILE).is_file():
        base = ModelConfig.load(directory / MODEL_CONFIG_FILE)
    model_config = model_config_from(config, name, tokenizer_values, base)
    wait_for_all_processes(f"{name} model config read")  # before process 0 rewrites it
    if jax.process_index() == 0:
        model_config.save(directory / MODEL_CONFIG_FILE)
    total_steps = count_steps(stage, data_config)
    if latest is not None and latest >= total_steps:
        logging.info("[%s] finished earlier (step %d of %d); skipping", name, latest, total_steps)
        manager.close()
        return StageResult(name, directory, model_config, latest, [])
    check_sharding(partitioner, name, model_config, stage)

    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), index)
    params_shape = jax.eval_shape(lambda: init_params(model_config, rng, seq_len=stage.seq_len))
    learning_rates = trained_groups(stage)
    tx, schedules = build_optimizer(
        params_shape, learning_rates, total_steps, stage.warmup_ratio, stage.weight_decay,
        b1=stage.b1, b2=stage.b2, eps=stage.eps, max_grad_norm=stage.max_grad_norm,
    )
    iterator = make_train_iterator(data_config, model_config, tokenizer, seed=config.seed + index)
    abstract_state = abstract_train_state(model_config, tx, rng, stage.seq_len)
    state_sharding = partitioner.state_shardings(model_config, abstract_state)
    if latest is None:
        state = create_train_state(model_config, tx, rng, stage.seq_len, loaded, state_sharding)
        start = 0
    else:
        # Onto this run's mesh, whichever mesh saved it.
        target = partitioner.abstract_sharded(abstract_state, state_sharding)
        state, data_states = checkpointing.restore(manager, latest, target)
        iterator.set_state(checkpointing.own_data_state(data_states, f"step {latest} in {manager.directory}"))
        start = latest
        logging.info("[%s] resuming at step %d of %d", name, start, total_steps)
    step_fn = make_train_step(WingsModel(model_config), tx, optimizer_labels(params_shape, learning_rates),
                              stage.grad_accum, state_sharding, partitioner.batch_sharding())
    step_fn = partitioner.in_context(step_fn)
    records = train_loop(name, step_fn, state, iterator, partitioner, manager, schedules, start, total_steps,
                         directory, stage.save_every)
    return StageResult(name, directory, model_config, total_steps, records)


def train_loop(name, step_fn, state, iterator, partitioner: Partitioner, manager, schedules, start: int,
               total_steps: int, directory: Path, save_every: int):
    """Run steps ``start + 1 .. total_steps``: metrics every step, a checkpoint every ``save_every`` steps
    and at the end. A non-finite loss raises NonFiniteLossError (after pending saves finish).

    ``iterator`` gives this process's rows of each batch; ``partitioner`` assembles the global batch."""
    primary = jax.process_index() == 0
    writer = MetricsWriter(directory if primary else directory / f"process_{jax.process_index()}", resume_step=start)
    started = time.perf_counter()
    records = []
    try:
        with tqdm(total=total_steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
                  disable=not primary) as bar:
            for step in range(start + 1, total_steps + 1):
                tick = time.perf_counter()
                batch = next(iterator)
                tokens = int(batch["attention_mask"].sum())  # this process's rows
                state, metrics = step_fn(state, partitioner.global_batch(batch))
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - tick
                record = step_record(metrics, schedules, step, tokens, seconds, iterator.bad_records.totals())
                writer.write(step, record)
                if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                    manager.wait_until_finished()
                    last = manager.latest_step()
                    raise NonFiniteLossError(
                        f"[{name}] non-finite loss {record['loss']} (grad norm {record['grad_norm']}) at step {step}; "
                        f"stopped. Last good checkpoint: "
                        f"{'none' if last is None else f'step {last} in {manager.directory}'}"
                    )
                records.append({"step": step, **record})
                if step % save_every == 0 or step == total_steps:
                    checkpointing.save(manager, step, state, iterator.get_state())
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                bar.update()
        manager.wait_until_finished()
    finally:
        writer.close()
        manager.close()
        iterator.close()  # Grain's worker processes and prefetch buffers go now, not when collected
    print(run_summary(name, records, iterator.bad_records.summary(), time.perf_counter() - started))
    return records


def step_record(metrics, schedules, step: int, tokens: int, seconds: float, bad_records: dict) -> dict:
    """One metrics record: loss, grad norm, lr per group (the schedule's value at this update), speed,
    cumulative bad-record counts."""
    record = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
              "label_tokens": int(metrics["num_tokens"]), "tokens_per_s": tokens / seconds, "step_time_s": seconds}
    record.update({f"lr/{group}": float(schedule(step - 1)) for group, schedule in schedules.items()})
    record.update({f"bad_records/{kind}": count for kind, count in bad_records.items()})
    return record


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        distributed.initialize(_CONFIG.value.sharding.distributed)  # before anything else touches the devices
        run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, ShardingError) as error:
        sys.exit(str(error))


if __name__ == "__main__":
    app.run(main)
