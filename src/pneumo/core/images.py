"""Turning an encoded image file into the model's input pixels.

One function, :func:`prepare_image`, serves predict and the registered pyfunc model;
preprocess calls its two steps, :func:`decode_grayscale` then :func:`fit_square`, to judge the
decoded image in between. Training and inference can never see differently prepared images.

PNG, JPEG, BMP and TIFF are decoded by Pillow, DICOM by pydicom (the optional ``dicom``
extra), imported only when a DICOM file arrives.
"""

from __future__ import annotations

import io
import re
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps

from pneumo.errors import UserError

if TYPE_CHECKING:
    from pydicom import Dataset

ResizeMethod = Literal["pad", "crop"]
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
# Pillow names the buffer it read from, e.g. "<_io.BytesIO object at 0x7f…>": an address
# that changes every run and would make preprocess's report differ between identical runs.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
# A DICOM file (PS3.10) starts with a 128-byte preamble followed by these four bytes.
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_AT = 128
_GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_SUPPORTED_DICOM = (
    f"pneumo reads single-frame grayscale images ({', '.join(_GRAYSCALE_PHOTOMETRICS)})"
)


class ImageDecodeError(ValueError):
    """The bytes are not a complete image that can be decoded."""


class MissingDicomSupport(ImageDecodeError, UserError):
    """Decoding a DICOM file needs a package that is not installed; the message names it.

    To callers that judge one file at a time (predict, the served model) it is a decode error
    of that file. Preprocess stops on it instead of excluding the file: installing the package
    makes every such image usable, so dropping them from the cache would be wrong.
    """


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decode any supported file into 8-bit grayscale.

    Grayscale, RGB, RGBA (composited on black, the film background), palette and 16-bit or
    32-bit integer images are accepted. Deep images are rescaled from their own min..max to
    0..255, since 12-bit radiographs stored in 16-bit containers would otherwise look black.
    DICOM files go to :func:`decode_dicom`.
    """
    if is_dicom(data):
        return decode_dicom(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes fully: truncated files fail here, not later in training
            return _to_uint8_gray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _decode_error(exc) from exc


def _decode_error(exc: Exception) -> ImageDecodeError:
    # One line: pydicom lists its decoders on separate lines.
    reason = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    return ImageDecodeError(f"{type(exc).__name__}: {reason}")


def _to_uint8_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _stretch_to_uint8(np.asarray(image))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Own min..max → 0..255; a constant image becomes zeros."""
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
    return scaled.round().astype(np.uint8)


# --- DICOM --------------------------------------------------------------------------------


def is_dicom(data: bytes) -> bool:
    """True for a DICOM file: "DICM" after the 128-byte preamble."""
    return data[_DICOM_MAGIC_AT : _DICOM_MAGIC_AT + len(_DICOM_MAGIC)] == _DICOM_MAGIC


def decode_dicom(data: bytes) -> np.ndarray:
    """Decode a single-frame grayscale DICOM file into 8-bit grayscale, higher = brighter.

    pydicom applies the modality LUT (or Rescale Slope/Intercept), then the VOI LUT (or the
    first window), so the image looks as a viewer first shows it; MONOCHROME1 is then
    inverted to the MONOCHROME2 convention. 8-bit pixels without any LUT, rescale or window
    are kept as they are, like an 8-bit PNG; anything else is rescaled from its own min..max
    to 0..255, as :func:`decode_grayscale` does for deep images.
    """
    pydicom = _import_pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        _check_supported(dataset)
        pixels = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom raises many error types for malformed files
        raise _decode_error(exc) from exc
    if pixels.dtype != np.uint8:
        pixels = _stretch_to_uint8(pixels)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


def dicom_header(data: bytes) -> tuple[int, int, str]:
    """Width, height and Photometric Interpretation of a DICOM file, without its pixels."""
    dataset = _import_pydicom().dcmread(io.BytesIO(data), stop_before_pixels=True)
    return int(dataset.Columns), int(dataset.Rows), str(dataset.PhotometricInterpretation)


def _import_pydicom() -> ModuleType:
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDicomSupport(
            "reading DICOM files needs pydicom: pip install -e '.[dicom]'"
        ) from exc
    return pydicom


def _check_supported(dataset: Dataset) -> None:
    """Refuse what the model cannot take (several frames, colour) and name what it takes;
    ask pydicom whether a decoder for the transfer syntax is installed before decoding."""
    from pydicom.pixels import get_decoder

    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageDecodeError(f"DICOM file holds {frames} frames; {_SUPPORTED_DICOM}")
    photometric = dataset.get("PhotometricInterpretation")
    if photometric not in _GRAYSCALE_PHOTOMETRICS or dataset.get("SamplesPerPixel", 1) != 1:
        raise ImageDecodeError(
            f"DICOM Photometric Interpretation {photometric!r} is not grayscale; {_SUPPORTED_DICOM}"
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return  # pixel_array then fails with pydicom's own explanation
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(
            f"DICOM transfer syntax {syntax.name} ({syntax}) cannot be decoded by pydicom"
        ) from None
    # pydicom raises the same RuntimeError for a missing decoder and for corrupt data; only
    # the decoder can tell "install a package" from "this file is broken".
    if not decoder.is_available:
        raise MissingDicomSupport(
            f"DICOM pixel data in {syntax.name} ({syntax}) needs a decoder that is not "
            f"installed; install one of: {'; '.join(decoder.missing_dependencies)}"
        )


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
