"""Memory plan: per-device bytes of a training config on a mesh, and whether it fits a chip.

    python -m sharding.plan --config configs/wings_qwen1_5_7b_stage2.py --mesh fsdp=32 --chip v5p

Parameters, gradients (trainable groups only) and optimizer state (frozen groups hold none) are
exact: the shards the rules give each device. Activations are an estimate of what the backward
pass keeps under the remat policy, plus the working set of one layer and one loss chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sharding.mesh import describe, resolve_mesh_shape
from sharding.rules import DEFAULT_RULES, Rules, mesh_axes_of
from sharding.specs import batch_shards, check_batch, check_model, param_specs, per_device_bytes, state_specs
from wings_jax.config import ModelConfig

GiB = 1024**3
# Memory per JAX device: a v5p / v4 device is one chip (two TensorCores as a megacore).
CHIP_MEMORY = {"v5p": 95 * GiB, "v5e": 16 * GiB, "v4": 32 * GiB, "h100": 80 * GiB}
USABLE = 0.9  # headroom for XLA's temporaries and fragmentation


@dataclasses.dataclass
class Plan:
    mesh_shape: dict[str, int]
    params: int
    grads: int
    opt_state: int
    activations: int
    total_params: int  # parameter count of the whole model
    notes: str

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations

    def report(self, chip: str | None = None) -> str:
        devices = math.prod(self.mesh_shape.values())
        lines = [f"mesh {describe(self.mesh_shape)} ({devices} devices), {self.total_params / 1e9:.2f} B parameters"]
        for name, value in (("parameters", self.params), ("gradients", self.grads),
                            ("optimizer state", self.opt_state), ("activations (est.)", self.activations),
                            ("total", self.total)):
            lines.append(f"  {name:<20}{value / GiB:9.2f} GiB per device")
        lines.append(f"  ({self.notes})")
        if chip:
            memory = CHIP_MEMORY[chip]
            verdict = "fits" if self.total <= USABLE * memory else "does NOT fit"
            lines.append(f"  {chip}: {memory / GiB:.0f} GiB per device -> {verdict} "
                         f"({100 * self.total / memory:.0f} % used; limit {USABLE:.0%})")
        return "\n".join(lines)


def plan(model_config: ModelConfig, mesh_shape: Mapping[str, int], tx, labels: Any, batch_size: int, seq_len: int,
         grad_accum: int = 1, rules: Rules = DEFAULT_RULES) -> Plan:
    """The per-device memory of training ``model_config`` with optimizer ``tx`` (``labels``: the
    optimizer labels, 'frozen' where not trained) on a mesh of ``mesh_shape``."""
    from sharding.partitioner import model_layout

    params_shape, logical = model_layout(model_config)
    specs = param_specs(logical, rules)
    check_model(model_config, mesh_shape, rules, params_shape, specs)
    check_batch(batch_size, mesh_shape, rules, grad_accum)
    trained = jax.tree.map(lambda shape, label: None if label == "frozen" else shape, params_shape, labels)
    trained_specs = jax.tree.map(lambda spec, label: None if label == "frozen" else spec, specs, labels,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    grads = per_device_bytes(trained, trained_specs, mesh_shape)
    if grad_accum > 1:  # float32 accumulators next to each micro-batch's gradients
        grads += per_device_bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), trained),
                                  trained_specs, mesh_shape)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    rows = batch_size // grad_accum // batch_shards(mesh_shape, rules)
    return Plan(
        mesh_shape=dict(mesh_shape),
        params=per_device_bytes(params_shape, specs, mesh_shape),
        grads=grads,
        opt_state=per_device_bytes(opt_shape, state_specs(opt_shape, params_shape, specs), mesh_shape),
        activations=activation_bytes(model_config, rows, seq_len, mesh_shape, rules),
        total_params=sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params_shape)),
        notes=f"remat {model_config.remat_policy}, {rows} row(s) x {seq_len} tokens per device per micro-batch, "
              f"grad_accum {grad_accum}, compute {model_config.dtype}",
    )


def activation_bytes(config: ModelConfig, rows: int, seq_len: int, mesh_shape: Mapping[str, int],
                     rules: Rules = DEFAULT_RULES) -> int:
    """Estimated activation bytes per device: what the backward pass keeps under the remat policy,
    one decoder layer's full working set (recomputed in the backward pass), one loss chunk, and one
    (frozen, forward-only) vision layer."""
    text, vision = config.text, config.vision
    tensor = math.prod(mesh_shape[a] for a in mesh_axes_of("act_heads", rules))
    act = np.dtype(config.dtype).itemsize
    d, hd, length = text.hidden_size, text.head_dim, seq_len
    features = config.max_images * config.image_tokens
    qkv = (text.num_heads + 2 * text.num_kv_heads) * hd / tensor
    probs = text.num_heads / tensor * length * 4  # float32 softmax, bytes per query
    mlp = text.intermediate_size / tensor
    # Bytes per token of one layer when nothing is recomputed.
    learners = 0.0
    if config.wings.enabled:
        learners = 4 * d * act + text.num_heads * (features + length) * 4  # two learners: q, out, probs
    full_layer = (3 * d + qkv + d + 3 * mlp) * act + probs + learners
    kept_per_token = {
        "none": full_layer,
        "full": d * act,
        "dots_no_batch": d * act,
        "save_attention": (d + text.num_heads * hd / tensor) * act,
        "dots": (d + qkv + d + 3 * mlp) * act + probs,
    }[config.remat_policy]
    decoder = rows * length * (text.num_layers * kept_per_token + full_layer)
    if config.wings.enabled:  # learner sources: image features and input embeddings, shared by all layers
        decoder += rows * (features + length) * d * act * 3
    chunk = min(config.loss_chunk_size, length)
    loss = rows * chunk * text.vocab_size / math.prod(mesh_shape[a] for a in mesh_axes_of("vocab", rules)) * 4 * 2
    loss += rows * length * d * 4  # final hidden states
    tokens = rows * config.max_images * vision.num_patches
    vision_layer = tokens * ((4 * vision.hidden_size + vision.intermediate_size / tensor) * act
                             + vision.num_heads / tensor * vision.num_patches * 4)
    return int(decoder + loss + vision_layer)


def load_recipe(path: str):
    """``get_config`` of a recipe file ``path[:arg]``."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("recipe", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def plan_recipe(config_path: str, mesh: str, stage_name: str | None = None) -> Plan:
    """The plan of one stage (default: the last) of a training recipe."""
    from train.optim import build_optimizer, optimizer_labels
    from train.recipe import model_config_from, stage_names, trained_groups
    from wings_jax.model import init_params

    config = load_recipe(config_path)
    stage_name = stage_name or stage_names(config)[-1]
    stage = config[stage_name]
    model_config = model_config_from(config, stage_name)
    mesh_shape = resolve_mesh_shape(mesh, math.prod(v for v in _fixed(mesh)))
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                  for name, axes in config.get("sharding", {}).get("rules", DEFAULT_RULES))
    shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0), stage.seq_len))
    rates = trained_groups(stage)
    tx, _ = build_optimizer(shapes, rates, 1, stage.warmup_ratio, stage.weight_decay, b1=stage.b1, b2=stage.b2,
                            eps=stage.eps, max_grad_norm=stage.max_grad_norm)
    return plan(model_config, mesh_shape, tx, optimizer_labels(shapes, rates), stage.batch_size, stage.seq_len,
                stage.grad_accum, rules)


def _fixed(mesh: str):
    from sharding.mesh import parse_mesh_spec

    sizes = parse_mesh_spec(mesh)
    if -1 in sizes.values():
        raise SystemExit(f"--mesh {mesh!r}: give every axis a size (the planner has no devices to fill -1 from)")
    return sizes.values()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training recipe file[:args], e.g. configs/x.py:data=...")
    parser.add_argument("--mesh", required=True, help="mesh sizes, e.g. fsdp=64,tensor=1 (missing axes are 1)")
    parser.add_argument("--chip", choices=sorted(CHIP_MEMORY), help="check against this chip's memory")
    parser.add_argument("--stage", help="stage sub-config (default: the recipe's last stage)")
    args = parser.parse_args(argv)
    print(plan_recipe(args.config, args.mesh, args.stage).report(args.chip))


if __name__ == "__main__":
    main()
