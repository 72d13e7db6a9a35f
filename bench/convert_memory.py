"""Peak memory and time of the converters on a synthetic ~1 B-parameter reference Wings checkpoint.

    python -m bench.convert_memory [--workdir DIR] [--dtype bfloat16|float32] [--keep]

Builds a random checkpoint in the reference layout (a Qwen2-style decoder of width 2048 with learners and
router, a small SigLIP tower), then runs torch -> JAX and JAX -> torch each in its own process and prints
each one's peak resident memory (``ru_maxrss`` of the child) next to the size of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers

from convert.name_map import tensor_specs
from convert.torch_io import write_safetensors
from convert.torch_to_jax import DTYPES
from wings_jax.config import ModelConfig, TextConfig, VisionConfig, WingsConfig

TEXT = TextConfig(architecture="qwen2", vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=16,
                  num_heads=16, num_kv_heads=16, rope_theta=1_000_000.0, max_position_embeddings=4096)
VISION = VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=7, num_heads=12, image_size=224,
                      patch_size=16)


def build_checkpoint(folder: Path, dtype: np.dtype) -> int:
    """Write the synthetic checkpoint (1 GB shards) and its config.json; returns the weights' bytes."""
    folder.mkdir(parents=True)
    config = ModelConfig(vision=VISION, text=TEXT, wings=WingsConfig(stage=2), scan_layers=False).validate()
    specs = tensor_specs(config)
    rng = np.random.default_rng(0)
    entries = [(spec.torch_name, spec.torch_shape, dtype) for spec in specs]
    write_safetensors(folder, entries, lambda i: rng.standard_normal(specs[i].torch_shape, np.float32).astype(dtype),
                      max_shard_size=10**9)
    siglip = folder / "siglip"
    transformers.SiglipVisionConfig(hidden_size=VISION.hidden_size, intermediate_size=VISION.intermediate_size,
                                    num_hidden_layers=VISION.num_layers, num_attention_heads=VISION.num_heads,
                                    image_size=VISION.image_size, patch_size=VISION.patch_size).save_pretrained(siglip)
    llm = transformers.Qwen2Config(vocab_size=TEXT.vocab_size, hidden_size=TEXT.hidden_size,
                                   intermediate_size=TEXT.intermediate_size, num_hidden_layers=TEXT.num_layers,
                                   num_attention_heads=TEXT.num_heads, num_key_value_heads=TEXT.num_kv_heads,
                                   rope_theta=TEXT.rope_theta, max_position_embeddings=TEXT.max_position_embeddings)
    (folder / "config.json").write_text(json.dumps({
        **llm.to_dict(), "mm_vision_tower": str(siglip), "mm_projector_type": "mlp2x_gelu", "lora_dim": 64,
        "system_prompt_length": 14, "image_token_length": VISION.num_patches,
    }))
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, _ in entries)


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Run a converter in a child process; (seconds, peak RSS in GiB of that child alone)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", *argv], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        weights = build_checkpoint(workdir / "torch", DTYPES[args.dtype])
        print(f"synthetic checkpoint: {weights / np.dtype(DTYPES[args.dtype]).itemsize / 1e9:.3f} B parameters, "
              f"{weights / 2**30:.2f} GiB of {args.dtype} weights")
        for name, argv in (
            ("torch -> jax", ["convert.torch_to_jax", "--src", str(workdir / "torch"), "--dst", str(workdir / "jax")]),
            ("jax -> torch", ["convert.jax_to_torch", "--src", str(workdir / "jax"), "--dst", str(workdir / "back")]),
        ):
            seconds, peak = run_measured(argv)
            print(f"{name}: {seconds:6.1f} s, peak RSS {peak:5.2f} GiB ({peak * 2**30 / weights:.2f} x the weights)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
