"""A tiny saved stage-2 checkpoint with its own tokenizer and a test image, for the inference front ends."""

import dataclasses
from pathlib import Path

import jax
from PIL import Image
from transformers import AutoTokenizer

from train.data import train_demo_tokenizer
from wings_jax.checkpoint import save_params
from wings_jax.conversation import system_prompt_length
from wings_jax.model import init_params
from wings_jax.presets import tiny_model

TEXTS = ["what colour is the square? red green blue", "2 + 3 = 5", "A B C D answer letter option choices"] * 20
IMAGE = "red.png"  # a 40 x 30 red image next to the checkpoint


def write_tiny_checkpoint(root: Path) -> Path:
    """Tokenizer, random-weight tiny Wings (stage 2) and ``IMAGE`` in ``root``; returns ``root``."""
    train_demo_tokenizer(TEXTS, str(root), vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    base = tiny_model()
    config = base.replace(
        text=dataclasses.replace(base.text, vocab_size=len(tokenizer)),
        wings=dataclasses.replace(base.wings, stage=2, system_prompt_length=system_prompt_length(tokenizer)),
    ).validate()
    save_params(root, init_params(config, jax.random.PRNGKey(0)), config)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / IMAGE)
    return root
