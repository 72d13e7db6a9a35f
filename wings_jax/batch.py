"""The static-shape multimodal batch format and the host-side packing into it.

A batch is a dict of arrays with a fixed sequence length L, where every image occupies
N = ``config.image_tokens`` consecutive slots:

    input_ids       int32  (B, L)   token ids; image slots and padding hold 0
    image_mask      bool   (B, L)   True at image slots; the k-th run of N slots is image k
    pixel_values    float32 (B, max_images, H, W, 3)  normalised pixels, zeros where unused
    image_valid     bool   (B, max_images)            which image slots hold an image
    labels          int32  (B, L)   targets aligned with input_ids (-100: no loss); the loss shifts them
    positions       int32  (B, L)   0..len-1 per sample (0 on padding)
    attention_mask  bool   (B, L)   True on real tokens (right padding)

Samples arrive as token ids in which ``IMAGE_PLACEHOLDER`` stands for one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from wings_jax.config import IGNORE_INDEX, ModelConfig

IMAGE_PLACEHOLDER = -200
BATCH_KEYS = ("input_ids", "image_mask", "pixel_values", "image_valid", "labels", "positions", "attention_mask")


class SampleTooLong(ValueError):
    """A sample does not fit the batch's sequence length (with overflow='error')."""


@dataclass
class Sample:
    """One tokenised sample: ids with ``IMAGE_PLACEHOLDER`` per image, labels of the same length,
    and one preprocessed (H, W, 3) float32 image per placeholder."""

    token_ids: Sequence[int]
    labels: Sequence[int] | None = None
    images: list = field(default_factory=list)
    source: str = ""  # where the sample came from, for error messages


def expand_sample(sample: Sample, image_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace each placeholder by ``image_tokens`` slots: (ids, labels, image_mask), unpadded."""
    ids = np.asarray(sample.token_ids, dtype=np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, np.int64) if sample.labels is None else np.asarray(sample.labels)
    if labels.shape != ids.shape:
        raise ValueError(
            f"{sample.source or 'sample'}: labels length {labels.shape[0]} != token_ids length {ids.shape[0]}"
        )
    is_image = ids == IMAGE_PLACEHOLDER
    n_images = int(is_image.sum())
    if n_images != len(sample.images):
        raise ValueError(
            f"{sample.source or 'sample'}: {n_images} image placeholders but {len(sample.images)} images"
        )
    repeat = np.where(is_image, image_tokens, 1)
    out_ids = np.repeat(np.where(is_image, 0, ids), repeat)
    out_labels = np.repeat(np.where(is_image, IGNORE_INDEX, labels), repeat)
    out_mask = np.repeat(is_image, repeat)
    return out_ids, out_labels, out_mask


def truncate_sample(ids, labels, image_mask, seq_len: int):
    """Cut an expanded sample to ``seq_len`` without splitting an image: an image that would be
    cut is removed whole. Returns (ids, labels, image_mask, images_kept)."""
    if ids.shape[0] > seq_len and image_mask[seq_len - 1] and image_mask[seq_len]:
        start = seq_len
        while start > 0 and image_mask[start - 1]:
            start -= 1
        seq_len = start
    ids, labels, image_mask = ids[:seq_len], labels[:seq_len], image_mask[:seq_len]
    return ids, labels, image_mask, int(image_mask.sum())


def pack_batch(
    samples: Sequence[Sample],
    config: ModelConfig,
    seq_len: int,
    overflow: str = "truncate",
) -> dict[str, np.ndarray]:
    """Pack samples into one right-padded batch dict (see the module docstring).

    ``overflow``: 'truncate' cuts a long sample at ``seq_len`` (never inside an image: an image
    that does not fit is dropped with what follows it); 'error' raises ``SampleTooLong``.
    """
    n_tokens = config.image_tokens
    size = config.vision.image_size
    batch = {
        "input_ids": np.zeros((len(samples), seq_len), np.int32),
        "image_mask": np.zeros((len(samples), seq_len), bool),
        "pixel_values": np.zeros((len(samples), config.max_images, size, size, 3), np.float32),
        "image_valid": np.zeros((len(samples), config.max_images), bool),
        "labels": np.full((len(samples), seq_len), IGNORE_INDEX, np.int32),
        "positions": np.zeros((len(samples), seq_len), np.int32),
        "attention_mask": np.zeros((len(samples), seq_len), bool),
    }
    for row, sample in enumerate(samples):
        if len(sample.images) > config.max_images:
            raise ValueError(
                f"{sample.source or f'sample {row}'}: {len(sample.images)} images, more than "
                f"max_images={config.max_images}"
            )
        ids, labels, image_mask = expand_sample(sample, n_tokens)
        if ids.shape[0] > seq_len:
            if overflow == "error":
                raise SampleTooLong(
                    f"{sample.source or f'sample {row}'}: {ids.shape[0]} tokens (images expanded to "
                    f"{n_tokens} each) exceed the sequence length {seq_len}"
                )
            if overflow != "truncate":
                raise ValueError(f"overflow={overflow!r} is not 'truncate' or 'error'")
        ids, labels, image_mask, kept_slots = truncate_sample(ids, labels, image_mask, seq_len)
        length = ids.shape[0]
        batch["input_ids"][row, :length] = ids
        batch["labels"][row, :length] = labels
        batch["image_mask"][row, :length] = image_mask
        batch["positions"][row, :length] = np.arange(length)
        batch["attention_mask"][row, :length] = True
        for k in range(kept_slots // n_tokens):
            image = np.asarray(sample.images[k], np.float32)
            if image.shape != (size, size, 3):
                raise ValueError(
                    f"{sample.source or f'sample {row}'}: image {k} has shape {image.shape}, expected {(size, size, 3)}"
                )
            batch["pixel_values"][row, k] = image
            batch["image_valid"][row, k] = True
    return batch


def validate_batch(batch: dict, config: ModelConfig) -> None:
    """Check a concrete batch against the format; raise ValueError naming the field."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch needs {list(BATCH_KEYS)}")
    b, seq_len = np.shape(batch["input_ids"])
    for key in ("image_mask", "labels", "positions", "attention_mask"):
        if np.shape(batch[key]) != (b, seq_len):
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, expected {(b, seq_len)}")
    size = config.vision.image_size
    expected = (b, config.max_images, size, size, 3)
    if np.shape(batch["pixel_values"]) != expected:
        raise ValueError(f"batch['pixel_values'] has shape {np.shape(batch['pixel_values'])}, expected {expected}")
    if np.shape(batch["image_valid"]) != (b, config.max_images):
        raise ValueError(
            f"batch['image_valid'] has shape {np.shape(batch['image_valid'])}, expected {(b, config.max_images)}"
        )
    slots = np.asarray(batch["image_mask"]).sum(axis=1)
    images = np.asarray(batch["image_valid"]).sum(axis=1)
    wrong = np.nonzero(slots != images * config.image_tokens)[0]
    if wrong.size:
        row = int(wrong[0])
        raise ValueError(
            f"batch row {row}: {int(slots[row])} image slots but {int(images[row])} valid images x "
            f"{config.image_tokens} image tokens = {int(images[row]) * config.image_tokens}"
        )
    if seq_len > config.wings.router_positions and config.wings.enabled and config.wings.stage == 2:
        raise ValueError(
            f"sequence length {seq_len} exceeds the router's position table wings.router_positions="
            f"{config.wings.router_positions}"
        )
