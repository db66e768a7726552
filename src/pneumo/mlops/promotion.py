"""Promotion: moving ``@champion`` to a registered version that passes the gate.

The gate (:func:`gate`) reads the tags registration wrote: absolute floors for every
candidate, and a comparison with the champion only when both were validated on the same data.
Every decision is appended to a history kept as a tag of the registered model.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
from datetime import UTC, datetime

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pneumo.config import Params, RegistryConfig
from pneumo.errors import UserError
from pneumo.mlops import store
from pneumo.mlops.registry import (
    CHALLENGER,
    CHAMPION,
    FLOOR_CI_TAGS,
    FLOOR_METRIC,
    SPREAD_TAG,
    metric_tag,
    set_alias,
    version_by_alias,
)

log = logging.getLogger(__name__)

HISTORY_TAG = "promotion_history"
# MLflow's SQL stores keep a registered model's tag in VARCHAR(5000): the history keeps the
# newest decisions that fit, each reason cut to REASON_MAX_CHARS: about 45 without reasons,
# at least 8 when each has three long ones.
HISTORY_MAX_CHARS = 5000
REASON_MAX_CHARS = 160
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistryError(UserError):
    """The registered model, version or alias asked for is not there, or its history is
    damaged."""


class PromotionRefused(UserError):
    """The gate found reasons not to promote the candidate (``--force`` overrides them)."""


def _short(data_hash: str | None) -> str:
    return data_hash[:12] if data_hash else "none"


def gate(
    candidate: ModelVersion,
    champion: ModelVersion | None,
    config: RegistryConfig,
    select_by: str,
) -> tuple[list[str], list[str]]:
    """Every reason not to make ``candidate`` the champion (empty when it may be), and notes
    on why a floor was let pass.

    Floors first, for every candidate (the first champion included): validation AUC and the
    spread of validation probabilities, which catches a constant model whatever its recall.
    The AUC floor gives way in one case only: the champion is itself below it (a forced
    promotion) and, on the same validation data, the candidate is significantly better (its
    95% DeLong interval lies wholly above the champion's), else the worse model would stay.
    Then the champion: metrics measured on other validation data do not rank two models, so a
    candidate with another ``data_hash`` is refused; on the same data it must not rank worse by
    ``select_by`` (equal passes: the same weights registered again). Recall is not compared:
    it is the point on the ROC curve that the threshold rule picks (``evaluate.threshold:
    recall>=X`` sets it), and a degenerate champion that calls every image PNEUMONIA has
    recall 1.0 and would block every real model.
    """
    tags, reasons, notes = candidate.tags, [], []
    auc = metric_tag(tags, FLOOR_METRIC)
    if auc is None:
        reasons.append(f"no {FLOOR_METRIC} tag, so registry.min_val_auc cannot be checked")
    elif not auc >= config.min_val_auc:  # `not >=` also refuses nan
        better = _significantly_better_than_a_champion_below_the_floor(candidate, champion, config)
        if better:
            notes.append(f"{FLOOR_METRIC} {auc:.4f} is below registry.min_val_auc, but {better}")
        else:
            reasons.append(
                f"{FLOOR_METRIC} {auc:.4f} is below registry.min_val_auc {config.min_val_auc:g}"
            )
    spread = metric_tag(tags, SPREAD_TAG)
    if spread is None:
        reasons.append(f"no {SPREAD_TAG} tag, so a constant model cannot be ruled out")
    elif not spread >= config.min_prediction_spread:
        reasons.append(
            f"near-constant predictions: validation probability std {spread:.2g} is below "
            f"registry.min_prediction_spread {config.min_prediction_spread:g}"
        )
    if champion is None:
        return reasons, notes
    ours, theirs = tags.get("data_hash"), champion.tags.get("data_hash")
    if ours != theirs:
        reasons.append(
            f"validated on different data: champion data_hash {_short(theirs)}, "
            f"candidate {_short(ours)}"
        )
        return reasons, notes
    new, old = metric_tag(tags, select_by), metric_tag(champion.tags, select_by)
    if new is None or old is None:
        lacking = f"v{candidate.version}" if new is None else f"champion v{champion.version}"
        reasons.append(
            f"{lacking} has no {select_by} tag (registered under another compare.select_by?), "
            "so the two cannot be ranked"
        )
    elif not new >= old:
        reasons.append(f"{select_by} {new:.4f} < champion v{champion.version}'s {old:.4f}")
    return reasons, notes


def _interval(version: ModelVersion) -> tuple[float, float] | None:
    low, high = (metric_tag(version.tags, tag) for tag in FLOOR_CI_TAGS)
    return None if low is None or high is None else (low, high)


def _significantly_better_than_a_champion_below_the_floor(
    candidate: ModelVersion, champion: ModelVersion | None, config: RegistryConfig
) -> str | None:
    """Why the AUC floor may give way for ``candidate`` (see :func:`gate`), or None."""
    if champion is None or candidate.tags.get("data_hash") != champion.tags.get("data_hash"):
        return None
    theirs = metric_tag(champion.tags, FLOOR_METRIC)
    ours_ci, theirs_ci = _interval(candidate), _interval(champion)
    if theirs is None or not theirs < config.min_val_auc or not (ours_ci and theirs_ci):
        return None
    if not ours_ci[0] > theirs_ci[1]:
        return None
    return (
        f"significantly above champion v{champion.version}'s {theirs:.4f} (also below it): "
        f"95% CI {ours_ci[0]:.3f}–{ours_ci[1]:.3f} vs {theirs_ci[0]:.3f}–{theirs_ci[1]:.3f}"
    )


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
        candidate = version_by_alias(client, name, CHALLENGER)
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
    store.configure(params.tracking)
    client = MlflowClient()
    name = params.registry.model_name
    candidate = _candidate(client, name, version)
    champion = version_by_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        return f"version {candidate.version} is already @{CHAMPION}: nothing changed"
    past = _history(client, name)  # a damaged history stops us before anything changes
    reasons, notes = gate(candidate, champion, params.registry, params.compare.select_by)
    decision = "forced" if reasons and force else "refused" if reasons else "promoted"
    if decision != "refused":
        set_alias(name, CHAMPION, candidate.version)
    entry = _record(client, name, past, str(candidate.version), champion, decision, reasons + notes)
    if decision == "refused":
        raise PromotionRefused(
            f"version {candidate.version} not promoted: {'; '.join(reasons)}. "
            "Use --force to promote anyway (the history records it as forced)."
        )
    log.info("%s version %s is now @%s", name, candidate.version, CHAMPION)
    previous = f"v{entry['previous']}" if entry["previous"] else "none"
    message = f"version {candidate.version} promoted to @{CHAMPION} (previous champion: {previous})"
    message += f", forced despite: {'; '.join(reasons)}" if reasons else ""
    return message + (f" ({'; '.join(notes)})" if notes else "")


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
    store.with_retries(lambda: client.set_registered_model_tag(name, HISTORY_TAG, text))
    summary = f"{decision} at {entry['at']}" + (f": {'; '.join(reasons)}" if reasons else "")
    store.with_retries(lambda: client.set_model_version_tag(name, version, "promotion", summary))
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
    store.configure(params.tracking)
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
