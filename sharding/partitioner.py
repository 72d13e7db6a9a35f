"""Everything a training run needs to place its state and batches on a mesh, in one object.

    partitioner = Partitioner.from_config(config.sharding)
    partitioner.check(model_config, global_batch, grad_accum)
    shardings = partitioner.state_shardings(model_config, abstract_state)
    state = jax.jit(init, out_shardings=shardings)(...)          # never whole on one host
    step = jax.jit(step, in_shardings=(shardings, partitioner.batch_sharding()),
                   out_shardings=(shardings, partitioner.replicated()), donate_argnums=0)
    step = partitioner.in_context(step)                          # activation constraints apply
    state, metrics = step(state, partitioner.global_batch(local_batch))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding import specs as specs_lib
from sharding.mesh import make_mesh, mesh_sizes
from sharding.rules import DEFAULT_RULES, Rules, normalize_rules
from wings_jax.config import ModelConfig
from wings_jax.model import abstract_params


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """A mesh and the logical-axis rules that place the model on it."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    @classmethod
    def from_config(cls, config: Mapping | None, devices=None) -> Partitioner:
        """From a ``sharding`` config (``sharding.config.default_sharding_config``): mesh, dcn_mesh, rules."""
        config = dict(config or {})
        mesh_config = config.get("mesh")
        dcn = _plain(config.get("dcn_mesh"))
        if isinstance(dcn, dict) and all(size == 1 for size in dcn.values()):
            dcn = None  # one slice: a plain mesh
        return cls(make_mesh(_plain(mesh_config), dcn, devices), normalize_rules(config.get("rules")))

    @property
    def sizes(self) -> dict[str, int]:
        return mesh_sizes(self.mesh)

    def check(self, model_config: ModelConfig, global_batch: int | None = None, grad_accum: int = 1) -> None:
        """ShardingError with the numbers if the model or the batch does not divide over the mesh."""
        params_shape, _ = model_layout(model_config)
        specs_lib.check_model(model_config, self.sizes, self.rules, params_shape, self.param_specs(model_config))
        if global_batch is not None:
            specs_lib.check_batch(global_batch, self.sizes, self.rules, grad_accum, jax.process_count())

    def param_specs(self, model_config: ModelConfig) -> Any:
        return specs_lib.param_specs(model_layout(model_config)[1], self.rules)

    def param_shardings(self, model_config: ModelConfig) -> Any:
        return specs_lib.named(self.mesh, self.param_specs(model_config))

    def state_shardings(self, model_config: ModelConfig, state_shape: Any) -> Any:
        """``NamedSharding`` for every leaf of a train state (or any tree holding parameters and their
        optimizer state): parameters and Adam moments by the rules, the rest replicated."""
        params_shape, _ = model_layout(model_config)
        specs = specs_lib.state_specs(state_shape, params_shape, self.param_specs(model_config))
        return specs_lib.named(self.mesh, specs)

    def abstract_sharded(self, state_shape: Any, shardings: Any) -> Any:
        """``ShapeDtypeStruct`` leaves carrying their target sharding (an Orbax restore target)."""
        return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            state_shape, shardings)

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, specs_lib.batch_spec(self.rules))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (its share of the global batch, in process order) -> global arrays."""
        sharding = self.batch_sharding()
        count = jax.process_count()
        return {
            key: jax.make_array_from_process_local_data(
                sharding, np.asarray(value), (np.shape(value)[0] * count, *np.shape(value)[1:])
            )
            for key, value in local_batch.items()
        }

    @contextlib.contextmanager
    def context(self):
        """The mesh and the rules, so that the model's ``nn.with_logical_constraint`` calls take effect."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def in_context(self, fn: Callable) -> Callable:
        """``fn`` called (and so traced) inside ``context()``."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.context():
                return fn(*args, **kwargs)

        return wrapped


@functools.lru_cache(maxsize=8)
def model_layout(model_config: ModelConfig) -> tuple[Any, Any]:
    """(parameter ShapeDtypeStructs, their logical PartitionSpecs), from one abstract initialisation."""
    boxed = abstract_params(model_config)
    shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return shapes, nn.get_partition_spec(boxed)


def _plain(value):
    """A ConfigDict / FrozenConfigDict -> dict (strings and None pass through)."""
    if value is None or isinstance(value, str):
        return value
    return {key: value[key] for key in value}
