"""Training metrics: TensorBoard events + a JSONL file per stage, a console summary, text sparklines."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter

SPARK_CHARS = "▁▂▃▄▅▆▇█"


class MetricsWriter:
    """Writes one record per step to ``<dir>/metrics.jsonl`` and TensorBoard events under ``<dir>/tb``.

    The JSONL file is appended to, so a resumed run continues it; records past the resume step
    (written after the checkpoint the run resumes from) are dropped first, so every step appears once.
    """

    def __init__(self, directory: str | Path, resume_step: int = 0):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = directory / "metrics.jsonl"
        _truncate_after(self.jsonl_path, resume_step)
        self._jsonl = self.jsonl_path.open("a")
        self._tb = SummaryWriter(str(directory / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """A one-line text plot of ``values`` (averaged into ``width`` buckets), low to high as ▁ to █."""
    values = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if values.size == 0:
        return ""
    buckets = [b.mean() for b in np.array_split(values, min(width, values.size))]
    low, high = min(buckets), max(buckets)
    scale = (len(SPARK_CHARS) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK_CHARS[int(round((b - low) * scale))] for b in buckets)


def loss_curve_table(curves: Mapping[str, Sequence[float]], width: int = 50) -> str:
    """A compact table: per curve its first, minimum and last value and a sparkline."""
    lines = [f"{'curve':<14} {'first':>8} {'min':>8} {'last':>8}  trend"]
    for name, values in curves.items():
        if not values:
            continue
        lines.append(f"{name:<14} {values[0]:>8.4f} {min(values):>8.4f} {values[-1]:>8.4f}  {sparkline(values, width)}")
    return "\n".join(lines)


def run_summary(stage: str, records: Sequence[Mapping[str, float]], bad_records: str, seconds: float) -> str:
    """The end-of-stage summary printed on the console; ``bad_records``: the data's bad-record report."""
    if not records:
        return f"[{stage}] no steps run"
    losses = [r["loss"] for r in records]
    tokens_per_s = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    return "\n".join([
        f"[{stage}] {len(records)} steps to step {records[-1]['step']} in {seconds:.1f} s: loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} (min {min(losses):.4f}); {np.mean(tokens_per_s):.0f} tokens/s on average after the "
        f"first step (which compiles); last grad norm {records[-1]['grad_norm']:.3g}",
        f"[{stage}] {bad_records}",
    ])
