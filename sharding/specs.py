"""Shardings of the parameters, optimizer state, train state and batches, derived from the rules table,
and the checks that the model and batch divide over the mesh."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import ShardingError
from sharding.rules import Rules, mesh_axes_of
from wings_jax.config import ModelConfig


def logical_to_mesh_spec(logical: PartitionSpec | None, rules: Rules) -> PartitionSpec:
    """A ``PartitionSpec`` of logical names -> one of mesh axes (Flax's resolution: each mesh axis once)."""
    if logical is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(logical, rules)


def param_specs(logical_axes: Any, rules: Rules) -> Any:
    """A pytree of logical ``PartitionSpec`` (``wings_jax.model.param_logical_axes``) -> mesh ``PartitionSpec``."""
    return jax.tree.map(lambda spec: logical_to_mesh_spec(spec, rules), logical_axes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def spec_leaves(specs: Any) -> list[PartitionSpec]:
    """The ``PartitionSpec`` leaves of a tree (a spec is itself a tuple, so it must be kept whole)."""
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def named(mesh: Mesh, specs: Any) -> Any:
    """``PartitionSpec`` leaves -> ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_count(spec: PartitionSpec, mesh_shape: Mapping[str, int], dim: int) -> int:
    """How many pieces dimension ``dim`` is cut into under ``spec``."""
    if dim >= len(spec) or spec[dim] is None:
        return 1
    axes = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
    return math.prod(mesh_shape[axis] for axis in axes)


def _path_keys(path) -> tuple:
    """The trailing dict keys of a key path: the parameter path inside an optimizer-state leaf's path."""
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(entry.key)
    return tuple(reversed(keys))


def state_specs(state_shape: Any, params_shape: Any, specs: Any) -> Any:
    """Mesh specs for every leaf of a tree holding parameters (a train state, an optimizer state).

    A leaf whose path ends with a parameter's path and has its shape (the parameter itself, Adam's
    mu and nu) is sharded like that parameter; everything else (step counts) is replicated. Frozen
    groups (``optax.set_to_zero``) hold no optimizer state, so they need nothing.
    """
    by_path = {
        tuple(k.key for k in path): (leaf.shape, spec)
        for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params_shape)[0], spec_leaves(specs),
                                      strict=True)
    }

    def spec_of(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            found = by_path.get(keys[start:])
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, state_shape)


def batch_spec(rules: Rules) -> PartitionSpec:
    """Rows split over the mesh axes of the logical 'batch' axis; everything else whole."""
    axes = mesh_axes_of("batch", rules)
    return PartitionSpec(axes if axes else None)


def batch_shards(mesh_shape: Mapping[str, int], rules: Rules) -> int:
    return math.prod(mesh_shape[axis] for axis in mesh_axes_of("batch", rules))


def check_batch(global_batch: int, mesh_shape: Mapping[str, int], rules: Rules, grad_accum: int = 1,
                process_count: int = 1) -> None:
    """ShardingError unless the global batch (and each micro-batch) divides over the batch mesh axes,
    and the global batch over the processes that feed it."""
    axes = mesh_axes_of("batch", rules)
    shards = batch_shards(mesh_shape, rules)
    where = " x ".join(f"{axis}={mesh_shape[axis]}" for axis in axes) or "no axes"
    if global_batch % shards:
        raise ShardingError(f"global batch {global_batch} is not divisible by {where} = {shards} batch shards")
    micro = global_batch // grad_accum
    if global_batch % grad_accum or micro % shards:
        raise ShardingError(
            f"global batch {global_batch} / grad_accum {grad_accum} = micro-batches of {global_batch / grad_accum:g} "
            f"rows, not divisible by {where} = {shards} batch shards"
        )
    if global_batch % process_count:
        raise ShardingError(f"global batch {global_batch} is not divisible by {process_count} processes")


def _model_dims(config: ModelConfig) -> list[tuple[str, str, int]]:
    """(logical axis, config field, size) for the model widths the rules may split."""
    text, vision = config.text, config.vision
    return [
        ("act_heads", "text.num_heads", text.num_heads),
        ("kv_heads", "text.num_kv_heads", text.num_kv_heads),
        ("vocab", "text.vocab_size", text.vocab_size),
        ("mlp", "text.intermediate_size (MLP width)", text.intermediate_size),
        ("embed", "text.hidden_size", text.hidden_size),
        ("vit_heads", "vision.num_heads", vision.num_heads),
        ("vit_mlp", "vision.intermediate_size (MLP width)", vision.intermediate_size),
        ("vit_embed", "vision.hidden_size", vision.hidden_size),
    ]


def check_model(config: ModelConfig, mesh_shape: Mapping[str, int], rules: Rules, params_shape: Any = None,
                specs: Any = None) -> None:
    """ShardingError listing every model width (heads, key/value heads, vocabulary, MLP width, ...) and,
    when given, every parameter dimension that its mesh axes do not divide."""
    errors = []
    for logical, field, size in _model_dims(config):
        axes = mesh_axes_of(logical, rules)
        shards = math.prod(mesh_shape[axis] for axis in axes)
        if size % shards:
            where = " x ".join(f"{axis}={mesh_shape[axis]}" for axis in axes)
            errors.append(f"{field}={size} is not divisible by mesh {where} (logical axis {logical!r})")
    if not errors and params_shape is not None:
        flat = jax.tree_util.tree_flatten_with_path(params_shape)[0]
        for (path, leaf), spec in zip(flat, spec_leaves(specs), strict=True):
            for dim, size in enumerate(leaf.shape):
                shards = shard_count(spec, mesh_shape, dim)
                if size % shards:
                    name = "/".join(str(k.key) for k in path)
                    errors.append(f"parameter {name} {tuple(leaf.shape)}: dimension {dim} ({size}) is not divisible "
                                  f"by mesh axes {spec[dim]} = {shards}")
    if errors:
        raise ShardingError("the model does not divide over the mesh:\n  " + "\n  ".join(errors))


def per_device_bytes(shapes: Any, specs: Any, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of the largest shard of every leaf, summed: what one device holds."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), spec_leaves(specs), strict=True):
        shard = [-(-size // shard_count(spec, mesh_shape, dim)) for dim, size in enumerate(leaf.shape)]
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
