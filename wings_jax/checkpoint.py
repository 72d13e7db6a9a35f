"""A wings_jax model checkpoint: Orbax params in ``params/`` next to the ``ModelConfig`` in ``wings_config.json``.

The converters write this layout and the trainer and generation code read it, with one pair of functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from wings_jax.config import ModelConfig

PARAMS_DIR = "params"
CONFIG_FILE = "wings_config.json"


def save_params(directory: str | Path, params: Any, config: ModelConfig) -> None:
    """Write ``params`` (numpy or jax arrays) and ``config`` into ``directory`` (created if needed)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_FILE)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_params(directory: str | Path, target: Any | None = None) -> tuple[Any, ModelConfig]:
    """Read ``(params, config)`` from ``directory``.

    ``target``: an optional pytree of ``jax.ShapeDtypeStruct`` with shardings to restore sharded jax arrays
    (and cast to its dtypes); without it the params come back as host numpy arrays in their stored dtypes.
    """
    directory = Path(directory).absolute()
    if not (directory / CONFIG_FILE).is_file() or not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{directory} is not a wings_jax checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/")
    config = ModelConfig.load(directory / CONFIG_FILE)
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(directory / PARAMS_DIR, target)
    checkpointer.close()
    return params, config
