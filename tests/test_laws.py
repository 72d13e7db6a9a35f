"""MLLM-Laws masses (value-channel trick) against the materialised attention probabilities of the
float64 reference (tests/wings_reference.py), and the shares / shift arithmetic on hand-made curves."""

import numpy as np
import pytest
from sharp_weights import sharp_params
from test_learners import config_for, make_batch
from wings_reference import forward_attention_probs

from wings_jax.laws import attention_shift, plot_laws, segment_masses, segment_shares, summarise
from wings_jax.model import WingsModel

TOLERANCE = 1e-4


def _expected_masses(probs, layout, n_tokens, attention_mask):
    """Sum over real queries and the segment's keys, mean over heads; segments from the layout."""
    n_layers, n_batch = probs.shape[:2]
    out = np.zeros((n_batch, n_layers, 3))
    for b, parts in enumerate(layout):
        segment = []  # per position: 0 before, 1 image, 2 after, -1 text between images
        images_seen = 0
        n_images = parts.count("img")
        for part in parts:
            if part == "img":
                segment += [1] * n_tokens
                images_seen += 1
            else:
                segment += [0 if images_seen == 0 else 2 if images_seen == n_images else -1] * part
        segment = np.asarray(segment)
        real = np.asarray(attention_mask[b], bool)
        for s in range(3):
            keys = np.nonzero(segment == s)[0]
            out[b, :, s] = probs[:, b][:, :, real][:, :, :, keys].sum(axis=(2, 3)).mean(axis=1)
    return out


@pytest.mark.parametrize("mode,stage,layout,max_images", [
    ("causal", 2, [[4, "img", 6], [3, "img", 2, "img", 5], [11]], 2),
    ("reference", 2, [[5, "img", 4], [12]], 1),
])
def test_masses_match_materialised_probabilities(mode, stage, layout, max_images):
    config = config_for(mode, stage, max_images)
    seq_len = max(sum(config.image_tokens if p == "img" else p for p in parts) for parts in layout) + 2
    batch = make_batch(config, layout, seq_len)
    params = sharp_params(config)
    features = WingsModel(config).apply({"params": params}, batch["pixel_values"], batch["image_valid"],
                                        method=WingsModel.encode_images)
    probs = forward_attention_probs(params, config, batch, features)
    expected = _expected_masses(probs, layout, config.image_tokens, batch["attention_mask"])
    got = segment_masses(config, params, batch)
    assert got.shape == (len(layout), config.text.num_layers, 3)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    # every real query's attention sums to one: with no text between images the shares add up to 1
    shares = segment_shares(got, batch["attention_mask"])
    np.testing.assert_allclose(shares[0].sum(-1), 1.0, atol=TOLERANCE)


def test_shift_and_summary_arithmetic():
    before = np.array([1.0, 2.0, 3.0, 4.0])
    masses = np.zeros((3, 4, 3))
    masses[0, :, 0], masses[0, :, 2] = before, 2 * before + 1  # perfectly correlated: shift 0
    masses[1, :, 0], masses[1, :, 2] = before, -before  # anti-correlated: shift 2
    masses[2, :, 0] = before  # no text after the image: undefined
    shift = attention_shift(masses)
    np.testing.assert_allclose(shift[:2], [0.0, 2.0], atol=1e-12)
    assert np.isnan(shift[2])
    summary = summarise(masses / 10.0, masses)
    assert summary.attention_shift == pytest.approx(1.0)
    assert summary.shift_per_sample.shape == (2,)
    np.testing.assert_allclose(summary.shares[:, 0], before / 10.0)


def test_plot_writes_png(tmp_path):
    masses = np.random.default_rng(0).uniform(size=(2, 5, 3))
    path = tmp_path / "laws.png"
    plot_laws(summarise(masses, masses), str(path), title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
