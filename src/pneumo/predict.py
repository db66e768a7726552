"""Inference on image files: the same preparation, TTA views and threshold as evaluation.

:class:`Predictor` is used by ``pneumo predict`` on a local ``models/<backbone>`` folder and,
wrapped by :mod:`pneumo.registry`, inside the registered MLflow pyfunc model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pneumo import paths
from pneumo.config import CLASS_NAMES
from pneumo.errors import UserError
from pneumo.images import IMAGE_SUFFIXES, ImageDecodeError, prepare_image
from pneumo.records import Evaluation, ModelCard

INFERENCE_FILE = "inference.json"


class PredictError(UserError):
    """The model or the inputs to predict on cannot be used; the message says what to do."""


@dataclass(frozen=True)
class InferenceConfig:
    """Everything needed besides the weights: how to prepare images and decide."""

    image_size: int
    resize: str
    tta_views: list[str]
    threshold: float

    @classmethod
    def from_records(cls, card: ModelCard, evaluation: Evaluation) -> InferenceConfig:
        """Preparation from training's card; TTA views and threshold from the evaluation."""
        return cls(card.image_size, card.resize, evaluation.tta_views, evaluation.threshold)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> InferenceConfig:
        return cls(**json.loads(path.read_text()))


class Predictor:
    def __init__(self, model_dir: Path, inference: InferenceConfig) -> None:
        from pneumo.train import load_checkpoint

        self.model, self.card = load_checkpoint(model_dir)
        self.inference = inference

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Predictor:
        """A local ``models/<backbone>`` folder, with its evaluation from reports/eval/."""
        if not ModelCard.path(model_dir).is_file():
            raise PredictError(
                f"{model_dir} is not a trained model folder (no {ModelCard.FILE}): pass "
                "--model models/<backbone> after `dvc repro`, or a models:/<name>@<alias> URI"
            )
        card = ModelCard.read(model_dir)
        evaluation = Evaluation.read(paths.eval_report_dir(card.backbone))
        return cls(model_dir, InferenceConfig.from_records(card, evaluation))

    def prepare(self, data: bytes) -> np.ndarray:
        return prepare_image(data, self.inference.image_size, self.inference.resize)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Mean PNEUMONIA probability over the TTA views for (N, size, size) uint8 pixels."""
        from pneumo.evaluate import tta_probabilities

        return tta_probabilities(self.model, pixels, self.inference.tta_views).mean(axis=0)

    def predict_files(self, files: list[Path]) -> list[dict]:
        """One row per file; unreadable files get an ``error`` and no probability."""
        rows: list[dict] = []
        ready: list[tuple[int, np.ndarray]] = []
        for file in files:
            try:
                ready.append((len(rows), self.prepare(file.read_bytes())))
                rows.append({"file": str(file)})
            except (ImageDecodeError, OSError) as exc:
                rows.append({"file": str(file), "error": str(exc)})
        if ready:
            probabilities = self.probabilities(np.stack([pixels for _, pixels in ready]))
            for (row, _), probability in zip(ready, probabilities, strict=True):
                rows[row] |= self.decide(float(probability))
        return rows

    def decide(self, probability: float) -> dict:
        positive = probability >= self.inference.threshold
        return {"probability": probability, "label": CLASS_NAMES[int(positive)]}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders contribute their image files, recursively and sorted.

    A folder without any image file is an error: predicting nothing and exiting 0 would
    hide a wrong path.
    """
    files: list[Path] = []
    for item in inputs:
        if not item.is_dir():
            files.append(item)
            continue
        images = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PredictError(
                f"{item} holds no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files += images
    return files


def load_predictor(params, model: str | None) -> Predictor:
    """A local ``models/<backbone>`` folder, or a registry URI (default ``@champion``)."""
    if model and not model.startswith("models:/"):
        return Predictor.from_model_dir(Path(model))
    import mlflow

    from pneumo import tracking

    tracking.configure(params.tracking)
    uri = model or f"models:/{params.registry.model_name}@champion"
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().predictor
    except mlflow.exceptions.MlflowException as exc:
        raise PredictError(
            f"cannot load {uri} from {mlflow.get_tracking_uri()}: {exc.message}. "
            "Run `dvc repro` and `pneumo promote`, or pass --model models/<backbone>"
        ) from exc


def predict_paths(params, inputs: list[Path], model: str | None) -> list[dict]:
    files = expand_inputs(inputs)  # first: a wrong path fails before a model is loaded
    return load_predictor(params, model).predict_files(files)
