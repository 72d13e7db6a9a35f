"""Orbax checkpoints of one training stage: the train state and the data iterators' states, as two items.

Saves are asynchronous (the step loop goes on while the state is written); only finished saves
count as checkpoints, so a run killed mid-save resumes from the previous one. The train state is
saved sharded and restores onto any mesh. Every process reads its own shard of the data, so the
data item holds every process's iterator state (in process order); a resume picks its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from wings_jax.checkpoint import host_restore

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


def gather_process_states(data_state: Any) -> list[dict]:
    """Every process's encoded ``data_state``, in process order. Every process must call it (a collective)."""
    encoded = _encode_data_state(data_state)
    if jax.process_count() == 1:
        return [encoded]
    payload = np.frombuffer(json.dumps(encoded).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([payload.size], np.int32)).ravel()  # (processes,)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    rows = multihost_utils.process_allgather(padded)  # (processes, longest payload)
    return [json.loads(bytes(row[:length])) for row, length in zip(rows, lengths, strict=True)]


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
    """Start saving ``state`` and this process's ``data_state`` (its iterator's ``get_state()``, gathered
    with the other processes') as ``step``; waits for the previous save to finish first. Every process
    must call it. The train state may be donated as soon as this returns."""
    data = {"processes": gather_process_states(data_state)}
    manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data)}),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, list]:
    """(train state, every saving process's data-iterator state in process order) saved at ``step``.

    ``abstract_state`` gives shapes and dtypes, and where its leaves carry shardings
    (``sharding.Partitioner.abstract_sharded``) the state is restored onto them, whatever mesh saved it.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(target), DATA_ITEM: ocp.args.JsonRestore()}
        ),
    )
    logging.info("restored step %d from %s", step, manager.directory)
    return restored[STATE_ITEM], [_decode_data_state(s) for s in restored[DATA_ITEM]["processes"]]


def own_data_state(data_states: list, where: str) -> Any:
    """This process's entry of ``restore``'s data states; ValueError if another number of processes saved them
    (each process reads a shard of the data that depends on the process count, so the order cannot carry over)."""
    if len(data_states) != jax.process_count():
        raise ValueError(
            f"{where} holds the data-iterator states of {len(data_states)} processes, but this run has "
            f"{jax.process_count()}; resume with {len(data_states)} processes, or start a new stage from it "
            "(init_from: parameters only)"
        )
    return data_states[jax.process_index()]


def restore_params(directory: str | Path, step: int | None = None) -> tuple[dict, int]:
    """The parameters of a stage's checkpoint (the latest unless ``step``), as host numpy arrays, with its
    step. Reads only the parameters (not the optimizer state), whatever devices and mesh saved them."""
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                                                   DATA_ITEM: ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    saved = manager.item_metadata(step)[STATE_ITEM].tree
    keys = [("params", *key) for key in traverse_util.flatten_dict(saved["params"])]
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: host_restore(keys)}))
    manager.close()
    return restored[STATE_ITEM]["params"], step
