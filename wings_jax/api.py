"""A loaded Wings model with its tokenizer and chat template: the Python API behind ``wings_jax.chat``,
``wings_jax.laws``, ``train.eval`` and the notebooks.

    assistant = Assistant.load("ckpt_dir", tokenizer="tokenizer_dir")
    answer = assistant.answer("What colour is the square?", images=[PIL.Image.open("a.png")])
    scores = assistant.option_logprobs([{"from": "human", "value": "<image>\\n2 + 2 ="}], ["3", "4"], images=[img])
    summary, shares = assistant.laws([(turns, [img]), ...])   # wings_jax.laws.laws_figure(summary) plots it

Conversations are LLaVA turns (``{"from": "human"|"gpt", "value": ...}``) whose ``<image>`` marks stand
for the given images, in order. Images are PIL images, file paths or preprocessed float32 arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from wings_jax.batch import Sample, SampleTooLong, pack_batch
from wings_jax.checkpoint import load_params
from wings_jax.config import IGNORE_INDEX, ModelConfig
from wings_jax.conversation import DEFAULT_SYSTEM_PROMPT, IMAGE_MARK, ConversationTokenizer
from wings_jax.generate import Sampling, generate
from wings_jax.images import load_image, preprocess_image
from wings_jax.laws import LawsSummary, segment_masses, segment_shares, summarise
from wings_jax.model import WingsModel

LENGTH_BUCKET = 64  # batches are padded to a multiple of this, so new lengths rarely recompile


def bucket(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class Assistant:
    """Parameters, config, tokenizer and template together; every method takes conversations and images."""

    def __init__(self, params, config: ModelConfig, tokenizer, template: str = "qwen",
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.conversations = ConversationTokenizer(tokenizer, template, system_prompt)
        expected = self.conversations.system_prompt_length
        if config.wings.enabled and config.wings.system_prompt_length != expected:
            logging.warning("wings.system_prompt_length=%d but the %r system block is %d tokens: the textual "
                            "learner's keys will not start where training put them",
                            config.wings.system_prompt_length, template, expected)
        end = self.conversations.template.assistant_suffix.strip() or tokenizer.eos_token
        self.stop_tokens = tuple({tokenizer.convert_tokens_to_ids(end), tokenizer.eos_token_id} - {None})

    @classmethod
    def load(cls, checkpoint: str | Path, tokenizer: str | Path | None = None, **kwargs) -> Assistant:
        """A ``wings_jax.checkpoint`` directory; the tokenizer from ``tokenizer`` (default: the checkpoint)."""
        from transformers import AutoTokenizer

        params, config = load_params(checkpoint)
        return cls(params, config, AutoTokenizer.from_pretrained(str(tokenizer or checkpoint)), **kwargs)

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes: its position table, and the router's in stage 2."""
        wings, longest = self.config.wings, self.config.text.max_position_embeddings
        return min(longest, wings.router_positions) if wings.enabled and wings.stage == 2 else longest

    def pixels(self, image) -> np.ndarray:
        """A PIL image, a path or preprocessed pixels -> (H, W, 3) float32; raises on an unreadable file."""
        size = self.config.vision.image_size
        if isinstance(image, Image.Image):
            return preprocess_image(image, size)
        if isinstance(image, np.ndarray) and image.dtype == np.float32:
            return image
        pixels, problem = load_image(image, size)
        if problem:
            raise ValueError(problem)
        return pixels

    def sample(self, turns: Sequence[dict], images: Sequence = (), for_answer: bool = True) -> Sample:
        """Tokenise ``turns``; ``for_answer``: end with the assistant prefix (the model's turn to speak)."""
        turns = list(turns) + ([{"from": "gpt", "value": ""}] if for_answer else [])
        marks = sum(turn["value"].count(IMAGE_MARK) for turn in turns)
        if marks != len(images):
            raise ValueError(f"{marks} {IMAGE_MARK} marks in the conversation but {len(images)} images")
        ids, labels = self.conversations(turns, has_image=bool(images), normalise_marks=False)
        length = len(ids) + (self.config.image_tokens - 1) * len(images)
        if length > self.max_length:
            raise SampleTooLong(f"{length} tokens (images expanded) exceed the model's {self.max_length}")
        if for_answer:
            end = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # the empty answer's suffix
            ids, labels = ids[:end], None
        return Sample(ids, labels, [self.pixels(image) for image in images])

    def _batch(self, samples: Sequence[Sample], extra: int = 0) -> dict:
        lengths = [len(s.token_ids) + (self.config.image_tokens - 1) * len(s.images) for s in samples]
        batch = pack_batch(samples, self.config, bucket(max(lengths) + extra), overflow="error")
        if not any(s.images for s in samples):
            del batch["pixel_values"]  # no image passed at all (matters in reference mask mode)
        return batch

    def answer(self, prompt: str | Sequence[dict], images: Sequence = (), sampling: Sampling | None = None,
               rng: jax.Array | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The assistant's reply to ``prompt`` (a question, or turns ending with a human turn); ``stream``
        receives the text as it grows, piece by piece."""
        if isinstance(prompt, str):
            prompt = [{"from": "human", "value": IMAGE_MARK * len(images) + ("\n" if images else "") + prompt}]
        sampling = sampling or Sampling(max_new_tokens=256)
        if not sampling.stop_tokens:
            sampling = dataclasses.replace(sampling, stop_tokens=self.stop_tokens)
        batch = self._batch([self.sample(prompt, images)], extra=sampling.max_new_tokens)
        pieces: list[int] = []
        printed = [""]

        def on_token(step, tokens, done):
            if stream is None or tokens[0] in sampling.stop_tokens:
                return
            pieces.append(int(tokens[0]))
            text = self.tokenizer.decode(pieces)
            stream(text[len(printed[0]):])
            printed[0] = text

        result = generate(self.config, self.params, batch, sampling, rng=rng, on_token=on_token)
        tokens = result.tokens[0, : result.num_tokens[0]]
        return self.tokenizer.decode([t for t in tokens if t not in sampling.stop_tokens]).strip()

    def option_logprobs(self, turns: Sequence[dict], options: Sequence[str], images: Sequence = ()) -> np.ndarray:
        """Log-likelihood of each option as the whole assistant reply to ``turns`` (its end-of-turn token
        included, so an option must be the complete answer), float64 (len(options),)."""
        samples = [_last_reply_only(self.sample(list(turns) + [{"from": "gpt", "value": option}], images,
                                                for_answer=False)) for option in options]
        return np.asarray(_label_logprobs(self.config, self.params, self._batch(samples)), np.float64)

    def laws(self, records: Sequence[tuple[Sequence[dict], Sequence]], batch_size: int = 8) -> tuple:
        """MLLM-Laws over whole conversations ``(turns, images)``: (LawsSummary, shares (S, n_layers, 3))."""
        shares, masses = [], []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = self._batch([self.sample(turns, images, for_answer=False) for turns, images in chunk])
            mass = segment_masses(self.config, self.params, batch)
            masses.append(mass)
            shares.append(segment_shares(mass, batch["attention_mask"]))
        shares, masses = np.concatenate(shares), np.concatenate(masses)
        summary: LawsSummary = summarise(shares, masses)
        return summary, shares


def _last_reply_only(sample: Sample) -> Sample:
    """Keep the labels of the last assistant reply only (earlier answered turns are context, not scored)."""
    labels = np.asarray(sample.labels)
    unlabelled = np.flatnonzero(labels == IGNORE_INDEX)
    labels[: unlabelled[-1] + 1] = IGNORE_INDEX  # the last reply's labels run to the end of the sequence
    return Sample(sample.token_ids, labels.tolist(), sample.images, sample.source)


def _label_logprobs(config: ModelConfig, params, batch: dict):
    """Sum of log p(label token | prefix) over each row's labelled tokens (B,)."""
    return _jitted_label_logprobs(config.replace(remat_policy="none"), params, batch)


@functools.partial(jax.jit, static_argnames=("config",))
def _jitted_label_logprobs(config: ModelConfig, params, batch: dict):
    logits = WingsModel(config).apply({"params": params}, batch, mode="logits")
    targets = batch["labels"][:, 1:]  # the labels are aligned with the inputs: token t+1 is predicted at t
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != IGNORE_INDEX, picked, 0.0), axis=1)
