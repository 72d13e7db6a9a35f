"""PyTorch -> wings_jax checkpoint.

Two modes:

    python -m convert.torch_to_jax --src WINGS_DIR --dst OUT [--dtype bfloat16|float32] [--scan]
        [--vision-config SIGLIP_CONFIG.json]
    python -m convert.torch_to_jax --llm HF_LLM_DIR --vision HF_SIGLIP_DIR [--projector FILE] --dst OUT

The first converts a reference Wings checkpoint (spec section 7) with every tensor; the second assembles a
stage-1 starting point from a HF Qwen2 / Llama checkpoint and a HF SigLIP one, with fresh learners (A ~
truncated normal std 0.02, B = 0) and a fresh projector (torch nn.Linear's default init) or one from a file.
Every tensor is validated by name and shape before anything is written; the output (``params/``,
``wings_config.json`` and the source ``config.json`` as ``torch_config.json``) appears atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from convert import hf_config
from convert.errors import ConversionError, exit_code
from convert.name_map import (
    HF_SIGLIP_VISION_PREFIX,
    WINGS_VISION_PREFIX,
    TensorSpec,
    learner_specs,
    llm_specs,
    projector_specs,
    tensor_specs,
    vision_specs,
)
from convert.output import TORCH_CONFIG_FILE, check_shapes, summary, write_atomically
from convert.torch_io import TensorSource, open_checkpoint
from wings_jax.checkpoint import save_params
from wings_jax.config import ModelConfig, ProjectorConfig, WingsConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
LEARNER_INIT_STD = 0.02


def _validated(config: ModelConfig) -> ModelConfig:
    try:
        return config.validate()
    except ValueError as err:
        raise ConversionError(f"the checkpoint describes an unsupported model: {err}") from err


def _layer_indices(names: Iterable[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, names) if m}


def reference_model_config(hf: dict, source: TensorSource, vision_config: Path | None, scan: bool,
                           dtype: str | None, src: str) -> ModelConfig:
    """The wings_jax config of a reference checkpoint: its config.json plus what its tensors show (stage,
    learner layers, stored vision layers, router width); masks in ``reference`` mode."""
    names = source.names()
    text = hf_config.text_config_from_hf(hf, src)
    for field in ("lora_dim", "system_prompt_length"):
        if field not in hf:
            raise ConversionError(f"{src}/config.json lacks {field!r}, which a Wings config.json records")
    learner_layers = _layer_indices(names, r"model\.layers\.(\d+)\.attn_pool\.")
    router_layers = sorted(_layer_indices(names, r"model\.layers\.(\d+)\.reweight_module\."))
    stored_vision_layers = _layer_indices(names, re.escape(WINGS_VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
    vision = hf_config.resolve_vision_config(hf.get("mm_vision_tower"), vision_config)
    # The reference stores the tower without its last layer and reads the one before it.
    vision = dataclasses.replace(vision, num_layers=len(stored_vision_layers) + 1,
                                 select_layer=hf_config.WINGS_SELECT_LAYER)
    every_layer = learner_layers in (set(), set(range(text.num_layers)))
    wings = WingsConfig(
        enabled=bool(learner_layers), stage=2 if router_layers else 1, lora_dim=int(hf["lora_dim"]),
        learner_layers=None if every_layer else tuple(sorted(learner_layers)),
        system_prompt_length=int(hf["system_prompt_length"]), mask_mode="reference",
    )
    if router_layers:
        router_weight = f"model.layers.{router_layers[0]}.reweight_module.linear.weight"
        wings = dataclasses.replace(wings, router_positions=source.shape(router_weight)[-1])
    param_dtype = dtype or source.dtype("model.embed_tokens.weight").name
    return _validated(ModelConfig(
        vision=vision, projector=ProjectorConfig(hf.get("mm_projector_type", "linear")), text=text, wings=wings,
        param_dtype=param_dtype, dtype=param_dtype, scan_layers=scan,
    ))


def check_source(specs: list[TensorSpec], source: TensorSource, what: str,
                 ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Every tensor ``specs`` needs is in ``source`` with its shape, and ``source`` holds nothing else
    (but what ``ignore`` accepts)."""
    found = {name: source.shape(name) for name in source.names() if not ignore(name)}
    check_shapes({spec.torch_name: spec.torch_shape for spec in specs}, found, what)


