"""The only module that touches the MLflow model registry: versions, aliases, promotion.

Each backbone's model folder is logged as an MLflow pyfunc model from code
(:mod:`pneumo.serving`, no pickle) with a signature, a real input example, complete pinned
requirements and the SHA-256 of its weights, and registered as a version, once: a folder registered
before (same weights and settings) gets its version back. Versions are tagged with what
produced them; aliases (``challenger``, ``champion``) mark the ones to use.
The deprecated registry stages are not used.

Promotion is a gate on those tags (:func:`gate`): absolute floors for every candidate, and a
comparison with the champion only when both were validated on the same data. Every decision
is appended to a history kept as a tag of the registered model.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
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
from mlflow.types import ColSpec, Schema

import pneumo
from pneumo import paths, tracking
from pneumo.config import Params, RegistryConfig
from pneumo.errors import UserError
from pneumo.inference import MODEL_ARTIFACT, SHIPPED_MODULES, Classifier
from pneumo.records import Comparison, Evaluation, InferenceSettings, ModelCard, Registration

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
FLOOR_METRIC = "val_auc"  # the floor is on validation ROC AUC whatever compare.select_by is
SPREAD_TAG = "val_probability_std"
KEY_TAG = "registration_key"
HISTORY_TAG = "promotion_history"
# MLflow's SQL stores keep a registered model's tag in VARCHAR(5000): the history keeps the
# newest decisions that fit, each reason cut to REASON_MAX_CHARS: about 45 without reasons,
# at least 8 when each has three long ones.
HISTORY_MAX_CHARS = 5000
REASON_MAX_CHARS = 160
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
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


class RegistryError(UserError):
    """The registered model, version or alias asked for is not there, or its history is
    damaged."""


class PromotionRefused(UserError):
    """The gate found reasons not to promote the candidate (``--force`` overrides them)."""


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


def register(params: Params, backbone: str, model_dir: Path, evaluation: Evaluation) -> str:
    """The registered version of the backbone's model folder: the one that already holds
    these weights and settings (its tags refreshed), else a new version logged in the
    training run.

    The version is created with its tags in one call, so a kill leaves either no version or
    one that the next run finds by its ``registration_key``.
    """
    client = MlflowClient()
    name = params.registry.model_name
    eval_dir = paths.eval_report_dir(backbone)
    val = pd.read_csv(Evaluation.predictions(eval_dir, "val"))
    classifier = Classifier.load(model_dir)  # refuses a folder whose weights changed
    weights_sha256 = classifier.settings.weights_sha256
    select = params.compare.metric
    tags = {
        "backbone": backbone,
        "git_commit": tracking.context_tags("register", evaluation.data_hash)["git_commit"],
        "dvc_experiment": tracking.experiment_name(),
        "data_hash": evaluation.data_hash,
        "weights_sha256": weights_sha256,
        KEY_TAG: registration_key(model_dir),
        "threshold": f"{evaluation.threshold:.6f}",
        "select_by": params.compare.select_by,
        params.compare.select_by: f"{evaluation.val[select]:.6f}",
        FLOOR_METRIC: f"{evaluation.val['roc_auc']:.6f}",
        SPREAD_TAG: f"{prediction_spread(val['probability']):.6g}",
        "val_recall": f"{evaluation.val['recall']:.6f}",
        "test_accuracy": f"{evaluation.test['accuracy']['value']:.6f}",
        "test_roc_auc": f"{evaluation.test['roc_auc']['value']:.6f}",
    }
    existing = _version_with_key(client, name, tags[KEY_TAG])
    if existing is not None:
        for key, value in tags.items():
            if key not in ("git_commit", "dvc_experiment") and existing.tags.get(key) != value:
                tracking.with_retries(
                    lambda k=key, v=value: client.set_model_version_tag(
                        name, existing.version, k, v
                    )
                )
        log.info("%s is already %s version %s: reused", backbone, name, existing.version)
        return str(existing.version)
    run_id = _logging_run(params, backbone, model_dir, evaluation.data_hash, weights_sha256)
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
                input_example=input_example(eval_dir),
                pip_requirements=requirements(),
            )
        )
    created = tracking.with_retries(lambda: mlflow.register_model(info.model_uri, name, tags=tags))
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


def register_all(params: Params) -> Registration:
    """Register every backbone's model folder (:func:`register`); ``@challenger`` goes to the
    comparison's best only if it beats the current challenger (:func:`challenger_choice`)."""
    tracking.configure(params.tracking)
    client = MlflowClient()
    name = params.registry.model_name
    best = Comparison.read(paths.REPORTS_DIR).best
    current = _version_by_alias(client, name, CHALLENGER)
    versions = {}
    for backbone in params.backbones:
        evaluation = Evaluation.read(paths.eval_report_dir(backbone))
        versions[backbone] = register(params, backbone, paths.model_dir(backbone), evaluation)
    new = client.get_model_version(name, versions[best])
    challenger, why = challenger_choice(current, new, params.compare.select_by)
    if current is None or str(current.version) != challenger:
        set_alias(name, CHALLENGER, challenger)
    log.info("@%s is version %s: %s", CHALLENGER, challenger, why)
    record = Registration(
        model_name=name,
        store=tracking.store_label(params.tracking),
        versions=versions,
        challenger=challenger,
        why=why,
    )
    record.write(paths.REPORTS_DIR)
    return record


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
    old, best = _metric(current.tags, select_by), _metric(new.tags, select_by)
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
    tracking.with_retries(lambda: MlflowClient().set_registered_model_alias(name, alias, version))


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric(tags: dict[str, str], key: str) -> float | None:
    """A metric tag as a number; None when missing or not a number."""
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _short(data_hash: str | None) -> str:
    return data_hash[:12] if data_hash else "none"


