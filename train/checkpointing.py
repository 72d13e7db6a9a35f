"""Orbax checkpoints of one training stage: the train state and the data iterator's state, as two items.

Saves are asynchronous (the step loop goes on while the state is written); only finished saves
count as checkpoints, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE_ITEM = "state"
DATA_ITEM = "data"


def make_manager(directory: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager keeping the last ``keep`` checkpoints; the caller decides when to save."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=(STATE_ITEM, DATA_ITEM))


def _encode_data_state(state: Any) -> dict:
    """Grain iterator states are dicts (DatasetIterator) or JSON bytes (DataLoader): store both as JSON."""
    if isinstance(state, bytes):
        return {"encoded": state.decode()}
    return {"state": state}


def _decode_data_state(stored: dict) -> Any:
    return stored["encoded"].encode() if "encoded" in stored else stored["state"]


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
    """Start saving ``state`` and ``data_state`` (an iterator's ``get_state()``) as ``step`` (waits for
    the previous save to finish first); the train state may be donated as soon as this returns."""
    manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(_encode_data_state(data_state))}
        ),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(train state, data-iterator state) saved at ``step``; ``abstract_state`` gives shapes and dtypes."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(target), DATA_ITEM: ocp.args.JsonRestore()}
        ),
    )
    logging.info("restored step %d from %s", step, manager.directory)
    return restored[STATE_ITEM], _decode_data_state(restored[DATA_ITEM])


def restore_params(directory: str | Path, step: int | None = None) -> tuple[dict, int]:
    """The parameters of a stage's checkpoint (the latest unless ``step``), as host arrays, with its step."""
    manager = ocp.CheckpointManager(Path(directory).absolute(), item_names=(STATE_ITEM, DATA_ITEM),
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))
    manager.close()
    return restored[STATE_ITEM]["params"], step