def _place(flat: dict[str, np.ndarray], spec: TensorSpec, array: np.ndarray) -> None:
    """Store one tensor (already in JAX layout) at its param path, in its layer's slot when stacked."""
    if spec.layer is None:
        flat[spec.param_path] = np.ascontiguousarray(array)
        return
    leaf = flat.get(spec.param_path)
    if leaf is None:
        leaf = flat[spec.param_path] = np.empty(spec.leaf_shape, array.dtype)
    elif leaf.dtype != array.dtype:
        raise ConversionError(f"{spec.torch_name} is {array.dtype} but the other layers of {spec.param_path} are "
                              f"{leaf.dtype}; pass --dtype to convert all to one dtype")
    leaf[spec.layer] = array


def read_params(specs: list[TensorSpec], source: TensorSource, flat: dict[str, np.ndarray],
                dtype: np.dtype | None) -> None:
    """Read ``specs``' tensors one at a time from ``source`` into ``flat`` (param path -> array), file by
    file, unmapping each file once read so that its pages do not stay resident beside the params."""
    total = sum(source.nbytes(spec.torch_name) for spec in specs)
    ordered = sorted(specs, key=lambda spec: source.file_index(spec.torch_name))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading tensors") as bar:
        for count, spec in enumerate(ordered, 1):
            nbytes = source.nbytes(spec.torch_name)
            array = spec.hook.to_jax(source.get(spec.torch_name))
            _place(flat, spec, array if dtype is None else array.astype(dtype))
            file_index = source.file_index(spec.torch_name)
            if count == len(ordered) or source.file_index(ordered[count].torch_name) != file_index:
                source.release(file_index)
            bar.update(nbytes)
            bar.set_postfix(tensors=f"{count}/{len(ordered)}")


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normal(0, std) truncated at two standard deviations (resampling what falls outside)."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return values * std


def fresh_params(specs: list[TensorSpec], flat: dict[str, np.ndarray], dtype: np.dtype, seed: int) -> None:
    """New learners (A ~ truncated normal std 0.02, B = 0: a fresh learner adds nothing) and projector
    (uniform in +-1/sqrt(fan_in), torch nn.Linear's default, as the reference builds it) into ``flat``."""
    rng = np.random.default_rng(seed)
    fan_ins = {spec.param_path.replace("/kernel", "/bias"): spec.torch_shape[1]
               for spec in specs if spec.component == "projector" and spec.param_path.endswith("/kernel")}
    for spec in specs:
        if spec.component == "projector":
            fan_in = spec.torch_shape[1] if spec.param_path.endswith("/kernel") else fan_ins[spec.param_path]
            array = rng.uniform(-1, 1, spec.jax_shape) / np.sqrt(fan_in)
        elif re.search(r"_a/kernel$", spec.param_path):
            array = _truncated_normal(rng, spec.jax_shape, LEARNER_INIT_STD)
        elif re.search(r"_b/kernel$", spec.param_path):
            array = np.zeros(spec.jax_shape)
        else:
            raise ConversionError(f"no fresh initialisation for {spec.param_path}")
        _place(flat, spec, array.astype(dtype))


def _save(flat: dict[str, np.ndarray], config: ModelConfig, torch_config: dict, specs: list[TensorSpec]):
    """The writer for ``write_atomically``: params, wings config, and the torch config for the export."""

    def fill(directory: Path) -> None:
        save_params(directory, traverse_util.unflatten_dict(flat, sep="/"), config)
        (directory / TORCH_CONFIG_FILE).write_text(json.dumps(torch_config, indent=2) + "\n")

    log.info("conversion summary:\n%s", summary(specs, lambda spec: flat[spec.param_path].dtype))
    return fill


def convert_reference(src: Path, dst: Path, dtype: str | None = None, scan: bool = False,
                      vision_config: Path | None = None, overwrite: bool = False) -> ModelConfig:
    """Convert a reference Wings checkpoint folder into a wings_jax checkpoint at ``dst``."""
    hf = hf_config.read_json(src / "config.json")
    source = open_checkpoint(src)
    config = reference_model_config(hf, source, vision_config, scan, dtype, str(src))
    specs = tensor_specs(config)
    check_source(specs, source, f"checkpoint {src}")
    flat: dict[str, np.ndarray] = {}
    read_params(specs, source, flat, DTYPES[dtype] if dtype else None)
    write_atomically(dst, _save(flat, config, hf, specs), overwrite)
    return config


def _siglip_prefix(source: TensorSource) -> str:
    """'vision_model.' for a full SigLIP (with its text tower) and older vision-only saves; '' for a
    vision-only ``SiglipVisionModel`` saved by recent ``transformers``."""
    return HF_SIGLIP_VISION_PREFIX if any(n.startswith(HF_SIGLIP_VISION_PREFIX) for n in source.names()) else ""


