"""DICOM input: decoding with pydicom's LUTs, what is refused, and the way through the stages."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from pneumo.config import DataConfig
from pneumo.core.images import (
    ImageDecodeError,
    MissingDicomSupport,
    decode_grayscale,
    prepare_image,
)
from pneumo.mlops.predict import expand_inputs
from pneumo.stages.fetch import fetch
from pneumo.stages.preprocess import PreprocessError, preprocess
from tests.conftest import kaggle_files, run_cli, write_tree

# Not decodable with pydicom and Pillow alone (JPEG 2000 would be, through Pillow).
UNDECODABLE_SYNTAX = uid.JPEGLosslessSV1
needs_missing_decoder = pytest.mark.skipif(
    get_decoder(UNDECODABLE_SYNTAX).is_available,
    reason=f"a decoder for {UNDECODABLE_SYNTAX.name} is installed",
)


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    transfer_syntax: uid.UID = uid.ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    **elements: object,
) -> bytes:
    """A DX image file as a modality writes it; compressed syntaxes get fake encoded bytes.

    ``pixels`` is (rows, columns), (frames, rows, columns), or (rows, columns, 3) for RGB.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    # Derived from the pixels, so the same image gives the same file bytes every run.
    instance = uid.generate_uid(entropy_srcs=[hashlib.sha256(pixels).hexdigest()])
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    colour = photometric == "RGB"
    dataset.Rows, dataset.Columns = pixels.shape[:2] if colour else pixels.shape[-2:]
    dataset.SamplesPerPixel = 3 if colour else 1
    if colour:
        dataset.PlanarConfiguration = 0
    elif pixels.ndim == 3:
        dataset.NumberOfFrames = len(pixels)
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    if transfer_syntax.is_compressed:
        dataset.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    else:
        dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# Not square, and not spanning 0..255: an 8-bit image must not be stretched.
RADIOGRAPH = np.random.default_rng(7).integers(10, 200, (48, 80), dtype=np.uint8)


@pytest.mark.parametrize("method", ["pad", "crop"])
def test_an_8_bit_dicom_is_prepared_exactly_like_the_same_pixels_as_png(method):
    from_dicom = prepare_image(dicom_bytes(RADIOGRAPH), 32, method)
    assert np.array_equal(from_dicom, prepare_image(png_bytes(RADIOGRAPH), 32, method))
    assert np.array_equal(decode_grayscale(dicom_bytes(RADIOGRAPH)), RADIOGRAPH)


def test_monochrome1_is_inverted_so_that_higher_means_brighter():
    stored = 255 - RADIOGRAPH  # MONOCHROME1: the lowest value is white
    from_dicom = prepare_image(dicom_bytes(stored, photometric="MONOCHROME1"), 32, "pad")
    assert np.array_equal(from_dicom, prepare_image(png_bytes(RADIOGRAPH), 32, "pad"))


def test_a_12_bit_dicom_gets_its_rescale_and_window_applied():
    stored = np.arange(4096, dtype=np.uint16).reshape(32, 128)  # every 12-bit value once
    slope, intercept, center, width = 2, -1000, 755.5, 511
    data = dicom_bytes(
        stored,
        bits_stored=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
    )
    # PS3.3 C.11.2.1.2.1, LINEAR: black up to c - 0.5 - (w - 1) / 2 = 500, white above
    # c - 0.5 + (w - 1) / 2 = 1010, linear in between; these numbers make every level whole.
    value = stored.astype(float) * slope + intercept
    brightness = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    expected = (brightness * 255).round().astype(np.uint8)
    assert (expected == 0).any() and (expected == 255).any() and len(np.unique(expected)) == 256
    assert np.array_equal(decode_grayscale(data), expected)


@needs_missing_decoder
def test_compressed_pixel_data_without_its_decoder_names_the_packages_to_install():
    data = dicom_bytes(RADIOGRAPH, transfer_syntax=UNDECODABLE_SYNTAX)
    with pytest.raises(ImageDecodeError) as caught:
        decode_grayscale(data)
    message = str(caught.value)
    assert UNDECODABLE_SYNTAX.name in message and UNDECODABLE_SYNTAX in message
    assert "pylibjpeg" in message and "gdcm" in message and "\n" not in message


def test_without_pydicom_png_still_decodes_and_dicom_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # any import of pydicom now fails
    assert np.array_equal(decode_grayscale(png_bytes(RADIOGRAPH)), RADIOGRAPH)
    with pytest.raises(MissingDicomSupport, match=r"pip install -e '\.\[dicom\]'"):
        decode_grayscale(dicom_bytes(RADIOGRAPH))


