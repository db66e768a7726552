"""The only module that touches the MLflow model registry: versions, aliases, promotion.

Each backbone's model is logged as an MLflow pyfunc that takes raw image files and returns
probability and label, with the model's own preparation, TTA views and threshold inside.
Versions are tagged with what produced them; aliases (``challenger``, ``champion``) mark the
ones to use. The deprecated registry stages are not used.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import pneumo
from pneumo import paths, tracking
from pneumo.config import Params
from pneumo.errors import UserError
from pneumo.predict import INFERENCE_FILE, InferenceConfig, Predictor
from pneumo.records import Evaluation, ModelCard

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
GATE_METRICS = ("select_by", "val_recall")


class PromotionRefused(UserError):
    """The candidate would regress against the current champion."""


class PneumoniaPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame whose ``image`` column holds encoded files (base64 strings or bytes)
    or uint8 pixel arrays already prepared; output: ``probability`` and ``label`` columns."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        model_dir = Path(context.artifacts["model_dir"])
        inference = InferenceConfig.load(Path(context.artifacts["inference"]))
        self.predictor = Predictor(model_dir, inference)

    def _pixels(self, item: Any) -> np.ndarray:
        if isinstance(item, str):
            item = base64.b64decode(item, validate=True)
        if isinstance(item, bytes | bytearray):
            return self.predictor.prepare(bytes(item))
        pixels = np.asarray(item, dtype=np.uint8)
        size = self.predictor.inference.image_size
        if pixels.shape != (size, size):
            raise ValueError(f"pixel arrays must be ({size}, {size}) uint8, got {pixels.shape}")
        return pixels

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in model_input:
            raise ValueError("input needs an 'image' column (base64 file, bytes or uint8 array)")
        pixels = np.stack([self._pixels(item) for item in model_input["image"]])
        probabilities = self.predictor.probabilities(pixels)
        return pd.DataFrame([self.predictor.decide(float(p)) for p in probabilities])


def _requirements() -> list[str]:
    import efficientnet_pytorch
    import torch
    import torchvision

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"efficientnet-pytorch=={efficientnet_pytorch.__version__}",
        f"mlflow=={mlflow.__version__}",
        "numpy",
        "pandas",
        "pillow",
        "pydicom>=3",  # the served model decodes DICOM files as predict does
        "scikit-learn",
        "pydantic",
        "pyyaml",
    ]


def register(
    params: Params, backbone: str, model_dir: Path, evaluation: Evaluation, card: ModelCard
) -> str:
    """Log the backbone's pyfunc model in its training run and register a new version."""
    client = MlflowClient()
    inference = InferenceConfig.from_records(card, evaluation)
    select = params.compare.metric
    tags = {
        "backbone": backbone,
        "git_commit": tracking.context_tags("compare", card.data_hash)["git_commit"],
        "dvc_experiment": tracking.experiment_name(),
        "data_hash": card.data_hash,
        "threshold": f"{evaluation.threshold:.6f}",
        "select_by": params.compare.select_by,
        params.compare.select_by: f"{evaluation.val[select]:.6f}",
        "val_recall": f"{evaluation.val['recall']:.6f}",
        "test_accuracy": f"{evaluation.test['accuracy']['value']:.6f}",
        "test_roc_auc": f"{evaluation.test['roc_auc']['value']:.6f}",
    }
    run_id = tracking.training_run_of(ModelCard.weights(model_dir))
    with (
        tempfile.TemporaryDirectory() as tmp,
        tracking.resume_run(params.tracking, run_id) as run,
    ):
        inference_file = Path(tmp) / INFERENCE_FILE
        inference.save(inference_file)
        if run is None:
            raise UserError(
                f"the training run of {backbone} ({run_id or 'not recorded in this clone'}) is "
                "not in the tracking store; rerun `dvc repro --force train` to register models"
            )
        info = tracking.with_retries(
            lambda: mlflow.pyfunc.log_model(
                name="model",
                python_model=PneumoniaPyfunc(),
                artifacts={"model_dir": str(model_dir), "inference": str(inference_file)},
                code_paths=[str(Path(pneumo.__file__).parent)],
                pip_requirements=_requirements(),
                registered_model_name=params.registry.model_name,
            )
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        tracking.with_retries(
            lambda k=key, v=value: client.set_model_version_tag(
                params.registry.model_name, version, k, v
            )
        )
    log.info("registered %s as %s version %s", backbone, params.registry.model_name, version)
    return version


def register_all(params: Params, best: str) -> dict[str, str]:
    """Register every backbone's evaluated model; ``@challenger`` goes to ``best``."""

    tracking.configure(params.tracking)
    versions = {}
    for backbone in params.backbones:
        model_dir = paths.model_dir(backbone)
        evaluation = Evaluation.read(paths.eval_report_dir(backbone))
        versions[backbone] = register(
            params, backbone, model_dir, evaluation, ModelCard.read(model_dir)
        )
    set_alias(params.registry.model_name, CHALLENGER, versions[best])
    return versions


def set_alias(name: str, alias: str, version: str) -> None:
    tracking.with_retries(lambda: MlflowClient().set_registered_model_alias(name, alias, version))


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(params: Params, version: str | None = None, force: bool = False) -> str:
    """Move ``champion`` to the challenger (or ``version``) unless it regresses.

    The gate compares the validation metric that ranks models (``compare.select_by``) and
    validation sensitivity; a candidate worse on either is refused unless ``force``.
    Every decision is recorded as tags on the candidate version.
    """
    tracking.configure(params.tracking)
    client = MlflowClient()
    name = params.registry.model_name
    candidate = (
        client.get_model_version(name, version)
        if version
        else _version_by_alias(client, name, CHALLENGER)
    )
    if candidate is None:
        raise UserError(f"{name} has no {CHALLENGER!r} alias: run `dvc repro` (compare) first")
    champion = _version_by_alias(client, name, CHAMPION)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    select = params.compare.select_by
    reasons = []
    if champion is not None and champion.version != candidate.version:
        for metric in (select, "val_recall"):
            new, old = float(candidate.tags[metric]), float(champion.tags[metric])
            if new < old:
                reasons.append(f"{metric} {new:.4f} < champion v{champion.version}'s {old:.4f}")
    if reasons and not force:
        decision = f"refused at {now}: " + "; ".join(reasons)
        client.set_model_version_tag(name, candidate.version, "promotion", decision)
        raise PromotionRefused(
            f"version {candidate.version} not promoted: "
            + "; ".join(reasons)
            + ". Use --force to promote anyway."
        )
    previous = f"v{champion.version}" if champion is not None else "none"
    decision = f"promoted at {now} (previous champion: {previous})" + (
        f", forced despite: {'; '.join(reasons)}" if reasons else ""
    )
    set_alias(name, CHAMPION, candidate.version)
    client.set_model_version_tag(name, candidate.version, "promotion", decision)
    log.info("%s version %s is now @%s", name, candidate.version, CHAMPION)
    return decision
