"""Generation speed: prefill time and decode tokens/s at batch 1 and 8 (``wings_jax.generate``).

    python -m bench.generate --config configs/bench_small.py [--method=cache|recompute] [--new_tokens=64]

The prompt is the benchmark's synthetic row (system prompt, one image, text) of ``config.seq_len``
tokens. Each batch size runs once to compile, then ``--runs`` times timed. Tokens are timed through
``generate``'s ``on_token`` callback, which sees them on the host: the first token's time is the
prefill's (with its sampling); the decode time per token is the span from the first token to the last
divided by the steps between them (the cache method hands tokens back ``--decode_chunk`` at a time, so
single gaps mean nothing), sampling and the device-to-host copies included. Per-token figures are the
median, min and max over the runs.

Decoding is bound by memory bandwidth (every step reads the decoder's weights and the caches), which
other jobs on a shared machine take from it: the table also gives the bandwidth of a chain of
matrix-vector products (110 MB of float32 weights, the decode step's kind of product) measured in the
same run.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from absl import app, flags

from bench import common
from wings_jax.generate import DECODE_CHUNK as DEFAULT_CHUNK
from wings_jax.generate import Sampling, generate
from wings_jax.model import init_params

METHOD = flags.DEFINE_enum("method", "auto", ["auto", "cache", "recompute"], "how each token's logits are computed")
NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "tokens generated per row (the decode target's length)")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to measure")
RUNS = flags.DEFINE_integer("runs", 3, "timed generations per batch size")
DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", DEFAULT_CHUNK, "decode steps per device call (cache method)")


def timed_generation(model, params, batch, new_tokens: int, method: str, decode_chunk: int) -> dict:
    """Seconds to the first token (prefill + its sampling) and per token after it (see the module docstring)."""
    stamps = []
    # a stop token that the vocabulary never produces keeps every row generating to the end
    sampling = Sampling(max_new_tokens=new_tokens, stop_tokens=(model.text.vocab_size,))
    start = time.perf_counter()
    generate(model, params, batch, sampling, method=method, decode_chunk=decode_chunk,
             on_token=lambda *_: stamps.append(time.perf_counter()))
    return {"prefill_s": stamps[0] - start, "per_token_s": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)}


def matvec_bandwidth_gb_per_s(repeats: int = 5) -> float:
    """GB/s of a jitted chain of 40 float32 (1, 512) x (512, 1408) products (110 MB of weights), the best of
    ``repeats``."""
    rng = np.random.default_rng(0)
    weights = [jax.device_put(rng.standard_normal((512, 1408), np.float32) / 512) for _ in range(40)]

    def chain(weights, x):
        for w in weights:
            x = x + (x @ w)[:, :512]
        return x

    chain = jax.jit(chain)
    x = jax.numpy.ones((1, 512), jax.numpy.float32)
    chain(weights, x).block_until_ready()
    best = min(common.timings(lambda: chain(weights, x).block_until_ready(), repeats))
    return sum(w.nbytes for w in weights) / best / 1e9


def run(config, method: str, new_tokens: int, batch_sizes: list[int], runs: int, decode_chunk: int) -> dict:
    model = common.model_config(config)
    params = init_params(model, jax.random.PRNGKey(config.seed))
    results = {"benchmark": "generate", "prompt_len": config.seq_len, "new_tokens": new_tokens, "method": method,
               "decode_chunk": decode_chunk, "dtype": model.dtype, "by_batch": {},
               "matvec_gb_per_s_before": matvec_bandwidth_gb_per_s()}
    for batch_size in batch_sizes:
        batch = common.synthetic_batch(model, batch_size, config.seq_len, config.seed)
        batch = {k: v for k, v in batch.items() if k != "labels"}
        start = time.perf_counter()
        timed_generation(model, params, batch, new_tokens, method, decode_chunk)  # compiles prefill and decode
        first_run = time.perf_counter() - start
        timed = [timed_generation(model, params, batch, new_tokens, method, decode_chunk) for _ in range(runs)]
        per_token = common.spread([t["per_token_s"] for t in timed])
        results["by_batch"][str(batch_size)] = {
            "first_run_with_compile_s": first_run, "prefill_s": float(np.median([t["prefill_s"] for t in timed])),
            "per_token": per_token, "decode_tokens_per_s": batch_size / per_token["median_s"],
        }
    results["matvec_gb_per_s_after"] = matvec_bandwidth_gb_per_s()
    return results


def report(results: dict) -> None:
    rows = [("prompt tokens / new tokens / method", f"{results['prompt_len']} / {results['new_tokens']} / "
                                                    f"{results['method']}"),
            ("matrix-vector bandwidth before / after (GB/s)",
             f"{results['matvec_gb_per_s_before']:.1f} / {results['matvec_gb_per_s_after']:.1f}")]
    for batch_size, entry in results["by_batch"].items():
        rows += [
            (f"batch {batch_size}: prefill + first token (s)", entry["prefill_s"]),
            (f"batch {batch_size}: per token, median of runs (s)", entry["per_token"]["median_s"]),
            (f"batch {batch_size}: per token, min / max of runs (s)",
             f"{entry['per_token']['min_s']:.4g} / {entry['per_token']['max_s']:.4g}"),
            (f"batch {batch_size}: decode tokens/s", entry["decode_tokens_per_s"]),
            (f"batch {batch_size}: first run incl. compile (s)", entry["first_run_with_compile_s"]),
        ]
    common.print_table("generation", rows)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    results = run(common.CONFIG.value, METHOD.value, NEW_TOKENS.value, [int(b) for b in BATCH_SIZES.value], RUNS.value,
                  DECODE_CHUNK.value)
    report(results)
    common.write_json("generate", results)


if __name__ == "__main__":
    app.run(main)
