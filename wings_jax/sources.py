"""Random-access record sources: LLaVA JSON lists, JSONL files and TFDS (array_record) datasets.

Every source maps an index to a ``SourceRecord``: the LLaVA record dict ``{"id", "image"?,
"conversations": [{"from", "value"}, ...]}`` with ``image`` resolved against the image root (or
holding image bytes / a uint8 array), plus where it came from. A raw entry that cannot be parsed
comes back with ``record=None`` and the reason, so the pipeline can count it instead of failing.
Sources are picklable, for Grain's worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("json", "jsonl", "tfds")


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    origin: str  # 'file[index]', 'file:line' or 'tfds:name/split[index]'
    record: dict | None
    problem: str | None = None  # why ``record`` is None

    @property
    def record_id(self) -> str:
        if isinstance(self.record, dict) and "id" in self.record:
            return str(self.record["id"])
        return "?"


def resolve_image(record: dict, image_root: str | None) -> dict:
    """A copy of ``record`` whose relative ``image`` path is joined to ``image_root``."""
    image = record.get("image")
    if isinstance(image, str) and image_root and not os.path.isabs(image):
        record = {**record, "image": os.path.join(image_root, image)}
    return record


def _as_record(value: Any, origin: str, image_root: str | None) -> SourceRecord:
    if not isinstance(value, dict):
        return SourceRecord(origin, None, f"expected a JSON object, got {type(value).__name__}")
    return SourceRecord(origin, resolve_image(value, image_root))


class JsonSource:
    """A LLaVA JSON file: one list of records, loaded into memory (as the reference does)."""

    def __init__(self, path: str, image_root: str | None = None):
        with open(path, encoding="utf-8") as file:
            records = json.load(file)
        if not isinstance(records, list):
            raise ValueError(f"{path}: a LLaVA JSON source must hold a list of records, found {type(records).__name__}")
        self.path, self.image_root, self._records = path, image_root, records
        logger.info("%s: %d records", path, len(records))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> SourceRecord:
        return _as_record(self._records[index], f"{self.path}[{index}]", self.image_root)


class JsonlSource:
    """A JSONL file, one record per line, read lazily by byte offset (blank lines are not records)."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path, self.image_root = path, image_root
        offsets, lengths, line_numbers = [], [], []
        position = 0
        with open(path, "rb") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    offsets.append(position)
                    lengths.append(len(line))
                    line_numbers.append(line_number)
                position += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        self._fd: int | None = None
        logger.info("%s: %d records", path, len(offsets))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> SourceRecord:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread: no shared file position, so Grain's reader threads can share the descriptor.
        raw = os.pread(self._fd, int(self._lengths[index]), int(self._offsets[index]))
        origin = f"{self.path}:{int(self._line_numbers[index])}"
        try:
            value = json.loads(raw)
        except ValueError as error:
            return SourceRecord(origin, None, f"not valid JSON ({error})")
        return _as_record(value, origin, self.image_root)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # each process opens its own descriptor

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _text(value) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_example_to_record(example: dict, image_root: str | None = None) -> dict:
    """Map one TFDS example to a LLaVA record dict.

    Expected features: ``id`` (Text); ``conversations`` as JSON text, or a sequence feature
    ``{"from": [...], "value": [...]}``; optionally ``image`` (encoded image bytes, or a uint8
    array as ``tfds.features.Image`` gives; empty for text-only) or ``image_path`` (Text, relative
    to ``image_root``). Raises ValueError naming the missing feature.
    """
    if "conversations" not in example:
        raise ValueError(f"TFDS example lacks the 'conversations' feature (has {sorted(example)})")
    conversations = example["conversations"]
    if isinstance(conversations, dict):
        conversations = [
            {"from": _text(role), "value": _text(value)}
            for role, value in zip(conversations["from"], conversations["value"], strict=True)
        ]
    else:
        conversations = json.loads(_text(conversations))
    record = {"conversations": conversations}
    if "id" in example:
        record["id"] = _text(example["id"])
    image = example.get("image")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
        image = image.tobytes()  # encoded bytes stored as a 1-D uint8 tensor
    if image is not None and len(image):
        record["image"] = image
    elif example.get("image_path") is not None and _text(example["image_path"]):
        record["image"] = _text(example["image_path"])
    return resolve_image(record, image_root)


class TfdsSource:
    """A TFDS dataset prepared in the array_record format, read with ``tfds.data_source``
    (random access, no TensorFlow needed to read)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_root: str | None = None):
        import tensorflow_datasets as tfds  # optional dependency, imported only for TFDS sources

        self.name, self.split, self.image_root = name, split, image_root
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        logger.info("tfds:%s/%s: %d records", name, split, len(self._source))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> SourceRecord:
        origin = f"tfds:{self.name}/{self.split}[{index}]"
        try:
            return SourceRecord(origin, tfds_example_to_record(self._source[index], self.image_root))
        except (ValueError, KeyError, TypeError) as error:
            return SourceRecord(origin, None, str(error))


def make_source(spec) -> JsonSource | JsonlSource | TfdsSource:
    """A source from a config entry ``{path, kind: json|jsonl|tfds, image_root?, split?, data_dir?}``
    (for tfds, ``path`` is the dataset name, e.g. 'llava_instruct:1.0.0')."""
    kind = spec.get("kind") or ("jsonl" if str(spec["path"]).endswith(".jsonl") else "json")
    image_root = spec.get("image_root")
    if kind == "json":
        return JsonSource(spec["path"], image_root)
    if kind == "jsonl":
        return JsonlSource(spec["path"], image_root)
    if kind == "tfds":
        return TfdsSource(spec["path"], spec.get("split") or "train", spec.get("data_dir"), image_root)
    raise ValueError(f"source {spec['path']!r}: kind={kind!r} is not one of {SOURCE_KINDS}")
