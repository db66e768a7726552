"""Stage `fetch`: bring the images into data/raw in one normalised layout plus a manifest.

Sources (``data.source``):

* ``sample``: synthetic radiographs from :mod:`pneumo.core.phantoms`, in the Kaggle layout and
  naming, so the pipeline runs anywhere with no download;
* ``kaggle``: the Kaggle data set, downloaded with kagglehub;
* ``local``: a folder or a ``.zip`` in the Kaggle layout (``chest_xray/{train,val,test}/
  {NORMAL,PNEUMONIA}``), nested copies and macOS debris included. A folder holding symbolic
  links is refused (they may point anywhere); an archive is refused when an entry would land
  outside the target or exceeds ``data.limits``, checked on the central directory and again
  on the bytes actually read.

Output: ``data/raw/<split>/<CLASS>/<file>`` and ``data/raw/manifest.csv``. Everything is
written to a temporary folder first and renamed into place at the end, so an interrupted or
failed fetch never leaves a half-written data/raw.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image
from tqdm import tqdm

from pneumo import paths
from pneumo.config import DataConfig
from pneumo.core.images import dicom_header, is_dicom
from pneumo.core.sources import (
    Entry,
    FetchError,
    folder_entries,
    local_entries,
    patient_id,
    sample_entries,
)
from pneumo.files import staged_dir

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "split", "label", "patient", "sha256", "width", "height", "mode"]


def fetch(config: DataConfig, out_dir: Path, seed: int) -> pd.DataFrame:
    """Fill ``out_dir`` from the configured source and return its manifest."""
    if config.source == "sample":
        entries = list(sample_entries(config.sample, seed))
    elif config.source == "kaggle":
        entries = folder_entries(download_kaggle(config.kaggle_dataset))
    else:
        entries = local_entries(Path(config.local_path or ""), config.limits)
    return write_raw(entries, out_dir)


def kaggle_credentials_present() -> bool:
    """True when one of the Kaggle credential mechanisms is configured."""
    if os.environ.get("KAGGLE_API_TOKEN") or (
        os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    ):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def download_kaggle(dataset: str) -> Path:
    if not kaggle_credentials_present():
        raise FetchError(
            "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), "
            "or put kaggle.json in ~/.kaggle/ (or $KAGGLE_CONFIG_DIR). Offline, download the "
            "archive elsewhere and use data.source=local with data.local_path=<the .zip>"
        )
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(dataset))
    except Exception as exc:  # kagglehub raises many network and auth error types
        raise FetchError(
            f"downloading Kaggle data set {dataset!r} failed ({type(exc).__name__}: {exc}). "
            "Check the network and credentials, or use data.source=local with a downloaded .zip"
        ) from exc


# --- output -------------------------------------------------------------------------------


def _describe_image(data: bytes) -> tuple[int | None, int | None, str]:
    """Header facts for the manifest (for DICOM the mode is its Photometric Interpretation);
    unreadable files are kept and judged by preprocess."""
    try:
        if is_dicom(data):
            return dicom_header(data)
        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height, image.mode
    except Exception:  # any decoder error means "not an image we can read"
        return None, None, ""


def write_raw(entries: list[Entry], out_dir: Path) -> pd.DataFrame:
    names = Counter((e.split, e.label, e.name) for e in entries)
    clashes = [key for key, n in names.items() if n > 1]
    if clashes:
        raise FetchError(f"several source files map to the same output name: {clashes[:5]}")
    with staged_dir(out_dir) as staging:
        rows = []
        for entry in tqdm(entries, desc="fetch", unit="img", mininterval=2.0):
            data = entry.read()
            rel = PurePosixPath(entry.split, entry.label, entry.name)
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            width, height, mode = _describe_image(data)
            rows.append(
                {
                    "path": rel.as_posix(),
                    "split": entry.split,
                    "label": entry.label,
                    "patient": patient_id(entry.name),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": width,
                    "height": height,
                    "mode": mode,
                }
            )
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest = manifest.astype({"width": "Int64", "height": "Int64"})
        manifest.to_csv(staging / paths.MANIFEST, index=False)
    counts = manifest.groupby(["split", "label"]).size().to_dict()
    log.info("fetched %d images: %s", len(manifest), counts)
    return manifest
