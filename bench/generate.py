"""Generation speed: prefill time and decode tokens/s at batch 1 and 8 (``wings_jax.generate``).

    python -m bench.generate --config configs/bench_small.py [--method=cache|recompute] [--new_tokens=64]

The prompt is the benchmark's synthetic row (system prompt, one image, text) of ``config.seq_len``
tokens. Each batch size runs once to compile, then once timed; every token is timed through
``generate``'s ``on_token`` callback, which sees the chosen tokens on the host (so the times include
sampling and the device-to-host copy of each step).
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from absl import app, flags

from bench import common
from wings_jax.generate import Sampling, generate
from wings_jax.model import init_params

METHOD = flags.DEFINE_enum("method", "auto", ["auto", "cache", "recompute"], "how each token's logits are computed")
NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens generated per row (the decode target's length)")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to measure")


def timed_generation(model, params, batch, new_tokens: int, method: str) -> dict:
    """Seconds to the first token (prefill + its sampling) and between successive tokens."""
    stamps = []
    # a stop token that the vocabulary never produces keeps every row generating to the end
    sampling = Sampling(max_new_tokens=new_tokens, stop_tokens=(model.text.vocab_size,))
    start = time.perf_counter()
    generate(model, params, batch, sampling, method=method, on_token=lambda *_: stamps.append(time.perf_counter()))
    return {"prefill_s": stamps[0] - start, "per_token_s": np.diff(stamps).tolist()}


def run(config, method: str, new_tokens: int, batch_sizes: list[int]) -> dict:
    model = common.model_config(config)
    params = init_params(model, jax.random.PRNGKey(config.seed))
    results = {"benchmark": "generate", "prompt_len": config.seq_len, "new_tokens": new_tokens, "method": method,
               "dtype": model.dtype, "by_batch": {}}
    for batch_size in batch_sizes:
        batch = common.synthetic_batch(model, batch_size, config.seq_len, config.seed)
        batch = {k: v for k, v in batch.items() if k != "labels"}
        start = time.perf_counter()
        timed_generation(model, params, batch, new_tokens, method)  # compiles prefill and decode
        first_run = time.perf_counter() - start
        timed = timed_generation(model, params, batch, new_tokens, method)
        per_token = common.spread(timed["per_token_s"])
        results["by_batch"][str(batch_size)] = {
            "first_run_with_compile_s": first_run, "prefill_s": timed["prefill_s"], "per_token": per_token,
            "decode_tokens_per_s": batch_size / per_token["median_s"],
        }
    return results


def report(results: dict) -> None:
    rows = [("prompt tokens / new tokens / method", f"{results['prompt_len']} / {results['new_tokens']} / "
                                                    f"{results['method']}")]
    for batch_size, entry in results["by_batch"].items():
        rows += [
            (f"batch {batch_size}: prefill + first token (s)", entry["prefill_s"]),
            (f"batch {batch_size}: per token median (s)", entry["per_token"]["median_s"]),
            (f"batch {batch_size}: per token min / max (s)",
             f"{entry['per_token']['min_s']:.4g} / {entry['per_token']['max_s']:.4g}"),
            (f"batch {batch_size}: decode tokens/s", entry["decode_tokens_per_s"]),
            (f"batch {batch_size}: first run incl. compile (s)", entry["first_run_with_compile_s"]),
        ]
    common.print_table("generation", rows)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    results = run(common.CONFIG.value, METHOD.value, NEW_TOKENS.value, [int(b) for b in BATCH_SIZES.value])
    report(results)
    common.write_json("generate", results)


if __name__ == "__main__":
    app.run(main)
