"""The logical-axis rules table: which mesh axes each of the model's logical axis names is split over.

Parameters are named in ``wings_jax`` with ``nn.with_logical_partitioning`` and key activations
with ``nn.with_logical_constraint``; this one table turns those names into mesh axes, so changing
the parallelism never touches model code. Rules are read in order; a mesh axis is used at most
once per array (Flax skips an axis an earlier dimension already took, leaving that dimension whole).
A config may give its own table as a list of ``(logical name, mesh axis | [mesh axes] | None)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sharding.mesh import MESH_AXES, ShardingError

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    # decoder parameters: FSDP over the model width, Megatron-style tensor parallelism over
    # heads / MLP width / vocabulary
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora", None),
    ("router_pos", None),
    ("router_out", None),
    ("layers", None),
    # vision tower parameters
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_patch", None),
    ("vit_pos", None),
)


def normalize_rules(rules: Iterable[Sequence] | None) -> Rules:
    """A rules table as hashable tuples (``DEFAULT_RULES`` for None), checked against ``MESH_AXES``."""
    if rules is None:
        return DEFAULT_RULES
    table = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ShardingError(f"logical axis rule {entry!r} is not (logical name, mesh axes)")
        name, axes = entry
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            named = axes
        else:
            named = () if axes is None else (axes,)
        unknown = [axis for axis in named if axis not in MESH_AXES]
        if unknown:
            raise ShardingError(f"logical axis rule for {name!r} names mesh axes {unknown}; the axes are {MESH_AXES}")
        table.append((name, axes))
    return tuple(table)


def mesh_axes_of(logical_name: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes of the first rule for ``logical_name`` (empty if none or None)."""
    for name, axes in rules:
        if name == logical_name:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, tuple) else (axes,)
    return ()
