"""What the benchmarks share: config loading flags, a synthetic batch, timing, memory, the matmul peak,
and printing a table plus writing JSON."""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.config import ModelConfig

CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_small.py", "benchmark config (configs/bench_*.py)")
JSON_OUT = flags.DEFINE_string("json", None, "where to write the results (default bench_results/<benchmark>.json)")


def model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict()).validate()


def synthetic_batch(model: ModelConfig, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Rows of ``seq_len`` tokens: a system prompt, one image, then text to the end; every text token labelled."""
    rng = np.random.default_rng(seed)
    size = model.vision.image_size
    prefix = model.wings.system_prompt_length
    suffix = seq_len - prefix - model.image_tokens
    if suffix < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after a {model.image_tokens}-token image")
    samples = []
    for _ in range(batch_size):
        ids = [*rng.integers(1, model.text.vocab_size, prefix).tolist(), IMAGE_PLACEHOLDER,
               *rng.integers(1, model.text.vocab_size, suffix).tolist()]
        image = rng.uniform(-1, 1, (size, size, 3)).astype(np.float32)
        samples.append(Sample(ids, ids, [image]))
    return pack_batch(samples, model, seq_len)


def timings(run: Callable[[], object], steps: int) -> list[float]:
    """Wall seconds of ``steps`` calls of ``run`` (which must block until its result is ready)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def spread(times: Sequence[float]) -> dict:
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "iqr_s": quartiles[2] - quartiles[0], "n": len(ordered)}


class MatmulPeak:
    """The device's dense matmul throughput, measured: a (size x size) @ (size x size) product in ``dtype``.

    Call ``sample()`` as often as useful; ``tflops`` is the best sample. On a shared machine a single
    burst of samples can land in a slow spell and understate the peak (seen here: 146 against 290
    GFLOP/s), which overstates MFU; samples spread over a whole benchmark run find the real peak.
    """

    def __init__(self, dtype: str, size: int | None = None):
        self.size = size or (2048 if jax.default_backend() == "cpu" else 8192)
        keys = jax.random.split(jax.random.PRNGKey(0))
        self.a, self.b = (jax.random.normal(key, (self.size, self.size), jnp.dtype(dtype)) for key in keys)
        self.matmul = jax.jit(jnp.matmul).lower(self.a, self.b).compile()
        self.matmul(self.a, self.b).block_until_ready()
        self.best_s = float("inf")
        self.samples = 0

    def sample(self, repeats: int = 1) -> None:
        self.best_s = min(self.best_s, *timings(lambda: self.matmul(self.a, self.b).block_until_ready(), repeats))
        self.samples += repeats

    @property
    def tflops(self) -> float:
        return 2 * self.size**3 / self.best_s / 1e12


def memory_report(compiled) -> dict:
    """Bytes XLA plans for the compiled program (arguments, outputs, temporaries), the device's peak
    where the runtime reports one, and this process's peak resident memory."""
    analysis = compiled.memory_analysis()
    report = {}
    if analysis is not None:
        report.update(argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
                      temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        report["device_peak_bytes"] = stats["peak_bytes_in_use"]
    report["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def print_table(title: str, rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")


def write_json(benchmark: str, results: dict) -> Path:
    path = Path(JSON_OUT.value or f"bench_results/{benchmark}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "device_count": jax.device_count(), "host_memory": host_memory_settings(), **results}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logging.info("wrote %s", path)
    return path


def host_memory_settings() -> str:
    """How the host allocator backs XLA:CPU's buffers, which moves CPU step times by 5-10 %: the
    ``GLIBC_TUNABLES`` and ``LD_PRELOAD`` (e.g. tcmalloc) in effect, and the kernel's transparent-huge-page mode."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().strip() if thp.exists() else "unknown"
    settings = ", ".join(f"{name}={os.environ.get(name, '')!r}" for name in ("GLIBC_TUNABLES", "LD_PRELOAD"))
    return f"{settings}, transparent_hugepage: {mode}"


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30
