"""Multiple-choice evaluation of a Wings checkpoint by option log-likelihood::

    python -m train.eval --checkpoint DIR --config eval.json [--tokenizer DIR] [--out results.json]

``eval.json``::

    {"bootstrap": 1000, "seed": 0, "tasks": [
      {"name": "mmlu", "kind": "multiple_choice", "path": "mmlu.jsonl"},
      {"name": "mmbench", "kind": "multiple_choice", "path": "mmbench.jsonl", "image_root": "images/"},
      {"name": "interleaved", "kind": "interleaved", "text_path": "mmlu.jsonl", "visual_path": "mmbench.jsonl",
       "image_root": "images/", "patterns": ["T", "TT", "TTT", "TV", "TTV", "V"], "samples": 200}]}

Records (JSONL): ``{"id", "question", "options": [..] or {"A": .., "B": ..}, "answer": "B" | 1, "image"?}``.
A question is asked as the question, the lettered options and an instruction; each option letter is
scored as the whole assistant reply and the most likely one is the model's answer. Accuracy comes
with a bootstrap 95 % interval. The interleaved composer builds conversations of several questions
from the text pool (T) and the visual pool (V) in the pattern's order; earlier turns are answered
with their gold letters and only the last turn is scored (Wings' interleaved image-text benchmark).
Records that cannot be used are counted by kind and skipped, never fatal.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wings_jax.api import Assistant
from wings_jax.batch import SampleTooLong
from wings_jax.conversation import IMAGE_MARK, ConversationError
from wings_jax.images import load_image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
TASK_KINDS = ("multiple_choice", "interleaved")


class BadInput(ValueError):
    """A record that cannot be evaluated; ``kind`` is what the counts are keyed by."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    image: str | None  # resolved path


def parse_question(record, image_root: str | None) -> Question:
    """A JSONL record -> Question; raises BadInput naming the field."""
    if not isinstance(record, dict):
        raise BadInput("malformed_record", f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("question"), str):
        raise BadInput("missing_field", "'question' is missing or not a string")
    options = record.get("options")
    if isinstance(options, dict):
        options = [options[letter] for letter in sorted(options)]
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS) or not all(
            isinstance(o, str) for o in options):
        raise BadInput("bad_options", f"'options' must be 2..{len(LETTERS)} strings, got {options!r:.80}")
    answer = record.get("answer")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise BadInput("bad_answer", f"'answer' {record.get('answer')!r} names none of the {len(options)} options")
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise BadInput("missing_image", f"'image' is {image!r:.80}, expected a path")
        image = str(Path(image_root) / image) if image_root and not Path(image).is_absolute() else image
    return Question(str(record.get("id", "?")), record["question"], tuple(options), answer, image)


def question_text(question: Question) -> str:
    lines = [question.question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options)]
    return "\n".join(lines + [INSTRUCTION])


def read_questions(path: str, image_root: str | None, bad: collections.Counter, limit: int | None = None):
    """Every usable question of a JSONL file; unusable lines are logged with file:line and counted."""
    questions = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                questions.append(parse_question(json.loads(line), image_root))
            except ValueError as error:  # BadInput and JSON errors alike
                kind = getattr(error, "kind", "malformed_record")
                bad[kind] += 1
                logging.warning("%s:%d: %s (%s): skipped", path, line_number, error, kind)
            if limit is not None and len(questions) >= limit:
                break
    return questions


class Scorer:
    """Asks conversations of questions and scores the last one, counting what cannot be asked."""

    def __init__(self, assistant: Assistant):
        self.assistant = assistant
        self.bad: collections.Counter = collections.Counter()

    def _pixels(self, question: Question):
        pixels, problem = load_image(question.image, self.assistant.config.vision.image_size)
        if problem:
            raise BadInput("missing_image", problem)
        return pixels

    def ask(self, questions: list[Question]) -> bool | None:
        """Earlier questions answered with their gold letters, the last one scored: correct or not (None: the
        conversation could not be asked; counted)."""
        turns, images = [], []
        try:
            for index, question in enumerate(questions):
                text = question_text(question)
                if question.image is not None:
                    images.append(self._pixels(question))
                    text = IMAGE_MARK + "\n" + text
                turns.append({"from": "human", "value": text})
                if index + 1 < len(questions):
                    turns.append({"from": "gpt", "value": LETTERS[question.answer]})
            last = questions[-1]
            scores = self.assistant.option_logprobs(turns, list(LETTERS[: len(last.options)]), images)
        except SampleTooLong as error:
            return self._count("too_long", questions[-1], error)
        except (BadInput, ConversationError) as error:
            return self._count(getattr(error, "kind", "bad_conversation"), questions[-1], error)
        except ValueError as error:  # e.g. more images than the model's image slots
            return self._count("unusable", questions[-1], error)
        return int(np.argmax(scores)) == last.answer

    def _count(self, kind: str, question: Question, error: Exception) -> None:
        self.bad[kind] += 1
        logging.warning("question id=%s: %s (%s): skipped", question.id, error, kind)
        return None


