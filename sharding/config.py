"""The ``sharding`` part of a training config (``config.sharding``), with its defaults."""

from __future__ import annotations

import ml_collections

from sharding.rules import DEFAULT_RULES


def default_sharding_config() -> ml_collections.ConfigDict:
    """Pure FSDP over every device by default; override e.g. ``--config.sharding.mesh.tensor=2``."""
    config = ml_collections.ConfigDict()
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Multi-slice TPU (or multi-node GPU): slices per axis; the mesh above is then one slice's shape.
    config.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    config.rules = [list(rule) for rule in DEFAULT_RULES]
    config.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": -1, "process_id": -1})
    return config
