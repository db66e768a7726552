"""Every file and folder the stages exchange, relative to the repository root.

dvc.yaml declares the same paths; tests/test_repository.py fails when the two drift apart.
The names of the records inside these folders are in pneumo.records.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")  # every knob; `validate` writes it resolved to RESOLVED_PARAMS
RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")

CHECKPOINTS_DIR = Path("checkpoints")  # written by train
MODELS_DIR = Path("models")  # model folders ready to use, written by evaluate
REPORTS_DIR = Path("reports")
RESOLVED_PARAMS = REPORTS_DIR / "params.json"  # params.yaml validated, defaults filled in
EXPERIMENTS_JSON = REPORTS_DIR / "experiments.json"
EXPERIMENTS_MD = REPORTS_DIR / "experiments.md"
README = Path("README.md")
PLOTS_TEMPLATE = Path(".pneumo/plots-template.html")  # git-ignored, written by `pneumo plots`

SPLITS = ("train", "val", "test")


# Files inside the stages' folders (the stages take the folders as arguments). The JSON
# records' names are in pneumo.records.
MANIFEST = "manifest.csv"  # one row per image: data/raw (fetch) and data/processed (preprocess)
PREPROCESS_REPORT = "report.json"  # data/processed: counts, exclusions, duplicates, overlap
SAMPLES_PNG = "samples.png"  # data/processed: training images to look at
CURVES_PNG = "curves.png"  # a checkpoint folder: loss and validation AUC per epoch
EVALUATION_PNG = "evaluation.png"  # an evaluation folder: ROC, PR, calibration, confusion
RELIABILITY_PNG = "reliability.png"  # an evaluation folder: before and after calibration
REFERRAL_PNG = "referral.png"  # an evaluation folder: risk-coverage and the REFER band
ROC_CSV = "roc.csv"  # an evaluation folder, also for `dvc plots`
PR_CSV = "pr.csv"
CALIBRATION_CSV = "calibration.csv"
RISK_COVERAGE_CSV = "risk_coverage.csv"


def cache_images(split: str) -> str:
    """The uint8 pixel array of one split, in data/processed."""
    return f"{split}_images.npy"


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


def external_report(name: str) -> Path:
    """`pneumo evaluate-external NAME`: every model's results on one external set."""
    return REPORTS_DIR / "external" / f"{name}.json"


def eval_report_dir(backbone: str) -> Path:
    return REPORTS_DIR / "eval" / backbone
