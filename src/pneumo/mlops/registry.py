"""The MLflow model registry: model versions, their tags and aliases.

Each backbone's model folder is logged as an MLflow pyfunc model from code
(:mod:`pneumo.mlops.serving`, no pickle) with a signature, a real input example, complete
pinned requirements and the SHA-256 of its weights, and registered as a version, once: a folder
registered before (same weights and settings) gets its version back. Versions are tagged with
what produced them; aliases (``challenger``, ``champion``) mark the ones to use. The
deprecated registry stages are not used. Moving ``champion`` is :mod:`pneumo.mlops.promotion`'s.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import pneumo
from pneumo.config import Params
from pneumo.core.inference import MODEL_ARTIFACT, SHIPPED_MODULES, verified_settings
from pneumo.core.metrics import MetricsError, delong_interval
from pneumo.mlops import registered, store, tracking
from pneumo.records import Evaluation, InferenceSettings, ModelCard, ModelCardDocument

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
FLOOR_METRIC = "val_auc"  # the floor is on validation ROC AUC whatever compare.select_by is
SPREAD_TAG = "val_probability_std"
# The floor metric's 95% DeLong interval: lets the gate tell a significantly better model from
# a champion that is itself below the floor.
FLOOR_CI_TAGS = (f"{FLOOR_METRIC}_ci_low", f"{FLOOR_METRIC}_ci_high")
KEY_TAG = "registration_key"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema(
        [
            ColSpec("double", "probability"),
            ColSpec("string", "label", required=False),
            ColSpec("boolean", "in_distribution"),
            ColSpec("double", "gate_score"),
            ColSpec("string", "reason", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("allow_ood", "boolean", False)]),
)
# Distributions the served model imports (tests/test_serving.py checks the list is complete);
# pydicom joins when installed, so DICOM input works where the model is served.
REQUIREMENTS = (
    "torch", "torchvision", "efficientnet-pytorch", "mlflow", "numpy", "pandas", "pillow",
    "pydantic",
)  # fmt: skip
OPTIONAL_REQUIREMENTS = ("pydicom", "onnxruntime")


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
        (package / module).parent.mkdir(exist_ok=True)
        shutil.copy2(Path(pneumo.__file__).parent / module, package / module)
    return package


def input_example(evaluation_dir: Path, raw_dir: Path) -> pd.DataFrame:
    """The first test image of the evaluation (its path relative to ``raw_dir``), as the
    base64 file the model takes."""
    first = pd.read_csv(Evaluation.predictions(evaluation_dir, "test"), nrows=1)["image"][0]
    encoded = base64.b64encode((raw_dir / first).read_bytes()).decode("ascii")
    return pd.DataFrame({"image": [encoded]})


def val_auc_interval(val: pd.DataFrame) -> tuple[float, float]:
    """The validation AUC's 95% interval, (nan, nan) when validation lacks a class."""
    try:
        return delong_interval(val["target"].to_numpy(), val["probability"].to_numpy())
    except MetricsError:
        return float("nan"), float("nan")


def prediction_spread(probabilities: Iterable[float]) -> float:
    """Standard deviation of the validation probabilities: about 0 for a model that gives
    every image the same answer, whatever recall that answer scores."""
    return float(np.std(np.asarray(list(probabilities), dtype=float)))


def registration_key(model_dir: Path) -> str:
    """Hash of what decides a model folder's answers: its card and inference settings, which
    hold the weights' SHA-256. Equal keys: the same model, registered once."""
    digest = hashlib.sha256()
    for record in (ModelCard, InferenceSettings):
        digest.update(record.path(model_dir).read_bytes())
    return digest.hexdigest()[:32]


