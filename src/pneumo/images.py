"""Turning an encoded image file into the model's input pixels.

One function, :func:`prepare_image`, serves predict and the registered pyfunc model;
preprocess calls its two steps, :func:`decode_grayscale` then :func:`fit_square`, to judge the
decoded image in between. Training and inference can never see differently prepared images.
"""

from __future__ import annotations

import io
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMethod = Literal["pad", "crop"]
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"})
# Pillow names the buffer it read from, e.g. "<_io.BytesIO object at 0x7f…>": an address
# that changes every run and would make preprocess's report differ between identical runs.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageDecodeError(ValueError):
    """The bytes are not a complete image that Pillow can decode."""


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decode any supported file into 8-bit grayscale.

    Grayscale, RGB, RGBA (composited on black, the film background), palette and 16-bit or
    32-bit integer images are accepted. Deep images are rescaled from their own min..max to
    0..255, since 12-bit radiographs stored in 16-bit containers would otherwise look black.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes fully: truncated files fail here, not later in training
            return _to_uint8_gray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = _OBJECT_REPR.sub("", str(exc))
        raise ImageDecodeError(f"{type(exc).__name__}: {reason}") from exc


def _to_uint8_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        return scaled.round().astype(np.uint8)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def fit_square(pixels: np.ndarray, size: int, method: ResizeMethod) -> np.ndarray:
    """Square the image and resize it to ``size``.

    ``pad`` keeps the whole field of view and its aspect ratio, adding black borders;
    ``crop`` keeps the central square and loses the edges of the longer side.
    """
    image = Image.fromarray(pixels, mode="L")
    resample = Image.Resampling.BILINEAR
    if method == "pad":
        image = ImageOps.pad(image, (size, size), method=resample, color=0)
    else:
        image = ImageOps.fit(image, (size, size), method=resample)
    return np.asarray(image, dtype=np.uint8)


def prepare_image(data: bytes, size: int, method: ResizeMethod) -> np.ndarray:
    """Encoded file bytes → (size, size) uint8 grayscale, exactly as the cache stores it."""
    return fit_square(decode_grayscale(data), size, method)