def gate(
    candidate: ModelVersion,
    champion: ModelVersion | None,
    config: RegistryConfig,
    select_by: str,
) -> list[str]:
    """Every reason not to make ``candidate`` the champion; empty when it may be.

    Floors first, for every candidate (the first champion included): validation AUC and the
    spread of validation probabilities, which catches a constant model whatever its recall.
    Then the champion: metrics measured on other validation data do not rank two models, so a
    candidate with another ``data_hash`` is refused; on the same data it must not rank worse by
    ``select_by`` (equal passes: the same weights registered again). Recall is not compared:
    it is the point on the ROC curve that the threshold rule picks (``evaluate.threshold:
    recall>=X`` sets it), and a degenerate champion that calls every image PNEUMONIA has
    recall 1.0 and would block every real model.
    """
    tags, reasons = candidate.tags, []
    auc = _metric(tags, FLOOR_METRIC)
    if auc is None:
        reasons.append(f"no {FLOOR_METRIC} tag, so registry.min_val_auc cannot be checked")
    elif not auc >= config.min_val_auc:  # `not >=` also refuses nan
        reasons.append(
            f"{FLOOR_METRIC} {auc:.4f} is below registry.min_val_auc {config.min_val_auc:g}"
        )
    spread = _metric(tags, SPREAD_TAG)
    if spread is None:
        reasons.append(f"no {SPREAD_TAG} tag, so a constant model cannot be ruled out")
    elif not spread >= config.min_prediction_spread:
        reasons.append(
            f"near-constant predictions: validation probability std {spread:.2g} is below "
            f"registry.min_prediction_spread {config.min_prediction_spread:g}"
        )
    if champion is None:
        return reasons
    ours, theirs = tags.get("data_hash"), champion.tags.get("data_hash")
    if ours != theirs:
        reasons.append(
            f"validated on different data: champion data_hash {_short(theirs)}, "
            f"candidate {_short(ours)}"
        )
        return reasons
    new, old = _metric(tags, select_by), _metric(champion.tags, select_by)
    if new is None or old is None:
        lacking = f"v{candidate.version}" if new is None else f"champion v{champion.version}"
        reasons.append(
            f"{lacking} has no {select_by} tag (registered under another compare.select_by?), "
            "so the two cannot be ranked"
        )
    elif not new >= old:
        reasons.append(f"{select_by} {new:.4f} < champion v{champion.version}'s {old:.4f}")
    return reasons


def _require_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != NOT_FOUND:
            raise
        raise RegistryError(
            f"no registered model {name!r} in {mlflow.get_tracking_uri()}: run `pneumo "
            "register` (the register stage of `dvc repro`) first"
        ) from None


