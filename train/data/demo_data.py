"""The bundled demo dataset, generated deterministically (nothing stored in git but this code).

Images of one coloured shape (red / green / blue / yellow circle / square / triangle, sizes and
positions varying, some images not square) on a plain light background; stage-1 caption records
("A red circle."), stage-2 question-answer conversations about the shape, text-only arithmetic
QA records, a held-out split of each, and a tiny byte-level BPE tokenizer with the chat special
tokens that ``AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from wings_jax.conversation import DEFAULT_SYSTEM_PROMPT, TEMPLATES, render_text

logger = logging.getLogger(__name__)

COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225))
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short caption for the image.")
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",  # Qwen ChatML
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
)
# Qwen2's pre-tokenisation pattern: digits one by one, newlines kept apart from the words after them.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML for generation and for checking the formatter against ``apply_chat_template``.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """Paths of a written demo dataset (JSON for stage 1 as LLaVA-Pretrain is, JSONL otherwise)."""

    root: str
    image_root: str
    stage1_train: str
    stage1_eval: str
    stage2_train: str
    stage2_eval: str
    text_train: str
    text_eval: str
    tokenizer_dir: str


def draw_shape(rng: np.random.Generator, colour: str, shape: str) -> Image.Image:
    """One shape of ``colour`` at a random size and position on a random plain background."""
    width, height = (int(v) for v in rng.integers(28, 49, size=2))
    image = Image.new("RGB", (width, height), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    side = int(rng.integers(min(width, height) // 2, min(width, height) - 3))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    box = (left, top, left + side - 1, top + side - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left + side // 2, top), (box[2], box[3]), (left, box[3])], fill=COLOURS[colour])
    return image


def _caption(colour: str, shape: str) -> str:
    return f"A {colour} {shape}."


def _caption_record(record_id: str, image: str, colour: str, shape: str, rng: np.random.Generator) -> dict:
    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": _caption(colour, shape)},
        ],
    }


def _qa_record(record_id: str, image: str, colour: str, shape: str, rng: np.random.Generator) -> dict:
    pairs = [("What colour is the shape?", f"{colour.capitalize()}."), ("What shape is it?", f"A {shape}.")]
    if rng.random() < 0.5:
        pairs.reverse()
    pairs = pairs[: int(rng.integers(1, 3))]
    conversations = []
    for turn, (question, answer) in enumerate(pairs):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "conversations": conversations}


def _text_record(record_id: str, rng: np.random.Generator) -> dict:
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    if rng.random() < 0.5:
        question, answer = f"What is {a} plus {b}?", f"{a + b}."
    else:
        a, b = max(a, b), min(a, b)
        question, answer = f"What is {a} minus {b}?", f"{a - b}."
    return {"id": record_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _make_split(split: str, n: int, rng: np.random.Generator, image_dir: Path) -> tuple[list, list, list]:
    """Draw ``n`` images and their caption, QA and text-only records."""
    captions, qas, texts = [], [], []
    for index in tqdm(range(n), desc=f"demo {split} images", disable=n < 2000):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        name = f"{split}_{index:05d}.png"
        draw_shape(rng, colour, shape).save(image_dir / name)
        captions.append(_caption_record(f"cap-{split}-{index:05d}", name, colour, shape, rng))
        qas.append(_qa_record(f"qa-{split}-{index:05d}", name, colour, shape, rng))
        texts.append(_text_record(f"text-{split}-{index:05d}", rng))
    return captions, qas, texts


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def demo_texts(records: Iterable[dict]) -> list[str]:
    """The prompt strings of ``records`` in every chat template: the tokenizer's training text."""
    texts = []
    for record in records:
        for template in TEMPLATES.values():
            texts.append(render_text(record["conversations"], template, DEFAULT_SYSTEM_PROMPT))
    return texts


def train_demo_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512) -> str:
    """Train a tiny byte-level BPE on ``texts`` and save it where ``AutoTokenizer.from_pretrained``
    finds it (special tokens: Qwen ChatML and Llama 3 chat tokens; eos '<|im_end|>', pad
    '<|endoftext|>'; a ChatML chat template). Returns ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[token for token in SPECIAL_TOKENS if token not in ("<|im_end|>", "<|endoftext|>")],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(out_dir)
    logger.info("demo tokenizer: %d tokens, saved to %s", len(wrapped), out_dir)
    return out_dir


def write_demo_dataset(out_dir: str, n_train: int = 1000, n_eval: int = 100, seed: int = 0) -> DemoDataset:
    """Write the demo dataset under ``out_dir`` (same files for the same arguments)."""
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_captions, train_qas, train_texts = _make_split("train", n_train, rng, image_dir)
    eval_captions, eval_qas, eval_texts = _make_split("eval", n_eval, rng, image_dir)
    paths = DemoDataset(
        root=str(root), image_root=str(image_dir),
        stage1_train=str(root / "stage1_train.json"), stage1_eval=str(root / "stage1_eval.json"),
        stage2_train=str(root / "stage2_train.jsonl"), stage2_eval=str(root / "stage2_eval.jsonl"),
        text_train=str(root / "text_train.jsonl"), text_eval=str(root / "text_eval.jsonl"),
        tokenizer_dir=str(root / "tokenizer"),
    )
    Path(paths.stage1_train).write_text(json.dumps(train_captions, indent=1), encoding="utf-8")
    Path(paths.stage1_eval).write_text(json.dumps(eval_captions, indent=1), encoding="utf-8")
    _write_jsonl(Path(paths.stage2_train), train_qas)
    _write_jsonl(Path(paths.stage2_eval), eval_qas)
    _write_jsonl(Path(paths.text_train), train_texts)
    _write_jsonl(Path(paths.text_eval), eval_texts)
    train_demo_tokenizer(demo_texts(train_captions + train_qas + train_texts), paths.tokenizer_dir)
    logger.info("demo dataset: %d train / %d eval images in %s", n_train, n_eval, os.fspath(root))
    return paths
