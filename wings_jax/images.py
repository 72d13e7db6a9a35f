"""Image preprocessing as the reference does it (spec section 1, ``image_aspect_ratio = "pad"``).

RGB -> pad to a square filled with the mean colour (127, 127, 127), the image centred ->
bicubic resize to ``image_size`` -> x / 255 -> (x - 0.5) / 0.5, giving float32 (H, W, 3) in [-1, 1].
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

MEAN_COLOUR = (127, 127, 127)  # int(0.5 * 255) on every channel: the reference's padding fill
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = MEAN_COLOUR) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side (offset (long - short) // 2)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(image: Image.Image, image_size: int) -> np.ndarray:
    """A PIL image -> normalised float32 (image_size, image_size, 3)."""
    square = pad_to_square(image.convert("RGB"))
    resized = square.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def mean_colour_image(image_size: int) -> np.ndarray:
    """The replacement for a missing or unreadable image: the padding canvas alone, preprocessed."""
    return preprocess_image(Image.new("RGB", (image_size, image_size), MEAN_COLOUR), image_size)


def load_image(source, image_size: int) -> tuple[np.ndarray, str | None]:
    """Load and preprocess one image; never raises on bad input.

    ``source`` is a file path, encoded image bytes (PNG, JPEG, ...) or a uint8 array (H, W, 3) or
    (H, W). Returns (pixels, None) on success and (mean-colour image, what went wrong) otherwise.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            with Image.open(source) as image:
                return preprocess_image(image, image_size), None
        if isinstance(source, (bytes, bytearray)):
            with Image.open(io.BytesIO(source)) as image:
                return preprocess_image(image, image_size), None
        if isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim in (2, 3):
            return preprocess_image(Image.fromarray(source), image_size), None
        problem = f"unsupported image value of type {type(source).__name__}"
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        problem = f"cannot read image {source if isinstance(source, (str, os.PathLike)) else '<bytes>'}: {error}"
    return mean_colour_image(image_size), problem
