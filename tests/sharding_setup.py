"""The tiny stage-2 Wings, batches and optimizer shared by the sharding tests and the multi-process worker.

Its widths divide by 8 where the default rules shard them, and tensor=2 divides its heads (4) and
key/value heads (2). One decoder layer and one vision layer keep the compiles short.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from train.optim import build_optimizer, optimizer_labels
from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.config import IGNORE_INDEX
from wings_jax.model import init_params
from wings_jax.presets import TINY_VISION, tiny_model

SEQ_LEN = 32
GLOBAL_BATCH = 8
STEPS = 3
RATES = {"projector": 1e-2, "visual_learner": 1e-2, "textual_learner": 1e-2, "router": 1e-2, "llm": 1e-3}
MESHES = {  # (data, fsdp, tensor)
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
}


def model_config():
    config = tiny_model(vision=dataclasses.replace(TINY_VISION, num_layers=1, select_layer=-1))
    text = dataclasses.replace(config.text, num_layers=1, vocab_size=512)
    return config.replace(text=text, wings=dataclasses.replace(config.wings, stage=2))


def batches(config) -> list[dict]:
    """STEPS global batches: rows with an image and answers of different lengths."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        samples = []
        for row in range(GLOBAL_BATCH):
            prompt = list(rng.integers(1, config.text.vocab_size, size=3))
            answer = list(rng.integers(1, config.text.vocab_size, size=2 + row))
            image = rng.uniform(-1, 1, (config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
            labels = [IGNORE_INDEX] * (len(prompt) + 1) + answer
            samples.append(Sample(prompt + [IMAGE_PLACEHOLDER] + answer, labels, [image]))
        out.append(pack_batch(samples, config, SEQ_LEN))
    return out


def optimizer(config):
    """(tx, labels) training every group but the vision tower.

    Adam's first steps move every weight by about lr * sign(gradient); with eps=1e-8 a gradient
    entry near 1e-9 flips between runs that only sum in another order (one device vs. a mesh).
    eps=1e-3 keeps the update a smooth function of the gradient, so runs agree to 1e-5.
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), SEQ_LEN))
    tx, _ = build_optimizer(shapes, RATES, total_steps=10, warmup_ratio=0.0, weight_decay=0.1, eps=1e-3)
    return tx, optimizer_labels(shapes, RATES)
