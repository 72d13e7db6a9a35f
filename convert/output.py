"""What a conversion checks and leaves behind: tensor validation, the atomic output folder, the summary."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from convert.name_map import COMPONENTS, TensorSpec

log = logging.getLogger(__name__)

TORCH_CONFIG_FILE = "torch_config.json"  # the source checkpoint's config.json, kept verbatim for the export


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise one error that lists every missing, unexpected and misshapen tensor of ``what`` by name."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = sorted(n for n in expected.keys() & found.keys() if tuple(expected[n]) != tuple(found[n]))
    if not (missing or unexpected or misshapen):
        return
    lines = [f"{what} does not match the model its config describes:"]
    lines += [f"  missing: {n} (expected shape {tuple(expected[n])})" for n in missing]
    lines += [f"  unexpected: {n} (shape {tuple(found[n])})" for n in unexpected]
    lines += [f"  wrong shape: {n}: expected {tuple(expected[n])}, found {tuple(found[n])}" for n in misshapen]
    raise ConversionError("\n".join(lines))


def write_atomically(destination: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Let ``fill`` write into a hidden temporary folder beside ``destination``, then rename it into place,
    so an interrupted conversion never leaves a folder that looks like a whole checkpoint."""
    destination = destination.absolute()
    if destination.exists() and not overwrite:
        raise ConversionError(f"{destination} already exists; pass --overwrite to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        fill(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if destination.exists():
        shutil.rmtree(destination)
    partial.rename(destination)
    log.info("wrote %s", destination)


def summary(specs: Iterable[TensorSpec], dtype_of: Callable[[TensorSpec], np.dtype]) -> str:
    """A table of parameter counts per component and dtype."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for spec in specs:
        counts[spec.component, np.dtype(dtype_of(spec)).name] += math.prod(spec.torch_shape)
    rows = [f"{'component':<16} {'dtype':<9} {'parameters':>15}"]
    for (component, dtype), count in sorted(counts.items(), key=lambda kv: (COMPONENTS.index(kv[0][0]), kv[0][1])):
        rows.append(f"{component:<16} {dtype:<9} {count:>15,}")
    rows.append(f"{'total':<26} {sum(counts.values()):>15,}")
    return "\n".join(rows)
