"""A wings_jax model checkpoint: Orbax params in ``params/`` next to the ``ModelConfig`` in ``wings_config.json``.

The converters write this layout and the trainer and generation code read it, with one pair of functions;
``ParamLeaves`` reads it one leaf at a time for exports that stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from wings_jax.config import ModelConfig

PARAMS_DIR = "params"
CONFIG_FILE = "wings_config.json"


def _params_checkpointer() -> ocp.Checkpointer:
    """Orbax's standard params format, written without keeping a second copy of the params: numpy leaves are
    written from the caller's arrays (Orbax deep-copies them by default in case the caller changes them
    during an asynchronous save; ``save_params`` waits) and uncompressed (zstd holds a compressed copy
    of every leaf until the write commits, and saves little on weights). Readers need no option for either."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


def save_params(directory: str | Path, params: Any, config: ModelConfig) -> None:
    """Write ``params`` (numpy or jax arrays, unchanged until this returns) and ``config`` into ``directory``
    (created if needed). Memory: the params plus about one leaf."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_FILE)
    checkpointer = _params_checkpointer()
    checkpointer.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    checkpointer.close()


def _checked(directory: str | Path) -> Path:
    directory = Path(directory).absolute()
    if not (directory / CONFIG_FILE).is_file() or not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{directory} is not a wings_jax checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/")
    return directory


def load_params(directory: str | Path, target: Any | None = None) -> tuple[Any, ModelConfig]:
    """Read ``(params, config)`` from ``directory``.

    ``target``: an optional pytree of ``jax.ShapeDtypeStruct`` with shardings to restore sharded jax arrays
    (and cast to its dtypes); without it the params come back as host numpy arrays in their stored dtypes,
    whatever devices wrote them.
    """
    directory = _checked(directory)
    config = ModelConfig.load(directory / CONFIG_FILE)
    if target is not None:
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore(directory / PARAMS_DIR, target)
    else:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        metadata = checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree
        params = checkpointer.restore(directory / PARAMS_DIR, args=host_restore(traverse_util.flatten_dict(metadata)))
    checkpointer.close()
    return params, config


def host_restore(keys: Iterable[tuple[str, ...]]) -> ocp.args.PyTreeRestore:
    """Restore arguments that read the leaves at ``keys`` (paths of key tuples into the saved tree) as host
    numpy arrays in their stored dtypes.

    Without them Orbax puts each saved jax.Array back on the devices that wrote it, which fails on any
    other machine or mesh: a checkpoint trained on a GPU or on 8 devices must load on a 1-CPU laptop.
    """
    keys = list(keys)
    return ocp.args.PyTreeRestore(
        item=traverse_util.unflatten_dict({key: np.empty(0) for key in keys}),
        restore_args=traverse_util.unflatten_dict({key: ocp.RestoreArgs(restore_type=np.ndarray) for key in keys}),
        partial_restore=True,
    )


class ParamLeaves:
    """A checkpoint's params read a few leaves at a time (Orbax partial restore), as host numpy arrays in their
    stored dtypes, so that an export holds the leaves it is writing rather than the whole tree.

    ``shapes`` and ``dtypes`` map each '/'-joined leaf path to its stored shape and dtype (read from the
    metadata, no array data); ``read(paths)`` restores those leaves.
    """

    def __init__(self, directory: str | Path):
        directory = _checked(directory)
        self.config = ModelConfig.load(directory / CONFIG_FILE)
        self._params_dir = directory / PARAMS_DIR
        self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        metadata = self._checkpointer.metadata(self._params_dir).item_metadata.tree
        leaves = traverse_util.flatten_dict(metadata, sep="/")
        self.shapes = {path: tuple(leaf.shape) for path, leaf in leaves.items()}
        self.dtypes = {path: np.dtype(leaf.dtype) for path, leaf in leaves.items()}

    def read(self, paths: list[str]) -> dict[str, np.ndarray]:
        """The leaves at ``paths``, restored together (one restore has a fixed cost of some milliseconds)."""
        unknown = [path for path in paths if path not in self.shapes]
        if unknown:
            raise KeyError(f"{self._params_dir} holds no params {unknown}")
        keys = [tuple(path.split("/")) for path in paths]
        restored = self._checkpointer.restore(self._params_dir, args=host_restore(keys))
        leaves = traverse_util.flatten_dict(restored)
        return {path: leaves[key] for path, key in zip(paths, keys, strict=True)}

    def close(self) -> None:
        self._checkpointer.close()
