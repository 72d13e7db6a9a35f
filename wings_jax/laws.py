"""MLLM-Laws (spec section 5): how each layer's attention splits between the text before the image,
the image and the text after it, and the attention shift between the before- and after-image curves.

The masses come from ``WingsModel`` mode 'laws', which carries segment indicators as extra value
channels of the main attention (the probabilities are never materialised): for sample b, layer l and
segment V, ``mass[b, l, V] = sum over real queries i, keys j in V of P^l[i, j]``, heads averaged.

From the command line, over a LLaVA JSON/JSONL file::

    python -m wings_jax.laws --checkpoint DIR --data records.jsonl [--image-root DIR] --out laws.json --plot laws.png

Each usable record's whole conversation (answers included) runs through the model; the JSON holds the
mean per-layer shares of the before-image, image and after-image segments, the attention shift and its
per-sample values, and the bad records by kind (a record that cannot be used is counted, never fatal).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from wings_jax.bad_records import BadRecord, BadRecordCounter
from wings_jax.batch import SampleTooLong
from wings_jax.config import ModelConfig
from wings_jax.conversation import IMAGE_MARK, ConversationError
from wings_jax.images import load_image
from wings_jax.model import WingsModel
from wings_jax.sources import make_source

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from wings_jax.api import Assistant

SEGMENTS = ("before", "image", "after")


class LawsSummary(NamedTuple):
    shares: np.ndarray  # (n_layers, 3) mean over samples of each segment's share of a query's attention
    shift_per_sample: np.ndarray  # (S,) 1 - pearson(before, after) for every sample where it is defined
    attention_shift: float  # mean of shift_per_sample (nan when none is defined)


@functools.partial(jax.jit, static_argnames=("config",))
def _masses(config: ModelConfig, params, batch: dict):
    return WingsModel(config).apply({"params": params}, batch, mode="laws")


def segment_masses(config: ModelConfig, params, batch: dict) -> np.ndarray:
    """Per-layer attention mass on the (before, image, after) key segments: float32 (B, n_layers, 3)."""
    return np.asarray(_masses(config.replace(remat_policy="none"), params, batch))


def segment_shares(masses: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Masses divided by each sample's number of real queries: the mean fraction of one query's attention
    that lands on each segment, (B, n_layers, 3). Text between two images belongs to no segment, so the
    three shares add up to at most 1."""
    queries = np.asarray(attention_mask).sum(axis=1).astype(np.float64)
    return masses / np.maximum(queries, 1)[:, None, None]


