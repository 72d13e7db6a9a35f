"""The demo's two ends: write the demo dataset into the workdir, and after training report the loss
curves, the accuracy of generated answers on held-out images, and a few examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from train import checkpointing
from train.data import write_demo_dataset
from train.data.demo_data import COLOURS, SHAPES
from train.metrics import loss_curve_table, read_metrics
from wings_jax.batch import Sample, pack_batch
from wings_jax.conversation import ConversationTokenizer
from wings_jax.generate import greedy_generate
from wings_jax.images import load_image
from wings_jax.model import WingsModel

DATA_DIR = "data"
COMPLETE_MARK = "complete"
EVAL_BATCH = 64
# chance accuracy of each question kind (uniform guessing among the answers the data uses)
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "arithmetic": 1 / 19}


def prepare_demo_data(config, workdir: Path) -> None:
    """Write the demo dataset into ``workdir/data`` unless a finished one is there."""
    root = workdir / DATA_DIR
    if (root / COMPLETE_MARK).is_file():
        return
    logging.info("writing the demo dataset into %s", root)
    write_demo_dataset(str(root), config.demo.n_train, config.demo.n_eval, config.demo.data_seed)
    (root / COMPLETE_MARK).write_text(json.dumps(config.demo.to_dict()) + "\n")


def eval_questions(root: Path) -> list[dict]:
    """Every held-out question as {kind, question, answer, image (path or None)}."""
    questions = []
    for line in (root / "stage2_eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            question = human["value"].replace("<image>\n", "")
            kind = "colour" if "colour" in question else "shape"
            questions.append({"kind": kind, "question": question, "answer": gpt["value"],
                              "image": str(root / "images" / record["image"])})
    for line in (root / "text_eval.jsonl").read_text().splitlines():
        human, gpt = json.loads(line)["conversations"]
        questions.append({"kind": "arithmetic", "question": human["value"], "answer": gpt["value"], "image": None})
    return questions


def prompt_sample(conversations: ConversationTokenizer, question: dict, image_size: int) -> Sample:
    """The question as a one-turn prompt ending with the assistant prefix, ready for generation."""
    has_image = question["image"] is not None
    turns = [{"from": "human", "value": ("<image>\n" if has_image else "") + question["question"]},
             {"from": "gpt", "value": ""}]
    ids, labels = conversations(turns, has_image)
    prompt_end = next(i for i, label in enumerate(labels) if label >= 0)  # the labelled end-of-turn suffix
    images = [load_image(question["image"], image_size)[0]] if has_image else []
    return Sample(ids[:prompt_end], None, images, source=question["question"])


def answer_questions(model_config, params, tokenizer, data_config, questions: list[dict], seq_len: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers to ``questions`` (fixed-size batches, so generation compiles once)."""
    conversations = ConversationTokenizer(tokenizer, data_config.template, data_config.system_prompt)
    eos_id = tokenizer.convert_tokens_to_ids(conversations.template.assistant_suffix.strip() or tokenizer.eos_token)
    model = WingsModel(model_config)
    samples = [prompt_sample(conversations, q, model_config.vision.image_size) for q in questions]
    answers = []
    for start in range(0, len(samples), EVAL_BATCH):
        chunk = samples[start:start + EVAL_BATCH]
        padded = chunk + [chunk[-1]] * (EVAL_BATCH - len(chunk))
        batch = pack_batch(padded, model_config, seq_len, overflow="error")
        tokens = greedy_generate(model, params, batch, max_new_tokens, eos_id)[: len(chunk)]
        for row in tokens:
            end = np.flatnonzero(row == eos_id)
            answers.append(tokenizer.decode(row[: end[0] if end.size else len(row)]).strip())
    return answers


def report_demo(config, workdir: Path, tokenizer, results) -> dict[str, float]:
    """Print loss curves, held-out accuracy per question kind (with chance) and examples; returns
    the accuracies."""
    curves = {}
    for result in results:
        records = read_metrics(result.directory / "metrics.jsonl")
        curves[f"{result.name} loss"] = [r["loss"] for r in records]
    print("\nLoss curves (per step)\n" + loss_curve_table(curves))

    last = results[-1]
    params, _ = checkpointing.restore_params(last.directory / "checkpoints")
    questions = eval_questions(workdir / DATA_DIR)
    stage = config[last.name]
    answers = answer_questions(last.model_config, params, tokenizer, stage.data, questions, stage.seq_len,
                               config.demo.max_new_tokens)
    accuracy = {}
    print(f"\nHeld-out accuracy after {last.name} (greedy answers, exact match)")
    for kind in CHANCE:
        hits = [a == q["answer"] for q, a in zip(questions, answers, strict=True) if q["kind"] == kind]
        accuracy[kind] = float(np.mean(hits))
        print(f"  {kind:<11} {accuracy[kind]:6.1%} of {len(hits):3d}   (chance {CHANCE[kind]:.1%})")
    print("\nExamples")
    per_kind = max(1, config.demo.examples // len(CHANCE))
    pairs = list(zip(questions, answers, strict=True))
    shown = [pair for kind in CHANCE for pair in [p for p in pairs if p[0]["kind"] == kind][:per_kind]]
    for question, answer in shown:
        where = Path(question["image"]).name if question["image"] else "no image"
        mark = "ok " if answer == question["answer"] else "BAD"
        print(f"  [{mark}] ({where}) {question['question']!r} -> {answer!r} (expected {question['answer']!r})")
    return accuracy
