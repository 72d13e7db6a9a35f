"""MLLM-Laws of a checkpoint over a LLaVA JSON/JSONL file (spec section 5)::

    python -m train.laws --checkpoint DIR --data records.jsonl [--image-root DIR] --out laws.json --plot laws.png

Each usable record's whole conversation (answers included) runs through the model; the JSON holds the
mean per-layer shares of the before-image, image and after-image segments, the attention shift and its
per-sample values, and the bad records by kind (a record that cannot be used is counted, never fatal).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from train.data import BadRecord, BadRecordCounter, load_image
from train.data.conversation import IMAGE_MARK, ConversationError
from train.data.sources import make_source
from train.inference import Assistant
from wings_jax.batch import SampleTooLong
from wings_jax.laws import SEGMENTS, plot_laws


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
    """Per-sample shares and masses of the records the model accepts (one at a time when a batch fails)."""
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    np.set_printoptions(precision=4)
    main()