def _siglip_unused(config: ModelConfig, prefix: str) -> Callable[[str], bool]:
    """SigLIP tensors a Wings tower drops: the text tower, logit scale/bias, the pooling head, and the
    encoder layers after the selected one."""
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")

    def unused(name: str) -> bool:
        if not name.startswith(prefix) or name.startswith(prefix + "head."):
            return True
        match = layer.match(name)
        return bool(match) and int(match.group(1)) >= config.vision.kept_layers

    return unused


def assemble_stage1(llm: Path, vision: Path, dst: Path, projector: Path | None = None,
                    projector_type: str = "mlp2x_gelu", lora_dim: int = 64, system_prompt_length: int = 14,
                    mask_mode: str = "causal", dtype: str | None = None, scan: bool = False, seed: int = 0,
                    overwrite: bool = False) -> ModelConfig:
    """A stage-1 wings_jax checkpoint from a HF LLM and a HF SigLIP checkpoint, with fresh learners."""
    llm_hf = hf_config.read_json(llm / "config.json")
    vision_config = hf_config.vision_config_from_hf(hf_config.read_json(vision / "config.json"),
                                                    str(vision / "config.json"))
    llm_source, vision_source = open_checkpoint(llm), open_checkpoint(vision)
    param_dtype = dtype or llm_source.dtype("model.embed_tokens.weight").name
    config = _validated(ModelConfig(
        vision=vision_config, projector=ProjectorConfig(projector_type), text=hf_config.text_config_from_hf(
            llm_hf, str(llm / "config.json")),
        wings=WingsConfig(stage=1, lora_dim=lora_dim, system_prompt_length=system_prompt_length, mask_mode=mask_mode),
        param_dtype=param_dtype, dtype=param_dtype, scan_layers=scan,
    ))
    prefix = _siglip_prefix(vision_source)
    loaded = {"llm": (llm_specs(config), llm_source), "vision": (vision_specs(config, prefix), vision_source)}
    check_source(*loaded["llm"], f"LLM checkpoint {llm}")
    check_source(*loaded["vision"], f"SigLIP checkpoint {vision}", ignore=_siglip_unused(config, prefix))
    fresh = learner_specs(config)
    if projector is None:
        fresh += projector_specs(config)
    else:
        loaded["projector"] = (projector_specs(config), open_checkpoint(projector))
        check_source(*loaded["projector"], f"projector file {projector}")
    flat: dict[str, np.ndarray] = {}
    for specs, source in loaded.values():
        read_params(specs, source, flat, DTYPES[param_dtype] if dtype else None)
    fresh_params(fresh, flat, np.dtype(DTYPES.get(param_dtype, param_dtype)), seed)
    torch_config = hf_config.reference_config(llm_hf, vision_config, str(vision.absolute()), projector_type, lora_dim,
                                              system_prompt_length)
    all_specs = [spec for specs, _ in loaded.values() for spec in specs] + fresh
    write_atomically(dst, _save(flat, config, torch_config, all_specs), overwrite)
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.torch_to_jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="reference Wings checkpoint folder (safetensors or .bin)")
    parser.add_argument("--llm", type=Path, help="HF Qwen2 / Llama checkpoint folder (assembly mode)")
    parser.add_argument("--vision", type=Path, help="HF SigLIP checkpoint folder (assembly mode)")
    parser.add_argument("--projector", type=Path, help="projector weights (model.mm_projector.*) to start from")
    parser.add_argument("--dst", type=Path, required=True, help="output wings_jax checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast params (default: keep the stored dtype)")
    parser.add_argument("--scan", action="store_true", help="stack layers for scan_layers=True")
    parser.add_argument("--vision-config", type=Path, help="HF SigLIP config.json describing the vision tower")
    parser.add_argument("--projector-type", default="mlp2x_gelu", help="assembly mode: projector type")
    parser.add_argument("--lora-dim", type=int, default=64, help="assembly mode: learner rank")
    parser.add_argument("--system-prompt-length", type=int, default=14, help="assembly mode")
    parser.add_argument("--mask-mode", default="causal", help="assembly mode: learner mask mode")
    parser.add_argument("--seed", type=int, default=0, help="assembly mode: seed of the fresh weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.src is None) == (args.llm is None and args.vision is None) or (args.llm is None) != (args.vision is None):
        parser.error("give either --src, or both --llm and --vision")
    if args.src is not None:
        return exit_code(lambda: convert_reference(args.src, args.dst, args.dtype, args.scan, args.vision_config,
                                                   args.overwrite))
    return exit_code(lambda: assemble_stage1(
        args.llm, args.vision, args.dst, args.projector, args.projector_type, args.lora_dim,
        args.system_prompt_length, args.mask_mode, args.dtype, args.scan, args.seed, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
