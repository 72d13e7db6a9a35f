"""Image preprocessing against an independent numpy computation of pad + PIL-style bicubic resize."""

import numpy as np
import pytest
from PIL import Image

from wings_jax.images import load_image, mean_colour_image, preprocess_image


def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(
        x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0)
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a bicubic resize (a = -0.5) whose kernel widens when shrinking."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    offsets = (np.arange(n_in) + 0.5)[None, :] - ((np.arange(n_out) + 0.5) * scale)[:, None]
    weights = np.where(np.abs(offsets) < 2 * stretch, _cubic(offsets / stretch), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def _reference(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    side = max(height, width)
    canvas = np.full((side, side, 3), 127.0)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = pixels
    weights = _resize_matrix(side, size)
    # horizontal pass, then vertical, each rounded to 8 bits as PIL stores its intermediate image
    rows = np.clip(np.round(np.einsum("oj,ijc->ioc", weights, canvas)), 0, 255)
    out = np.clip(np.round(np.einsum("oi,ijc->ojc", weights, rows)), 0, 255)
    return (out / 255.0 - 0.5) / 0.5


@pytest.mark.parametrize("width,height", [(31, 20), (20, 33), (50, 41), (10, 15), (28, 28)])
def test_pad_and_resize_match_numpy(width, height):
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = preprocess_image(Image.fromarray(pixels), 28)
    assert out.shape == (28, 28, 3) and out.dtype == np.float32
    # PIL's fixed-point weights may move a value by one 8-bit level when upsampling
    np.testing.assert_allclose(out, _reference(pixels, 28), rtol=0, atol=1.01 * 2 / 255)


def test_padding_exact_without_resize():
    """With the output size equal to the long side, the result is the padded canvas itself."""
    pixels = np.random.default_rng(1).integers(0, 256, (12, 21, 3), dtype=np.uint8)
    out = preprocess_image(Image.fromarray(pixels), 21)
    expected = np.full((21, 21, 3), 127, np.float64)
    expected[4:16] = pixels  # (21 - 12) // 2 = 4 rows of padding on top, 5 below
    np.testing.assert_allclose(out, (expected / 255 - 0.5) / 0.5, atol=1e-6)


def test_grayscale_and_rgba_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L")
    np.testing.assert_allclose(preprocess_image(grey, 8), np.full((8, 8, 3), (200 / 255 - 0.5) / 0.5), atol=1e-6)
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    np.testing.assert_allclose(preprocess_image(rgba, 8)[0, 0], (np.array([10, 20, 30]) / 255 - 0.5) / 0.5, atol=1e-6)


def test_mean_colour_image():
    np.testing.assert_allclose(mean_colour_image(5), np.full((5, 5, 3), (127 / 255 - 0.5) / 0.5), atol=1e-7)


def test_load_image_sources_and_failures(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    path = tmp_path / "ok.png"
    Image.fromarray(pixels).save(path)
    expected = (pixels / 255 - 0.5) / 0.5
    for source in (str(path), path.read_bytes(), pixels):
        out, problem = load_image(source, 9)
        assert problem is None
        np.testing.assert_allclose(out, expected, atol=1e-6)

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for source, words in ((str(tmp_path / "missing.png"), "missing.png"), (str(tmp_path / "broken.png"), "broken"),
                          (b"garbage", "<bytes>"), (3.5, "float")):
        out, problem = load_image(source, 6)
        assert problem is not None and words in problem
        np.testing.assert_array_equal(out, mean_colour_image(6))
