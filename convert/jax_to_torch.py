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
import re
import sys
from pathlib import Path

import numpy as np
from flax import traverse_util

from convert import hf_config
from convert.errors import ConversionError
from convert.name_map import llm_specs, param_shapes, tensor_specs
from convert.output import TORCH_CONFIG_FILE, check_shapes, summary, write_atomically
from convert.torch_io import write_safetensors
from convert.torch_to_jax import DTYPES
from wings_jax.checkpoint import load_params
from wings_jax.config import ModelConfig
from wings_jax.presets import VISION_PRESETS

log = logging.getLogger(__name__)

FORMATS = ("wings", "hf-llm")
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


def export(src: Path, dst: Path, fmt: str = "wings", max_shard_size: int = 5 * 10**9, dtype: str | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write the wings_jax checkpoint at ``src`` as PyTorch safetensors at ``dst``; returns the weight files."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    try:
        params, config = load_params(src)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err
    original = hf_config.read_json(src / TORCH_CONFIG_FILE) if (src / TORCH_CONFIG_FILE).exists() else None
    flat = traverse_util.flatten_dict(params, sep="/")
    if fmt == "wings":
        specs, config_json = tensor_specs(config), _wings_config_json(config, original)
        check_shapes(param_shapes(specs), {path: leaf.shape for path, leaf in flat.items()}, f"params of {src}")
    else:
        specs, config_json = llm_specs(config), hf_config.hf_text_config(config.text, original)
        # The LLM alone: the tower, projector and learners stay behind.
        wanted = param_shapes(specs)
        check_shapes(wanted, {path: leaf.shape for path, leaf in flat.items() if path in wanted}, f"params of {src}")
    out_dtype = DTYPES[dtype] if dtype else None

    def tensor(i: int) -> np.ndarray:
        spec = specs[i]
        leaf = flat[spec.param_path]
        array = spec.hook.to_torch(leaf if spec.layer is None else leaf[spec.layer])
        return array if out_dtype is None else array.astype(out_dtype)

    entries = [(spec.torch_name, spec.torch_shape, out_dtype or flat[spec.param_path].dtype) for spec in specs]
    files: list[Path] = []

    def fill(directory: Path) -> None:
        files.extend(dst / path.name for path in write_safetensors(directory, entries, tensor, max_shard_size))
        (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

    log.info("conversion summary:\n%s", summary(specs, lambda spec: out_dtype or flat[spec.param_path].dtype))
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
    try:
        export(args.src, args.dst, args.format, args.max_shard_size, args.dtype, args.overwrite)
    except ConversionError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
