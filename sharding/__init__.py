"""Meshes, logical-axis rules and the shardings of the train state and batches (see ``Partitioner``)."""

from sharding.mesh import MESH_AXES, ShardingError, make_mesh, parse_mesh_spec, resolve_mesh_shape
from sharding.partitioner import Partitioner, model_layout
from sharding.rules import DEFAULT_RULES, normalize_rules

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "Partitioner",
    "ShardingError",
    "make_mesh",
    "model_layout",
    "normalize_rules",
    "parse_mesh_spec",
    "resolve_mesh_shape",
]
