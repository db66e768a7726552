"""Every file and folder the stages exchange, relative to the repository root.

dvc.yaml declares the same paths; tests/test_repository.py fails when the two drift apart.
The names of the records inside these folders are in pneumo.records.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")  # every knob; `validate` writes it resolved to RESOLVED_PARAMS
RAW_DIR = Path("data/raw")
RAW_MANIFEST = RAW_DIR / "manifest.csv"

PROCESSED_DIR = Path("data/processed")
PROCESSED_MANIFEST = PROCESSED_DIR / "manifest.csv"
PROCESSED_REPORT = PROCESSED_DIR / "report.json"
PROCESSED_SAMPLES_PNG = PROCESSED_DIR / "samples.png"

CHECKPOINTS_DIR = Path("checkpoints")  # written by train
MODELS_DIR = Path("models")  # model folders ready to use, written by evaluate
REPORTS_DIR = Path("reports")
RESOLVED_PARAMS = REPORTS_DIR / "params.json"  # params.yaml validated, defaults filled in
EXPERIMENTS_JSON = REPORTS_DIR / "experiments.json"
EXPERIMENTS_MD = REPORTS_DIR / "experiments.md"
README = Path("README.md")
PLOTS_TEMPLATE = Path(".pneumo/plots-template.html")  # git-ignored, written by `pneumo plots`

SPLITS = ("train", "val", "test")


def processed_images(split: str) -> Path:
    return PROCESSED_DIR / f"{split}_images.npy"


def checkpoint_dir(backbone: str) -> Path:
    """The trained weights and their card, as train leaves them."""
    return CHECKPOINTS_DIR / backbone


def model_dir(backbone: str) -> Path:
    """The checkpoint with the inference settings evaluate chose: what predict and the
    registry use, and what can be copied anywhere."""
    return MODELS_DIR / backbone


def train_report_dir(backbone: str) -> Path:
    return REPORTS_DIR / "train" / backbone


def history_csv(backbone: str) -> Path:
    """Per-epoch curves; one folder for all backbones so `dvc plots` can overlay them."""
    return REPORTS_DIR / "history" / f"{backbone}.csv"


def eval_report_dir(backbone: str) -> Path:
    return REPORTS_DIR / "eval" / backbone