def _versions(client: MlflowClient, name: str) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def _candidate(client: MlflowClient, name: str, version: str | None) -> ModelVersion:
    _require_model(client, name)
    if version is not None and not re.fullmatch(r"[1-9]\d*", version):
        raise RegistryError(f"--version takes a version number such as 3, not {version!r}")
    known = _versions(client, name)
    if not known:
        raise RegistryError(f"{name} has no versions: run `pneumo register` first")
    if version is None:
        candidate = _version_by_alias(client, name, CHALLENGER)
        if candidate is None:
            raise RegistryError(
                f"{name} has no {CHALLENGER!r} alias: run `pneumo register` first, or pass "
                "--version"
            )
        return candidate
    if int(version) not in known:
        raise RegistryError(f"{name} has no version {version} (versions {known[0]} to {known[-1]})")
    return client.get_model_version(name, version)


def promote(params: Params, version: str | None = None, force: bool = False) -> str:
    """Move ``champion`` to the challenger (or ``version``) if it passes :func:`gate`.

    A refused candidate raises :class:`PromotionRefused`; ``force`` promotes it anyway. Every
    decision goes to the promotion history (:func:`history`) and, the latest one, to the
    candidate's ``promotion`` tag.
    """
    tracking.configure(params.tracking)
    client = MlflowClient()
    name = params.registry.model_name
    candidate = _candidate(client, name, version)
    champion = _version_by_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        return f"version {candidate.version} is already @{CHAMPION}: nothing changed"
    past = _history(client, name)  # a damaged history stops us before anything changes
    reasons = gate(candidate, champion, params.registry, params.compare.select_by)
    decision = "forced" if reasons and force else "refused" if reasons else "promoted"
    if decision != "refused":
        set_alias(name, CHAMPION, candidate.version)
    entry = _record(client, name, past, str(candidate.version), champion, decision, reasons)
    if decision == "refused":
        raise PromotionRefused(
            f"version {candidate.version} not promoted: {'; '.join(reasons)}. "
            "Use --force to promote anyway (the history records it as forced)."
        )
    log.info("%s version %s is now @%s", name, candidate.version, CHAMPION)
    previous = f"v{entry['previous']}" if entry["previous"] else "none"
    message = f"version {candidate.version} promoted to @{CHAMPION} (previous champion: {previous})"
    return message + (f", forced despite: {'; '.join(reasons)}" if reasons else "")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name in some containers
        return "unknown"


def _record(
    client: MlflowClient,
    name: str,
    past: list[dict],
    version: str,
    champion: ModelVersion | None,
    decision: str,
    reasons: list[str],
) -> dict:
    """Append one decision to the ``past`` ones in the history tag, dropping the oldest
    that no longer fit."""
    entry = {
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "decision": decision,
        "version": version,
        "previous": str(champion.version) if champion is not None else None,
        "by": _user(),
        "reasons": [reason[:REASON_MAX_CHARS] for reason in reasons],
    }
    entries = [*past, entry]
    text = _dump(entries)
    while len(text) > HISTORY_MAX_CHARS and len(entries) > 1:
        entries.pop(0)
        text = _dump(entries)
    tracking.with_retries(lambda: client.set_registered_model_tag(name, HISTORY_TAG, text))
    summary = f"{decision} at {entry['at']}" + (f": {'; '.join(reasons)}" if reasons else "")
    tracking.with_retries(lambda: client.set_model_version_tag(name, version, "promotion", summary))
    return entry


def _dump(entries: list[dict]) -> str:
    return json.dumps(entries, separators=(",", ":"))


def _history(client: MlflowClient, name: str) -> list[dict]:
    text = client.get_registered_model(name).tags.get(HISTORY_TAG)
    if text is None:
        return []
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(
            f"the {HISTORY_TAG!r} tag of {name} is not a JSON list of decisions: restore it or "
            "delete the tag (a new history starts)"
        )
    return entries


def history(params: Params) -> list[dict]:
    """The recorded promotion decisions, oldest first."""
    tracking.configure(params.tracking)
    client = MlflowClient()
    _require_model(client, params.registry.model_name)
    return _history(client, params.registry.model_name)


def render_history(entries: list[dict]) -> str:
    """The decisions as a plain-text table, newest last."""
    if not entries:
        return "no promotion decisions recorded yet"
    header = ("time (UTC)", "decision", "version", "previous", "by", "reasons")
    rows = [
        (
            str(e.get("at", "?")).replace("T", " ").removesuffix("Z"),
            str(e.get("decision", "?")),
            f"v{e['version']}" if e.get("version") else "?",
            f"v{e['previous']}" if e.get("previous") else "none",
            str(e.get("by", "?")),
            "; ".join(e.get("reasons") or []) or "-",
        )
        for e in entries
    ]
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    widths[-1] = 0  # the reasons column is last and not padded
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
