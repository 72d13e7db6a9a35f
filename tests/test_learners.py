"""Wings learners and router against the materialised float64 reference (tests/wings_reference.py).

Weights are "sharp" (std 1/sqrt(fan_in), router std 0.5, learner B factors non-zero) so that a
wrong position, mask or multiplier moves the logits far beyond the tolerance; each deliberate
error in the reference is shown to break the agreement.
"""

import dataclasses

import jax
import numpy as np
import pytest
from sharp_weights import sharp_params
from wings_reference import forward_logits

from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.model import WingsModel
from wings_jax.presets import tiny_model

TOLERANCE = 1e-5


def config_for(mode, stage, max_images=1, **text_overrides):
    base = tiny_model(scan_layers=False, max_images=max_images)
    wings = dataclasses.replace(base.wings, mask_mode=mode, stage=stage)
    text = dataclasses.replace(base.text, **text_overrides)
    return base.replace(wings=wings, text=text).validate()


def make_batch(config, layout, seq_len, seed=0):
    """layout: per sample, a list of text-token counts and 'img' marks, e.g. [5, 'img', 7]."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    samples = []
    for parts in layout:
        ids, images = [], []
        for part in parts:
            if part == "img":
                ids.append(IMAGE_PLACEHOLDER)
                images.append(rng.uniform(-1, 1, (size, size, 3)).astype(np.float32))
            else:
                ids.extend(rng.integers(1, config.text.vocab_size, part).tolist())
        samples.append(Sample(ids, ids, images))
    return pack_batch(samples, config, seq_len)


def model_and_reference(config, batch, with_pixels=True, errors=()):
    params = sharp_params(config)
    model = WingsModel(config)
    if not with_pixels:
        batch = {k: v for k, v in batch.items() if k != "pixel_values"}
        features = None
    else:
        features = model.apply({"params": params}, batch["pixel_values"], batch["image_valid"],
                               method=WingsModel.encode_images)
    logits = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, b, mode="logits"))(params, batch))
    expected = forward_logits(params, config, batch, features, errors=errors)
    real = np.asarray(batch["attention_mask"], bool)
    return logits[real], expected[real]


SINGLE = [[4, "img", 6], [6, "img", 3]]
MIXED = [[5, "img", 4], [12]]
TEXT_ONLY = [[9], [12]]
MULTI = [[2, "img", 3, "img", 2], [4, "img", 5]]

CASES = [
    ("causal", 1, SINGLE, 1, True), ("causal", 2, SINGLE, 1, True), ("causal", 2, MIXED, 1, True),
    ("causal", 1, MULTI, 2, True), ("causal", 2, MULTI, 2, True), ("causal", 2, TEXT_ONLY, 1, True),
    ("causal", 2, TEXT_ONLY, 1, False),
    ("reference", 1, SINGLE, 1, True), ("reference", 2, SINGLE, 1, True), ("reference", 2, MIXED, 1, True),
    ("reference", 2, TEXT_ONLY, 1, True), ("reference", 2, TEXT_ONLY, 1, False),
    ("reference", 1, TEXT_ONLY, 1, False),
]


@pytest.mark.parametrize("mode,stage,layout,max_images,with_pixels", CASES)
def test_learners_match_materialised_reference(mode, stage, layout, max_images, with_pixels):
    config = config_for(mode, stage, max_images)
    seq_len = max(sum(config.image_tokens if p == "img" else p for p in parts) for parts in layout) + 2
    batch = make_batch(config, layout, seq_len)
    got, expected = model_and_reference(config, batch, with_pixels)
    assert np.abs(expected).max() > 1.0, "weights are not sharp enough for the test to mean anything"
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_reference_text_only_sequence_shorter_than_image():
    """L < N: the zero image's features are cut to L keys and the visual multiplier is 1."""
    config = config_for("reference", 2)
    batch = make_batch(config, [[9], [12]], seq_len=12)
    assert batch["input_ids"].shape[1] < config.image_tokens
    got, expected = model_and_reference(config, batch)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("error,mode,layout", [
    ("shift_key_position", "causal", SINGLE), ("shift_key_position", "reference", MIXED),
    ("drop_mask", "causal", SINGLE), ("visual_once", "reference", SINGLE), ("no_router", "causal", SINGLE),
])
def test_deliberate_errors_are_caught(error, mode, layout):
    config = config_for(mode, 2)
    batch = make_batch(config, layout, seq_len=32)
    got, wrong = model_and_reference(config, batch, errors=(error,))
    assert np.abs(got - wrong).max() > 100 * TOLERANCE, f"the reference with {error!r} still agrees"
