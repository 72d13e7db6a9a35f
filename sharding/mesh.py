"""The device mesh from config: axes ``data``, ``fsdp``, ``tensor``, one of which may be -1 ("the rest").

A mesh config is a mapping such as ``{"data": 1, "fsdp": -1, "tensor": 1}`` (missing axes are 1),
or the same as a string ``"fsdp=-1,tensor=2"``. With a ``dcn`` mesh config (multi-slice TPU, or
multi-node GPU where each process is one granule), the mesh is hybrid: ``mesh`` then gives the
shape within one slice (ICI) and ``dcn`` how many slices each axis spans; the global size of an
axis is their product.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
AUTO = -1

logger = logging.getLogger(__name__)


class ShardingError(ValueError):
    """A mesh, rules table or batch that cannot work with the devices or the model; the message has the numbers."""


def parse_mesh_spec(spec: str | Mapping | None) -> dict[str, int]:
    """``"fsdp=64,tensor=1"`` or a mapping -> {axis: size} over all of ``MESH_AXES`` (missing axes are 1)."""
    if spec is None:
        spec = {}
    if isinstance(spec, str):
        items = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ShardingError(f"mesh entry {item!r} is not axis=integer (in {spec!r})") from None
            if not sep:
                raise ShardingError(f"mesh entry {item!r} is not axis=integer (in {spec!r})")
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"mesh names unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    bad = {axis: size for axis, size in sizes.items() if size < 1 and size != AUTO}
    if bad:
        raise ShardingError(f"mesh sizes {bad} must be >= 1 (or -1 for the rest of the devices)")
    autos = [axis for axis, size in sizes.items() if size == AUTO]
    if len(autos) > 1:
        raise ShardingError(f"mesh has -1 on {autos}; at most one axis can take the rest of the devices")
    return sizes


def describe(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


def resolve_mesh_shape(spec: str | Mapping | None, num_devices: int, what: str = "devices") -> dict[str, int]:
    """Axis sizes whose product is ``num_devices``, with a -1 axis filled in; ShardingError if impossible."""
    sizes = parse_mesh_spec(spec)
    fixed = math.prod(size for size in sizes.values() if size != AUTO)
    auto = [axis for axis, size in sizes.items() if size == AUTO]
    if auto:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {describe(sizes)}: the fixed axes need a multiple of {fixed} {what}, but there are "
                f"{num_devices}, so {auto[0]}=-1 cannot take the rest"
            )
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(f"mesh {describe(sizes)} needs {fixed} {what}, but there are {num_devices}")
    return sizes


def make_mesh(
    spec: str | Mapping | None = None,
    dcn: str | Mapping | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``Mesh`` with axes ``MESH_AXES`` over ``devices`` (default: all), hybrid ICI x DCN when ``dcn`` is given.

    Without ``dcn`` the device order comes from ``jax.make_mesh`` (physical topology on TPU/GPU).
    With it, ``mesh_utils.create_hybrid_device_mesh`` places each ``dcn`` step on another slice
    (TPU ``slice_index``) or, on other platforms, another process.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if not dcn:
        sizes = resolve_mesh_shape(spec, len(devices))
        mesh = jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types, devices=devices)
    else:
        dcn_sizes = parse_mesh_spec(dcn)
        granules = _granule_count(devices)
        dcn_sizes = resolve_mesh_shape(dcn_sizes, granules, what="slices (DCN granules)")
        ici_sizes = resolve_mesh_shape(spec, len(devices) // granules, what="devices per slice")
        array = mesh_utils.create_hybrid_device_mesh(
            tuple(ici_sizes.values()), tuple(dcn_sizes.values()), devices,
            process_is_granule=_granule_key(devices) == "process_index", allow_split_physical_axes=True,
        )
        mesh = Mesh(array, MESH_AXES, axis_types=axis_types)
    logger.info("mesh %s over %d devices", describe(dict(mesh.shape)), len(devices))
    return mesh


def _granule_key(devices: Sequence[jax.Device]) -> str:
    """TPU slices are DCN granules; on other platforms each process is one."""
    return "slice_index" if devices[0].platform == "tpu" else "process_index"


def _granule_count(devices: Sequence[jax.Device]) -> int:
    """Slices (TPU) or processes (elsewhere) among ``devices``, each holding the same number of devices."""
    key = _granule_key(devices)
    counts = np.unique([getattr(d, key) for d in devices], return_counts=True)[1]
    if len(set(counts)) != 1:
        raise ShardingError(f"devices are spread unevenly over {key} values: {counts.tolist()} devices each")
    return len(counts)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """{axis: size} of a mesh."""
    return dict(mesh.shape)