def register(params: Params, backbone: str, model_dir: Path, eval_dir: Path, raw_dir: Path) -> str:
    """The registered version of the backbone's model folder: the one that already holds
    these weights and settings (its tags refreshed), else a new version logged in the
    training run.

    The version is created with its tags in one call, so a kill leaves either no version or
    one that the next run finds by its ``registration_key``.
    """
    client = MlflowClient()
    name = params.registry.model_name
    evaluation = Evaluation.read(eval_dir)
    val = pd.read_csv(Evaluation.predictions(eval_dir, "val"))
    # refuses a folder whose weights changed, without building the network
    settings = verified_settings(model_dir)
    weights_sha256 = settings.weights_sha256
    onnx = settings.exports.get("onnx")
    select = params.compare.metric
    tags = {
        "backbone": backbone,
        "git_commit": tracking.context_tags("register", evaluation.data_hash)["git_commit"],
        "dvc_experiment": tracking.experiment_name(),
        "data_hash": evaluation.data_hash,
        "weights_sha256": weights_sha256,
        **({"onnx_sha256": onnx.sha256} if onnx else {}),
        KEY_TAG: registration_key(model_dir),
        "threshold": f"{evaluation.threshold:.6f}",
        "refer_band": f"[{evaluation.referral['low']:.6f}, {evaluation.referral['high']:.6f})",
        "select_by": params.compare.select_by,
        params.compare.select_by: f"{evaluation.val[select]:.6f}",
        FLOOR_METRIC: f"{evaluation.val['roc_auc']:.6f}",
        SPREAD_TAG: f"{prediction_spread(val['probability']):.6g}",
        **dict(zip(FLOOR_CI_TAGS, (f"{v:.6f}" for v in val_auc_interval(val)), strict=True)),
        "val_recall": f"{evaluation.val['recall']:.6f}",
        "test_accuracy": f"{evaluation.test['accuracy']['value']:.6f}",
        "test_roc_auc": f"{evaluation.test['roc_auc']['value']:.6f}",
    }
    description = (model_dir / ModelCardDocument.MARKDOWN).read_text()
    existing = _version_with_key(client, name, tags[KEY_TAG])
    if existing is not None:
        if existing.description != description:
            store.with_retries(
                lambda: client.update_model_version(name, existing.version, description)
            )
        for key, value in tags.items():
            if key not in ("git_commit", "dvc_experiment") and existing.tags.get(key) != value:
                store.with_retries(
                    lambda k=key, v=value: client.set_model_version_tag(
                        name, existing.version, k, v
                    )
                )
        if registered.MANIFEST_TAG not in existing.tags:  # registered before manifests
            files = mlflow.artifacts.download_artifacts(f"models:/{name}/{existing.version}")
            store.with_retries(lambda: client.set_model_version_tag(
                name, existing.version, registered.MANIFEST_TAG,
                registered.manifest_tag(Path(files)),
            ))  # fmt: skip
        log.info("%s is already %s version %s: reused", backbone, name, existing.version)
        return str(existing.version)
    run_id = _logging_run(params, backbone, model_dir, evaluation.data_hash, weights_sha256)
    with tempfile.TemporaryDirectory() as tmp:
        # Model.log with run_id, as mlflow.pyfunc.log_model does with the active run: the
        # training run is not started again, so a failure here leaves it FINISHED.
        info = store.with_retries(
            lambda: Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(Path(pneumo.__file__).parent / "mlops/serving.py"),
                artifacts={MODEL_ARTIFACT: str(model_dir)},
                code_paths=[str(shipped_code(Path(tmp)))],
                # The served model checks both files against these (pneumo.mlops.serving).
                model_config={
                    "weights_sha256": weights_sha256,
                    "onnx_sha256": onnx.sha256 if onnx else None,
                    "inference_device": "auto",
                    "runtime": "auto",
                },
                signature=SIGNATURE,
                input_example=input_example(eval_dir, raw_dir),
                pip_requirements=requirements(),
            )
        )
    # What was logged, as the store holds it, pinned in the tracking database
    logged = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    tags[registered.MANIFEST_TAG] = registered.manifest_tag(logged)
    created = store.with_retries(lambda: mlflow.register_model(info.model_uri, name, tags=tags))
    # The model card; a kill before this line leaves a version the next run finds and fills.
    store.with_retries(lambda: client.update_model_version(name, created.version, description))
    log.info("registered %s as %s version %s", backbone, name, created.version)
    return str(created.version)


def _version_with_key(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    """The oldest version registered from the same model folder, if any."""
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [v for v in found if v.tags.get(KEY_TAG) == key]
    return min(same, key=lambda v: int(v.version), default=None)


def _logging_run(
    params: Params, backbone: str, model_dir: Path, data_hash: str, weights_sha256: str
) -> str:
    """The run to log the model into: its training run, or, when this store does not hold
    it (a clone with pulled outputs, another tracking server), a new run that says which
    checkpoint it registers."""
    weights = ModelCard.weights(model_dir)
    recorded = tracking.training_run_of(weights)
    run_id = tracking.find_run(params.tracking, recorded)
    if run_id is not None:
        return run_id
    tags = tracking.context_tags(f"register@{backbone}", data_hash) | {
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "trained_in_run": recorded or "unknown (not recorded in this clone)",
    }
    run_name = f"{tracking.experiment_name()}-{backbone}-registration"
    with tracking.start_run(params.tracking, run_name=run_name, tags=tags) as run:
        tracking.log_artifacts([ModelCard.path(model_dir)])
    log.warning(
        "the training run of %s is not in this tracking store (trained in another clone?): "
        "its model is logged in the new run %s, tagged with the weights' SHA-256",
        backbone, run.info.run_id,
    )  # fmt: skip
    return run.info.run_id


def challenger_choice(
    current: ModelVersion | None, new: ModelVersion, select_by: str
) -> tuple[str, str]:
    """The version that ``@challenger`` should mark, and why."""
    if current is None:
        return str(new.version), "no challenger before"
    if str(current.version) == str(new.version):
        return str(new.version), "already @challenger"
    was = f"the previous challenger v{current.version}"
    if current.tags.get("data_hash") != new.tags.get("data_hash"):
        return str(new.version), f"{was} was validated on other data"
    old, best = metric_tag(current.tags, select_by), metric_tag(new.tags, select_by)
    if old is None:
        return str(new.version), f"{was} has no {select_by} tag"
    if best is not None and best > old:
        return str(new.version), f"{select_by} {best:.4f} beats v{current.version}'s {old:.4f}"
    shown = "none" if best is None else f"{best:.4f}"
    return str(current.version), (
        f"kept: its {select_by} {old:.4f} on the same data is not below the new best "
        f"v{new.version}'s {shown}"
    )


def set_alias(name: str, alias: str, version: str) -> None:
    store.with_retries(lambda: MlflowClient().set_registered_model_alias(name, alias, version))


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def metric_tag(tags: dict[str, str], key: str) -> float | None:
    """A metric tag as a number; None when missing or not a number."""
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None
