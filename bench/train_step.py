"""One full training step (forward, backward, optimizer update of the stage's trainable groups).

    python -m bench.train_step --config configs/bench_small.py [--config.seq_len=2048]
        [--config.model.attention_backend=flash] [--config.model.remat_policy=full]

Prints and writes (``--json``): tokens/s, achieved model TFLOP/s (``bench.flops``), MFU against the
dense matmul peak measured in the same run on the same dtype (sampled after every timed step, the best
sample taken), step time median and spread, memory, compile time.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from absl import app

from bench import common
from bench.flops import train_step_flops
from train.optim import build_optimizer, optimizer_labels
from train.state import create_train_state
from train.step import make_train_step
from wings_jax.attention import resolve_backend
from wings_jax.config import ModelConfig
from wings_jax.model import WingsModel, init_params


def prepare(model: ModelConfig, learning_rates: dict, batch_size: int, seq_len: int, seed: int = 0):
    """(jitted step, initial train state, batch) for one stage's training step."""
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(seed))
    tx, _ = build_optimizer(shapes, learning_rates, total_steps=1000, warmup_ratio=0.0, weight_decay=0.0)
    step = make_train_step(WingsModel(model), tx, optimizer_labels(shapes, learning_rates))
    state = create_train_state(model, tx, jax.random.PRNGKey(seed), seq_len)
    return step, state, common.synthetic_batch(model, batch_size, seq_len, seed)


def compile_step(step, state, batch):
    """The compiled step and the seconds spent tracing + lowering and compiling."""
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def run(config) -> dict:
    model = common.model_config(config)
    learning_rates = dict(config.learning_rates)
    step, state, batch = prepare(model, learning_rates, config.batch_size, config.seq_len, config.seed)
    compiled, compile_times = compile_step(step, state, batch)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    for _ in range(config.warmup_steps):
        one_step()
    peak_meter = common.MatmulPeak(model.dtype)
    peak_meter.sample(repeats=5)
    times = []
    for _ in range(config.steps):  # a peak sample after every step: both see the same spells of load
        times += common.timings(one_step, 1)
        peak_meter.sample()
    memory = common.memory_report(compiled)
    peak = peak_meter.tflops
    flops = train_step_flops(model, {k: np.asarray(v) for k, v in batch.items()}, set(learning_rates))
    timing = common.spread(times)
    achieved = flops["total"] / timing["median_s"] / 1e12
    tokens = config.batch_size * config.seq_len
    return {
        "benchmark": "train_step", "seq_len": config.seq_len, "batch_size": config.batch_size,
        "dtype": model.dtype, "attention_backend": resolve_backend(model.attention_backend, model.dtype, config.seq_len,
                                                                   config.seq_len),
        "remat_policy": model.remat_policy, "scan_layers": model.scan_layers,
        "tokens_per_s": tokens / timing["median_s"], "model_tflops_per_step": flops["total"] / 1e12,
        "flops_by_part": flops, "achieved_tflops": achieved, "matmul_peak_tflops": peak, "mfu": achieved / peak,
        "mfu_fastest_step": flops["total"] / timing["min_s"] / 1e12 / peak, "matmul_peak_samples": peak_meter.samples,
        "step_time": timing, "memory": memory, **compile_times,
    }


def report(results: dict) -> None:
    timing, memory = results["step_time"], results["memory"]
    rows = [
        ("sequence length x batch", f"{results['seq_len']} x {results['batch_size']}"),
        ("attention / remat / dtype", f"{results['attention_backend']} / {results['remat_policy']} / "
                                      f"{results['dtype']}"),
        ("step time median (s)", timing["median_s"]),
        ("step time min / max / IQR (s)", f"{timing['min_s']:.4g} / {timing['max_s']:.4g} / {timing['iqr_s']:.3g}"),
        ("tokens/s", results["tokens_per_s"]),
        ("model TFLOP per step", results["model_tflops_per_step"]),
        ("achieved TFLOP/s", results["achieved_tflops"]),
        ("measured matmul peak TFLOP/s",
         f"{results['matmul_peak_tflops']:.4g} (best of {results['matmul_peak_samples']} samples over the run)"),
        ("MFU (median step)", f"{100 * results['mfu']:.1f} %"),
        ("MFU (fastest step)", f"{100 * results['mfu_fastest_step']:.1f} %"),
        ("lower / compile (s)", f"{results['lower_s']:.2f} / {results['compile_s']:.2f}"),
        ("host memory", common.host_memory_settings()),
    ]
    rows += [(f"memory {name} (GiB)", common.gib(value)) for name, value in memory.items()]
    common.print_table("training step", rows)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    results = run(common.CONFIG.value)
    report(results)
    common.write_json("train_step", results)


if __name__ == "__main__":
    app.run(main)
