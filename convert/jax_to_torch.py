"""wings_jax checkpoint -> PyTorch safetensors.

    python -m convert.jax_to_torch --src JAX_DIR --dst OUT [--format wings|hf-llm] [--max-shard-size 5GB]
        [--dtype bfloat16|float32]

``wings`` writes the reference Wings layout (spec section 7) and its ``config.json`` (the converted source's
own config.json when the checkpoint came from one, so a round trip reproduces it); ``hf-llm`` writes the LLM
alone as a HF Qwen2 / Llama checkpoint for ``transformers``' ``from_pretrained``. Shards hold at most
``--max-shard-size`` bytes and are listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np

from convert import hf_config
from convert.errors import ConversionError, exit_code
from convert.name_map import TensorSpec, llm_specs, param_shapes, tensor_specs
from convert.output import TORCH_CONFIG_FILE, check_shapes, summary, write_atomically
from convert.torch_io import write_safetensors
from convert.torch_to_jax import DTYPES
from wings_jax.checkpoint import ParamLeaves
from wings_jax.config import ModelConfig
from wings_jax.presets import VISION_PRESETS

log = logging.getLogger(__name__)

FORMATS = ("wings", "hf-llm")
RESTORE_GROUP_BYTES = 32 * 2**20  # fewer, larger restores: each costs some milliseconds whatever its size
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units, as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; expected e.g. 5GB, 500MB, 2GiB or bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _wings_config_json(config: ModelConfig, original: dict | None) -> dict:
    """The source's config.json when there was one, else one built from the wings_jax config."""
    if original is not None:
        return original
    tower = next((name for name, preset in VISION_PRESETS.items() if preset == config.vision), None)
    if tower is None:
        log.warning("the vision tower matches no preset: config.json's mm_vision_tower is left empty, so converting "
                    "this checkpoint back will need --vision-config")
    return hf_config.reference_config(hf_config.hf_text_config(config.text), config.vision, tower or "",
                                      config.projector.type, config.wings.lora_dim, config.wings.system_prompt_length)


def _tensors_from(specs: list[TensorSpec], leaves: ParamLeaves,
                  out_dtype: np.dtype | None) -> Callable[[int], np.ndarray]:
    """``specs[i]``'s torch tensor for ``write_safetensors``, which asks for each once, in order. Leaves are
    restored in groups of about ``RESTORE_GROUP_BYTES`` when first needed, in the order they are needed, and
    each is dropped after its last tensor: a group in memory at a time (but all the stacked leaves of a
    scanned model, whose layers interleave in the torch order)."""
    first_use = list(dict.fromkeys(spec.param_path for spec in specs))
    tensors_left = Counter(spec.param_path for spec in specs)
    held: dict[str, np.ndarray] = {}

    def restore_group(start: str) -> None:
        group, size = [], 0
        for path in first_use[first_use.index(start):]:
            nbytes = math.prod(leaves.shapes[path]) * leaves.dtypes[path].itemsize
            if group and size + nbytes > RESTORE_GROUP_BYTES:
                break
            group.append(path)
            size += nbytes
        held.update(leaves.read(group))

    def tensor(i: int) -> np.ndarray:
        spec = specs[i]
        if spec.param_path not in held:
            restore_group(spec.param_path)
        leaf = held[spec.param_path]
        tensors_left[spec.param_path] -= 1
        if not tensors_left[spec.param_path]:
            del held[spec.param_path]
        array = spec.hook.to_torch(leaf if spec.layer is None else leaf[spec.layer])
        return array if out_dtype is None else array.astype(out_dtype)

    return tensor


def export(src: Path, dst: Path, fmt: str = "wings", max_shard_size: int = 5 * 10**9, dtype: str | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write the wings_jax checkpoint at ``src`` as PyTorch safetensors at ``dst``; returns the weight files."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    try:
        leaves = ParamLeaves(src)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err
    with closing(leaves):
        config = leaves.config
        original = hf_config.read_json(src / TORCH_CONFIG_FILE) if (src / TORCH_CONFIG_FILE).exists() else None
        if fmt == "wings":
            specs, config_json = tensor_specs(config), _wings_config_json(config, original)
            check_shapes(param_shapes(specs), leaves.shapes, f"params of {src}")
        else:
            specs, config_json = llm_specs(config), hf_config.hf_text_config(config.text, original)
            # The LLM alone: the tower, projector and learners stay behind.
            wanted = param_shapes(specs)
            check_shapes(wanted, {path: shape for path, shape in leaves.shapes.items() if path in wanted},
                         f"params of {src}")
        out_dtype = DTYPES[dtype] if dtype else None
        entries = [(spec.torch_name, spec.torch_shape, out_dtype or leaves.dtypes[spec.param_path]) for spec in specs]
        files: list[Path] = []

        def fill(directory: Path) -> None:
            written = write_safetensors(directory, entries, _tensors_from(specs, leaves, out_dtype), max_shard_size)
            files.extend(dst / path.name for path in written)
            (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

        log.info("conversion summary:\n%s", summary(specs, lambda spec: out_dtype or leaves.dtypes[spec.param_path]))
        write_atomically(dst, fill, overwrite)
    return files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.jax_to_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="wings_jax checkpoint folder")
    parser.add_argument("--dst", type=Path, required=True, help="output folder")
    parser.add_argument("--format", choices=FORMATS, default="wings", help="reference Wings layout or the LLM alone")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest shard (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast tensors (default: keep the params' dtypes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    return exit_code(lambda: export(args.src, args.dst, args.format, args.max_shard_size, args.dtype, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