def bootstrap_interval(correct: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of the mean of ``correct``."""
    if correct.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, correct.size, (resamples, correct.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(correct: list, bad: collections.Counter, resamples: int, seed: int) -> dict:
    hits = np.asarray([c for c in correct if c is not None], np.float64)
    low, high = bootstrap_interval(hits, resamples, seed)
    return {"accuracy": float(hits.mean()) if hits.size else float("nan"), "ci95": [low, high],
            "scored": int(hits.size), "bad": dict(bad)}


def compose(pattern: str, text_pool: list, visual_pool: list, rng: np.random.Generator) -> list[Question]:
    """One conversation: a random question from the text (T) or visual (V) pool per letter of ``pattern``."""
    pools = {"T": text_pool, "V": visual_pool}
    return [pools[kind][rng.integers(len(pools[kind]))] for kind in pattern]


def run_task(scorer: Scorer, task: dict, resamples: int, seed: int) -> dict:
    """One task of the eval config -> its results (per pattern for the interleaved kind)."""
    kind = task.get("kind", "multiple_choice")
    limit = task.get("limit")
    if kind == "multiple_choice":
        file_bad: collections.Counter = collections.Counter()
        questions = read_questions(task["path"], task.get("image_root"), file_bad, limit)
        scorer.bad = collections.Counter()
        correct = [scorer.ask([q]) for q in tqdm(questions, desc=task.get("name", task["path"]))]
        return summarise(correct, file_bad + scorer.bad, resamples, seed)
    if kind != "interleaved":
        raise ValueError(f"task {task.get('name')!r}: kind={kind!r} is not one of {TASK_KINDS}")
    file_bad = collections.Counter()
    text_pool = read_questions(task["text_path"], task.get("image_root"), file_bad)
    visual_pool = [q for q in read_questions(task["visual_path"], task.get("image_root"), file_bad) if q.image]
    rng = np.random.default_rng(seed)
    results = {}
    for pattern in task.get("patterns", ["T", "TT", "TTT", "TV", "TTV", "V"]):
        if any(kind not in "TV" for kind in pattern) or not pattern:
            raise ValueError(f"task {task.get('name')!r}: pattern {pattern!r} must be letters T and V")
        if ("T" in pattern and not text_pool) or ("V" in pattern and not visual_pool):
            raise ValueError(f"task {task.get('name')!r}: pattern {pattern!r} needs a non-empty pool")
        scorer.bad = collections.Counter()
        conversations = [compose(pattern, text_pool, visual_pool, rng) for _ in range(task.get("samples", 100))]
        correct = [scorer.ask(c) for c in tqdm(conversations, desc=f"{task.get('name', 'interleaved')} {pattern}")]
        results[pattern] = summarise(correct, scorer.bad, resamples, seed)
    results["bad_records"] = dict(file_bad)
    return results


def evaluate(assistant: Assistant, config: dict) -> dict:
    scorer = Scorer(assistant)
    resamples, seed = config.get("bootstrap", 1000), config.get("seed", 0)
    return {task.get("name", f"task{i}"): run_task(scorer, task, resamples, seed)
            for i, task in enumerate(config["tasks"])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a wings_jax.checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--config", required=True, help="the eval config JSON (see the module docstring)")
    parser.add_argument("--out", default="eval_results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = json.loads(Path(args.config).read_text())
    if not isinstance(config.get("tasks"), list) or not config["tasks"]:
        raise ValueError(f"{args.config}: 'tasks' must be a non-empty list")
    assistant = Assistant.load(args.checkpoint, args.tokenizer, template=args.template)
    results = evaluate(assistant, config)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results.items():
        logging.info("%s: %s", name, json.dumps(result))
    return results


if __name__ == "__main__":
    main()
