"""Multi-process start: ``jax.distributed.initialize`` from the config or the environment.

On a TPU pod slice, under SLURM or Open MPI, JAX finds the coordinator itself: every host runs the
same command. Elsewhere (multi-node GPU without a cluster manager) give the coordinator through
the config (``config.sharding.distributed``) or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

logger = logging.getLogger(__name__)

def _several_processes_expected() -> bool:
    """Whether the environment shows a cluster JAX can detect itself (TPU pod, multi-slice, SLURM, Open MPI)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(config: Mapping | None = None) -> bool:
    """Start JAX's multi-process runtime if this run spans several processes; returns whether it did.

    ``config``: ``{coordinator_address, num_processes, process_id}`` ('' / -1: from the environment).
    ``JAX_COORDINATOR_ADDRESS`` etc. override nothing the config sets. With neither, a TPU pod or a
    SLURM / Open MPI job is detected by JAX; a single host runs alone. Must run before any other JAX call.
    """
    config = dict(config or {})
    address = config.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = _int_setting(config, "num_processes", "JAX_NUM_PROCESSES")
    process_id = _int_setting(config, "process_id", "JAX_PROCESS_ID")
    if address:
        if num_processes is None or process_id is None:
            raise ValueError(f"coordinator {address!r} given without num_processes ({num_processes}) and "
                             f"process_id ({process_id}); set both (config.sharding.distributed or "
                             "JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        jax.distributed.initialize(address, num_processes, process_id)
    elif _several_processes_expected():
        jax.distributed.initialize()
    else:
        return False
    logger.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
    return True


def _int_setting(config: Mapping, key: str, variable: str) -> int | None:
    value = config.get(key, -1)
    if value is None or int(value) < 0:
        value = os.environ.get(variable)
    return None if value in (None, "") else int(value)
