"""The only module that touches the MLflow model registry: versions, aliases, promotion.

Each backbone's model folder is logged as an MLflow pyfunc model from code
(:mod:`pneumo.serving`, no pickle) with a signature, a real input example, complete pinned
requirements and the SHA-256 of its weights, and registered as a new version. Versions are
tagged with what produced them; aliases (``challenger``, ``champion``) mark the ones to use.
The deprecated registry stages are not used.
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema

import pneumo
from pneumo import paths, tracking
from pneumo.config import Params
from pneumo.errors import UserError
from pneumo.inference import MODEL_ARTIFACT, SHIPPED_MODULES, Classifier
from pneumo.records import Evaluation, ModelCard

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
GATE_METRICS = ("select_by", "val_recall")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label")]),
)
# Distributions the served model imports (tests/test_serving.py checks the list is complete);
# pydicom joins when installed, so DICOM input works where the model is served.
REQUIREMENTS = (
    "torch", "torchvision", "efficientnet-pytorch", "mlflow", "numpy", "pandas", "pillow",
    "pydantic",
)  # fmt: skip
OPTIONAL_REQUIREMENTS = ("pydicom",)


class PromotionRefused(UserError):
    """The candidate would regress against the current champion."""


def requirements() -> list[str]:
    """Pinned to this environment's versions (without local tags such as ``+cu130``, which
    package indexes do not serve)."""
    pins = []
    for name in REQUIREMENTS + OPTIONAL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={installed_version(name).split('+')[0]}")
        except PackageNotFoundError:
            if name not in OPTIONAL_REQUIREMENTS:
                raise
    return pins


def shipped_code(dest: Path) -> Path:
    """A copy of the pneumo package holding only the modules the served model needs."""
    package = dest / "pneumo"
    package.mkdir(parents=True)
    for module in SHIPPED_MODULES:
        shutil.copy2(Path(pneumo.__file__).parent / module, package / module)
    return package


def input_example(evaluation_dir: Path) -> pd.DataFrame:
    """The first test image of the evaluation, as the base64 file the model takes."""
    first = pd.read_csv(Evaluation.predictions(evaluation_dir, "test"), nrows=1)["image"][0]
    encoded = base64.b64encode((paths.RAW_DIR / first).read_bytes()).decode("ascii")
    return pd.DataFrame({"image": [encoded]})


def register(params: Params, backbone: str, model_dir: Path, evaluation: Evaluation) -> str:
    """Log the backbone's model folder in its training run and register a new version."""
    client = MlflowClient()
    classifier = Classifier.load(model_dir)  # refuses a folder whose weights changed
    weights_sha256 = classifier.settings.weights_sha256
    select = params.compare.metric
    tags = {
        "backbone": backbone,
        "git_commit": tracking.context_tags("compare", evaluation.data_hash)["git_commit"],
        "dvc_experiment": tracking.experiment_name(),
        "data_hash": evaluation.data_hash,
        "weights_sha256": weights_sha256,
        "threshold": f"{evaluation.threshold:.6f}",
        "select_by": params.compare.select_by,
        params.compare.select_by: f"{evaluation.val[select]:.6f}",
        "val_recall": f"{evaluation.val['recall']:.6f}",
        "test_accuracy": f"{evaluation.test['accuracy']['value']:.6f}",
        "test_roc_auc": f"{evaluation.test['roc_auc']['value']:.6f}",
    }
    recorded = tracking.training_run_of(ModelCard.weights(model_dir))
    run_id = tracking.find_run(params.tracking, recorded)
    if run_id is None:
        raise UserError(
            f"the training run of {backbone} ({recorded or 'not recorded in this clone'}) is "
            "not in the tracking store; rerun `dvc repro --force train` to register models"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # Model.log with run_id, as mlflow.pyfunc.log_model does with the active run: the
        # training run is not started again, so a failure here leaves it FINISHED.
        info = tracking.with_retries(
            lambda: Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(Path(pneumo.__file__).parent / "serving.py"),
                artifacts={MODEL_ARTIFACT: str(model_dir)},
                code_paths=[str(shipped_code(Path(tmp)))],
                model_config={"weights_sha256": weights_sha256, "inference_device": "auto"},
                signature=SIGNATURE,
                input_example=input_example(paths.eval_report_dir(backbone)),
                pip_requirements=requirements(),
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
        evaluation = Evaluation.read(paths.eval_report_dir(backbone))
        versions[backbone] = register(params, backbone, paths.model_dir(backbone), evaluation)
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
