"""The train state and its creation: fresh parameters, overlaid with loaded ones where given."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from wings_jax.config import ModelConfig
from wings_jax.model import init_params


@struct.dataclass
class TrainState:
    """Everything a training step changes. The optimizer itself is static and lives outside."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def overlay_params(fresh: Mapping, loaded: Mapping, source: str = "loaded params") -> dict:
    """``fresh`` with every leaf that ``loaded`` has replaced by the loaded one.

    Leaves only in ``fresh`` (e.g. the router when stage 2 starts from a stage-1 checkpoint) keep
    their fresh initialisation. A loaded leaf the model lacks, or one of another shape, is an error.
    """
    flat_fresh = traverse_util.flatten_dict(fresh)
    flat_loaded = traverse_util.flatten_dict(loaded)
    unknown = sorted("/".join(p) for p in flat_loaded if p not in flat_fresh)
    if unknown:
        raise ValueError(f"{source} has parameters the model lacks: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    for path, value in flat_loaded.items():
        if np.shape(value) != np.shape(flat_fresh[path]):
            raise ValueError(f"{source}: {'/'.join(path)} has shape {np.shape(value)}, the model expects "
                             f"{np.shape(flat_fresh[path])}")
    return traverse_util.unflatten_dict({**flat_fresh, **flat_loaded})


def fresh_only_paths(fresh: Mapping, loaded: Mapping) -> list[str]:
    """Paths that ``overlay_params`` leaves freshly initialised (for logging what a stage adds)."""
    flat_loaded = traverse_util.flatten_dict(loaded)
    return sorted("/".join(p) for p in traverse_util.flatten_dict(fresh) if p not in flat_loaded)


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    seq_len: int,
    loaded_params: Mapping | None = None,
    state_sharding: Any = None,
) -> TrainState:
    """Initialise the model (overlaid with ``loaded_params``) and the optimizer, in one jitted call.

    ``state_sharding`` (a TrainState of shardings, ``sharding.Partitioner.state_shardings``): the
    state is created directly sharded, so no device ever holds all of it.

    Fresh values that the loaded ones replace are dead code that XLA removes, so loading a large
    checkpoint never materialises a second random copy of it.
    """
    loaded_params = {} if loaded_params is None else loaded_params

    def init(rng, loaded):
        fresh = init_params(model_config, rng, seq_len=seq_len)
        params = overlay_params(fresh, loaded)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(model_config.param_dtype)), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    if loaded_params:
        added = fresh_only_paths(jax.eval_shape(lambda r: init_params(model_config, r, seq_len=seq_len), rng),
                                 loaded_params)
        if added:
            logging.info("initialising %d parameters the loaded ones lack, e.g. %s", len(added), added[:4])
    return jax.jit(init, **({} if state_sharding is None else {"out_shardings": state_sharding}))(rng, loaded_params)


def abstract_train_state(
    model_config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int
) -> TrainState:
    """Shapes and dtypes of the train state, without computing it (the target of a restore)."""
    return jax.eval_shape(lambda r: create_train_state(model_config, tx, r, seq_len), rng)