@pytest.mark.parametrize(
    ("pixels", "photometric", "refusal"),
    [
        (np.stack([RADIOGRAPH] * 3), "MONOCHROME2", "holds 3 frames"),
        (np.stack([RADIOGRAPH] * 3, axis=-1), "RGB", "'RGB' is not grayscale"),
    ],
    ids=["multi-frame", "colour"],
)
def test_multi_frame_and_colour_dicom_are_refused_saying_what_is_supported(
    pixels, photometric, refusal
):
    with pytest.raises(ImageDecodeError, match=refusal) as caught:
        decode_grayscale(dicom_bytes(pixels, photometric=photometric))
    assert str(caught.value).endswith(
        "pneumo reads single-frame grayscale images (MONOCHROME1, MONOCHROME2)"
    )
    assert not isinstance(caught.value, MissingDicomSupport)


def test_a_truncated_dicom_is_an_unreadable_image():
    data = dicom_bytes(RADIOGRAPH)
    with pytest.raises(ImageDecodeError) as caught:
        decode_grayscale(data[: len(data) - 100])
    assert not isinstance(caught.value, MissingDicomSupport)
    assert " at 0x" not in str(caught.value)


@needs_missing_decoder
def test_a_dicom_needing_a_missing_decoder_stops_preprocess_instead_of_being_excluded(tmp_path):
    """Installing the decoder makes the image usable: silently dropping it would be wrong."""
    lossless = {
        "chest_xray/train/NORMAL/IM-9001-0001.dcm": dicom_bytes(
            RADIOGRAPH, transfer_syntax=UNDECODABLE_SYNTAX
        )
    }
    source = write_tree(tmp_path / "src", kaggle_files() | lossless)
    fetch(DataConfig(source="local", local_path=str(source)), tmp_path / "raw", seed=0)
    with pytest.raises(PreprocessError, match=r"IM-9001-0001\.dcm: DICOM .* pylibjpeg"):
        preprocess(
            DataConfig(image_size=32, max_bad_fraction=0.5),
            tmp_path / "raw",
            tmp_path / "processed",
            seed=0,
            workers=1,
        )
    assert not (tmp_path / "processed").exists()


def _as_dicom_png_or_jpeg(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The tree with its images turned in turn into MONOCHROME2 DICOM, MONOCHROME1 DICOM, PNG
    and JPEG; and, for each DICOM file, the same pixels as PNG."""
    mixed: dict[str, bytes] = {}
    png_twins: dict[str, bytes] = {}
    for number, (rel, jpeg) in enumerate(sorted(files.items())):
        pixels = decode_grayscale(jpeg)
        kind = number % 4
        path = PurePosixPath(rel).with_suffix((".dcm", ".dcm", ".png", ".jpeg")[kind])
        if kind == 0:
            mixed[str(path)] = dicom_bytes(pixels)
        elif kind == 1:
            mixed[str(path)] = dicom_bytes(255 - pixels, photometric="MONOCHROME1")
        else:
            mixed[str(path)] = png_bytes(pixels) if kind == 2 else jpeg
        if kind < 2:
            png_twins[PurePosixPath(*path.parts[1:]).as_posix()] = png_bytes(pixels)
    return mixed, png_twins


def test_a_kaggle_folder_with_dicom_files_is_fetched_and_cached_without_exclusions(in_tmp):
    files, png_twins = _as_dicom_png_or_jpeg(kaggle_files())
    params = {
        "data": {
            "source": "local",
            "local_path": str(write_tree(in_tmp / "src", files)),
            "image_size": 32,
            "val_fraction": 0.25,
        }
    }
    for command in (("fetch",), ("preprocess", "--workers", "1")):
        result = run_cli(*command, params=params)
        assert result.exit_code == 0, result.output

    raw = pd.read_csv(in_tmp / "data/raw/manifest.csv").set_index("path")
    assert len(raw) == len(files)
    dicom = raw.loc[list(png_twins)]
    assert set(dicom["mode"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert (dicom.width == 64).all() and (dicom.height == 64).all()

    report = json.loads((in_tmp / "data/processed/report.json").read_text())
    assert report["excluded"] == [] and report["cached_images"] == len(files)
    cache = pd.read_csv(in_tmp / "data/processed/manifest.csv").set_index("path")
    for rel, png in png_twins.items():
        split, index = cache.loc[rel, ["split", "index"]]
        cached = np.load(in_tmp / f"data/processed/{split}_images.npy", mmap_mode="r")[index]
        assert np.array_equal(cached, prepare_image(png, 32, "pad")), rel


def test_predict_takes_dicom_files_from_a_folder(tmp_path):
    images = {"b.dcm": dicom_bytes(RADIOGRAPH), "a.png": png_bytes(RADIOGRAPH), "notes.txt": b""}
    write_tree(tmp_path, images)
    assert [path.name for path in expand_inputs([tmp_path])] == ["a.png", "b.dcm"]