def attention_shift(masses: np.ndarray) -> np.ndarray:
    """1 - pearson(LAWS_before, LAWS_after) over the layers, per sample (B,); nan where a curve is constant
    (e.g. a sample without text before or after its image), where the correlation is undefined."""
    before = masses[:, :, 0] - masses[:, :, 0].mean(axis=1, keepdims=True)
    after = masses[:, :, 2] - masses[:, :, 2].mean(axis=1, keepdims=True)
    norms = np.sqrt((before**2).sum(axis=1) * (after**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.where(norms > 0, (before * after).sum(axis=1) / norms, np.nan)
    return 1.0 - correlation


def summarise(shares: np.ndarray, masses: np.ndarray) -> LawsSummary:
    """Mean per-layer shares over samples (B, n_layers, 3) and the mean attention shift over the samples
    where it is defined."""
    shift = attention_shift(masses)
    defined = shift[np.isfinite(shift)]
    return LawsSummary(
        shares=shares.mean(axis=0),
        shift_per_sample=defined,
        attention_shift=float(defined.mean()) if defined.size else float("nan"),
    )


def laws_figure(summary: LawsSummary, title: str = "") -> Figure:
    """The three per-layer share curves (LAWS_before, LAWS_image, LAWS_after) as a matplotlib figure
    (not registered with pyplot, so it changes no backend; a notebook displays it as it is)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    layers = np.arange(1, summary.shares.shape[0] + 1)
    for index, name in enumerate(SEGMENTS):
        axis.plot(layers, summary.shares[:, index], marker="o", label=f"{name} image" if name != "image" else name)
    axis.set_xlabel("layer")
    axis.set_ylabel("attention share")
    axis.set_title(f"{title} attention shift = {summary.attention_shift:.4f}".strip())
    axis.legend()
    figure.tight_layout()
    return figure


def plot_laws(summary: LawsSummary, path: str, title: str = "") -> None:
    """Save ``laws_figure(summary, title)`` as an image file."""
    laws_figure(summary, title).savefig(path, dpi=120)


def usable_records(source, counter: BadRecordCounter, limit: int | None, image_size: int):
    """(origin, id, turns, [pixels]) of every record with a conversation; the rest counted. A missing or
    unreadable image is counted and replaced by the mean-colour image, as in training."""
    records = []
    for index in range(len(source) if limit is None else min(limit, len(source))):
        item = source[index]
        if item.record is None:
            counter.add(BadRecord("malformed_record", item.origin, item.record_id, item.problem or ""))
            continue
        turns, image = item.record.get("conversations"), item.record.get("image")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "value" in t for t in turns):
            counter.add(BadRecord("bad_conversations", item.origin, item.record_id, "no usable 'conversations'"))
            continue
        turns = [dict(t) for t in turns]
        images = []
        if image is not None:
            pixels, problem = load_image(image, image_size)
            if problem:
                counter.add(BadRecord("missing_image", item.origin, item.record_id, problem))
            images.append(pixels)
            if not any(IMAGE_MARK in t["value"] for t in turns):
                turns[0]["value"] = IMAGE_MARK + "\n" + turns[0]["value"]
        records.append((item.origin, item.record_id, turns, images))
    return records


def compute_laws(assistant: Assistant, records, counter: BadRecordCounter, batch_size: int):
    """Per-sample shares and masses of the records the model accepts; the others counted."""
    good = []
    for origin, record_id, turns, images in tqdm(records, desc="checking records"):
        try:
            assistant.sample(turns, images, for_answer=False)
        except SampleTooLong as error:
            counter.add(BadRecord("dropped_too_long", origin, record_id, str(error)))
            continue
        except (ConversationError, ValueError) as error:
            kind = getattr(error, "kind", "bad_conversations")
            counter.add(BadRecord(kind, origin, record_id, str(error)))
            continue
        good.append((turns, images))
    if not good:
        raise ValueError("no usable record: see the bad-record summary above")
    return assistant.laws(good, batch_size=batch_size)


def main(argv=None) -> dict:
    """The command line (see the module docstring); returns the report written to ``--out``."""
    # Imported here: wings_jax.api imports this module for the library functions above.
    from wings_jax.api import Assistant

    parser = argparse.ArgumentParser(prog="python -m wings_jax.laws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a wings_jax.checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--data", required=True, help="LLaVA records (.json or .jsonl)")
    parser.add_argument("--image-root", help="directory that relative image paths start from")
    parser.add_argument("--limit", type=int, help="use at most this many records")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="laws.json")
    parser.add_argument("--plot", help="write the per-layer share curves to this image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    assistant = Assistant.load(args.checkpoint, args.tokenizer, template=args.template)
    counter = BadRecordCounter()
    source = make_source({"path": args.data, "image_root": args.image_root})
    records = usable_records(source, counter, args.limit, assistant.config.vision.image_size)
    summary, shares = compute_laws(assistant, records, counter, args.batch_size)
    report = {
        "samples": int(shares.shape[0]),
        "shares": {name: summary.shares[:, i].tolist() for i, name in enumerate(SEGMENTS)},
        "attention_shift": summary.attention_shift,
        "shift_samples": int(summary.shift_per_sample.size),
        "shift_per_sample": summary.shift_per_sample.tolist(),
        "bad_records": counter.totals(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    if any(counter.totals().values()):
        logging.warning("%s", counter.summary())
    if args.plot:
        plot_laws(summary, args.plot, title=Path(args.checkpoint).name)
    logging.info("attention shift %.4f over %d samples (%d with text on both sides of the image)",
                 summary.attention_shift, shares.shape[0], summary.shift_per_sample.size)
    return report


if __name__ == "__main__":
    main()
