"""Shared fixtures: tiny generated data sets in the Kaggle layout, and the CLI runner."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from pneumo.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "chest_xray_dev.zip"


def jpeg_bytes(seed: int, size: int = 48, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode in ("L", "RGB") else "PNG")
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def kaggle_files(prefix: str = "chest_xray", patients: int = 12) -> dict[str, bytes]:
    """A small valid Kaggle-layout tree; every third patient has two images."""
    files: dict[str, bytes] = {}
    seed = 0
    for offset, split in enumerate(("train", "val", "test")):
        for p in range(patients if split != "val" else 2):
            patient = 1000 * offset + p
            for image_no in range(1, 3 if p % 3 == 0 else 2):
                seed += 1
                normal = f"{prefix}/{split}/NORMAL/IM-{patient:04d}-{image_no:04d}.jpeg"
                sick = f"{prefix}/{split}/PNEUMONIA/person{patient}_virus_{seed}.jpeg"
                files[normal] = jpeg_bytes(2 * seed)
                files[sick] = jpeg_bytes(2 * seed + 1)
    return files


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, as the stages do in a repository root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, params: dict | None = None) -> Result:
    """Invoke `pneumo` in the current folder, writing params.yaml first when given."""
    if params is not None:
        import yaml

        Path("params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_user_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never log into a developer's own tracking server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
