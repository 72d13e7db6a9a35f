"""Memory of a training step as the sequence grows (the one image of the config stays fixed).

    python -m bench.memory_scaling --config configs/bench_small.py [--lengths=1024,2048,4096]
        [--backends=xla,flash,cpu_flash]

For every (attention backend, length) the step is compiled and XLA's memory plan read: ``temp`` is
what the step needs beyond its arguments and outputs (activations, gradients, workspace), the figure
that grows with the length. On a GPU the device's peak after one executed step is reported too
(``--execute``).
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags

from bench import common
from bench.train_step import compile_step, prepare

LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "sequence lengths")
BACKENDS = flags.DEFINE_list("backends", ["xla", "flash"], "attention backends")
EXECUTE = flags.DEFINE_bool("execute", False, "also run one step (for the device's measured peak)")


def run(config, lengths: list[int], backends: list[str], execute: bool) -> dict:
    base = common.model_config(config)
    rows = []
    for backend in backends:
        model = base.replace(attention_backend=backend)
        for seq_len in lengths:
            step, state, batch = prepare(model, dict(config.learning_rates), config.batch_size, seq_len, config.seed)
            compiled, times = compile_step(step, state, batch)
            if execute:
                jax.block_until_ready(compiled(state, batch))
            memory = common.memory_report(compiled)
            rows.append({"backend": backend, "seq_len": seq_len, **memory, **times})
            logging.info("%s L=%d: temp %.3f GiB", backend, seq_len, common.gib(memory.get("temp_bytes", 0)))
    return {"benchmark": "memory_scaling", "batch_size": config.batch_size, "dtype": base.dtype,
            "remat_policy": base.remat_policy, "rows": rows}


def report(results: dict) -> None:
    table = []
    for row in results["rows"]:
        first = next(r for r in results["rows"] if r["backend"] == row["backend"])
        ratio = row["temp_bytes"] / first["temp_bytes"]
        shown = f"temp {common.gib(row['temp_bytes']):.3f} GiB ({ratio:.2f}x L={first['seq_len']})"
        if "device_peak_bytes" in row:
            shown += f", device peak {common.gib(row['device_peak_bytes']):.3f} GiB"
        table.append((f"{row['backend']} L={row['seq_len']}", shown))
    common.print_table(f"training-step memory (batch {results['batch_size']}, {results['dtype']}, "
                       f"remat {results['remat_policy']})", table)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    results = run(common.CONFIG.value, [int(n) for n in LENGTHS.value], BACKENDS.value, EXECUTE.value)
    report(results)
    common.write_json("memory_scaling", results)


if __name__ == "__main__":
    app.run(main)
