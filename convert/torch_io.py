"""Streaming IO for PyTorch checkpoints: read tensors one at a time, write sharded safetensors.

Reading memory-maps safetensors files (checked and described by ``safetensors.safe_open``; bfloat16 comes
back as ``ml_dtypes.bfloat16``) and copies one tensor at a time out of the map, dropping its pages after
each, so only the tensor being converted is resident; ``pytorch_model*.bin`` files are read with
``torch.load(mmap=True)``. Writing streams each tensor's bytes into a safetensors file whose
header is planned up front from the names, shapes and dtypes, so the writer never holds a shard in memory.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from convert.errors import ConversionError

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_NUMPY_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class TensorSource:
    """Name -> tensor over one or more checkpoint files, read lazily one tensor at a time."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._handles = []  # (get, shape, dtype) readers per file
        self._where: dict[str, int] = {}
        for path in files:
            reader = _open_safetensors(path) if path.suffix == ".safetensors" else _open_torch_bin(path)
            index = len(self._handles)
            self._handles.append(reader)
            for name in reader.names():
                if name in self._where:
                    raise ConversionError(f"tensor {name} appears in both {files[self._where[name]]} and {path}")
                self._where[name] = index

    def names(self) -> list[str]:
        return list(self._where)

    def file_index(self, name: str) -> int:
        """Which of ``files`` holds ``name``."""
        return self._where[name]

    def release(self, file_index: int) -> None:
        """Unmap one file whose tensors have all been read: its pages otherwise stay resident."""
        self._handles[file_index] = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self._where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._where[name]].get(name)
        except ConversionError:
            raise
        except Exception as err:  # a corrupt or truncated file surfaces here when the reader is lazy
            raise ConversionError(f"cannot read tensor {name} from {self.files[self._where[name]]}: {err}") from err

    def dtype(self, name: str) -> np.dtype:
        return self._handles[self._where[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize


class _SafetensorsReader:
    """``safe_open`` checks the file and describes its tensors; each tensor's bytes are copied out of a
    memory map of our own whose pages are dropped once copied, since a mapping otherwise keeps every page
    it has touched resident (a whole shard beside the converted params)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="np")
        self._slices = {name: self._file.get_slice(name) for name in self._file.keys()}
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._byte_ranges = {name: [8 + header_size + offset for offset in header[name]["data_offsets"]]
                             for name in self._slices}

    def names(self) -> list[str]:
        return list(self._slices)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def dtype(self, name: str) -> np.dtype:
        return _NUMPY_DTYPES[self._slices[name].get_dtype()]

    def get(self, name: str) -> np.ndarray:
        begin, end = self._byte_ranges[name]
        dtype = self.dtype(name)
        array = np.frombuffer(self._map, dtype, (end - begin) // dtype.itemsize, begin).reshape(self.shape(name)).copy()
        if end > begin:
            first_page = begin - begin % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, first_page, end - first_page)
        return array


class _TorchBinReader:
    def __init__(self, path: Path):
        import torch  # only .bin checkpoints need torch

        self._torch = torch
        self._tensors = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        tensor = self._tensors[name]
        if tensor.dtype == self._torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(str(tensor.dtype).removeprefix("torch."))

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _open_safetensors(path: Path) -> _SafetensorsReader:
    try:
        return _SafetensorsReader(path)
    except Exception as err:  # safetensors raises its own error type for bad headers and short files
        raise ConversionError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _open_torch_bin(path: Path) -> _TorchBinReader:
    try:
        return _TorchBinReader(path)
    except Exception as err:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a HF-style checkpoint folder: a sharded index's files, else a single file."""
    if not directory.is_dir():
        raise ConversionError(f"checkpoint folder {directory} does not exist")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = directory / index_name
        if index_path.exists():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path} has no 'weight_map' object")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{index_path} lists shard files that do not exist: {missing}")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise ConversionError(
        f"{directory} holds no weights: expected {SAFE_INDEX}, model.safetensors, *.safetensors, "
        f"{BIN_INDEX} or pytorch_model*.bin"
    )


def open_checkpoint(path: Path) -> TensorSource:
    """A ``TensorSource`` over a checkpoint folder or a single weight file."""
    return TensorSource([path] if path.is_file() else checkpoint_files(path))


def shard_plan(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int) -> list[list[int]]:
    """Split tensors (in order) into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(directory: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[int], np.ndarray], max_shard_size: int,
                      metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``entries`` (name, shape, dtype) as safetensors shards plus ``model.safetensors.index.json``.

    ``produce(i)`` returns the array of entry ``i``; it is called once per tensor, in file order, and the
    array is written and dropped before the next one. One shard is named ``model.safetensors``; more are
    ``model-0000k-of-0000n.safetensors`` (HF naming).
    """
    shards = shard_plan(entries, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in entries)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors") as bar:
        for file_name, shard in zip(names, shards, strict=True):
            _write_one_file(directory / file_name, [entries[i] for i in shard], (produce(i) for i in shard), bar,
                            metadata)
            weight_map.update({entries[i][0]: file_name for i in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]


def _write_one_file(path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterator[np.ndarray],
                    bar: tqdm, metadata: dict[str, str] | None) -> None:
    """The safetensors format: u64 little-endian header length, JSON header, then the raw tensor bytes."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for (name, shape, dtype), array in zip(entries, arrays, strict=True):
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ConversionError(f"tensor {name}: produced {array.shape} {array.dtype}, planned {shape} {dtype}")
            out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            bar.update(array.nbytes)
    log.info("wrote %s (%d tensors)", path, len(entries))
