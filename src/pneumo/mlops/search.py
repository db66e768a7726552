"""A search space file (``configs/search/*.yaml``) for `pneumo tune`: typed, validated, drawn.

Keys are params.yaml's dotted keys, as ``dvc exp run -S`` takes them, plus ``backbone``: a
trial trains one network. Only what a trial's training reads may be searched or fixed
(``seed``, ``model.*``, ``loss.*``, ``augment.*``, ``train.*``): the data would need another
preprocess, and evaluation settings do not change the validation metric a trial is judged by.
Each value a trial draws goes through the same validation as `pneumo check`, and the ends of
every range (every choice) are checked before the first trial, so an invalid space fails at
once with its key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, ValidationError, model_validator

from pneumo.config import (
    ConfigError,
    Int,
    Params,
    Real,
    Section,
    Seed,
    flatten,
    load_yaml,
    merge_mappings,
    nest_dotted,
    parse_params,
)

BACKBONE = "backbone"
SEARCHABLE = ("seed", "model.", "loss.", "augment.", "train.")
# A trial runs in the tuning process: one process, one device. Searched keys that set how
# training runs, not what it learns, would only make trials differ for no reason.
NOT_SEARCHABLE = ("train.nproc", "train.resume", "train.device", "train.num_workers")
NonNegativeInt = Annotated[Int, Field(ge=0)]
OBJECTIVES = {"val_auc": "maximize", "val_loss": "minimize"}  # validation only, never test


class Dimension(Section):
    """One searched key. ``when`` makes it conditional: drawn only in trials whose earlier
    choices match (``{loss.name: focal}``, or a list of values), so a value the trial would not
    read (focal's gamma under bce) is neither drawn, nor credited with an importance, nor
    written into the winner."""

    when: dict[str, Any] = {}

    def applies(self, drawn: dict[str, Any]) -> bool:
        return all(drawn.get(key) in _as_list(values) for key, values in self.when.items())


class Choices(Dimension):
    choices: list[Any] = Field(min_length=1)


class Range(Dimension):
    """Integers when both ends are integers (and ``step`` too, if given), else floats."""

    low: StrictInt | Real
    high: StrictInt | Real
    log: StrictBool = False
    step: StrictInt | Real | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


class SamplerConfig(Section):
    name: Literal["tpe", "random"] = "tpe"
    seed: Seed = 0


class PrunerConfig(Section):
    """``median``: stop a trial whose epoch is worse than the median of earlier trials at the
    same epoch; ``hyperband``; ``threshold``: stop one worse than ``threshold`` (a validation
    AUC below it, a validation loss above it); ``none``. Every trial runs ``warmup_epochs``
    epochs before it may be stopped (median and threshold), none is stopped after its last
    epoch (it has finished), and with median the first ``startup_trials`` trials run to the
    end."""

    name: Literal["median", "hyperband", "threshold", "none"] = "median"
    startup_trials: NonNegativeInt = 2
    warmup_epochs: NonNegativeInt = 1
    threshold: Real | None = None

    @model_validator(mode="after")
    def _threshold_given(self) -> PrunerConfig:
        if (self.name == "threshold") != (self.threshold is not None):
            raise ValueError("threshold is needed by, and only by, the threshold pruner")
        return self


class SearchConfig(Section):
    objective: Literal["val_auc", "val_loss"]
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    params: dict[str, Any] = {}  # fixed for every trial, laid over params.yaml
    space: dict[str, Choices | Range] = Field(min_length=1)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def fingerprint(self) -> str:
        """Identifies the search: a study refuses workers that bring another one."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SearchError(ConfigError):
    """A search space file is invalid."""


def load_search(path: Path, base: dict[str, Any]) -> SearchConfig:
    """Read and check a search file against ``base`` (params.yaml's raw mapping)."""
    if not path.is_file():
        raise SearchError(f"{path}: no such search file (examples: configs/search/)")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise SearchError(f"{path} must hold a mapping with objective and space")
    try:
        search = SearchConfig.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SearchError(f"{path} is invalid:\n  {lines}") from None
    known = set(flatten(parse_params(base)))
    for section, keys in (("params", search.params), ("space", search.space)):
        for key in keys:
            _check_key(path, section, key, known)
    _check_conditions(path, search.space)
    trial_params(base, search, {})  # the fixed params alone
    for key, dimension in search.space.items():
        values = (
            dimension.choices if isinstance(dimension, Choices) else [dimension.low, dimension.high]
        )
        for value in values:
            try:
                trial_params(base, search, {key: value})
            except ConfigError as exc:
                raise SearchError(
                    f"{path}: space.{key}: the value {value!r} is invalid: {exc}"
                ) from None
    return search


def _check_key(path: Path, section: str, key: str, known: set[str]) -> None:
    if key == BACKBONE:
        if section == "params":
            raise SearchError(f"{path}: params.{key}: a fixed backbone goes in space as choices")
        return
    if key == "backbones":
        raise SearchError(f"{path}: {section}.backbones: a trial trains one `backbone`")
    if key not in known:
        raise SearchError(
            f"{path}: {section}.{key}: not a params.yaml key (dotted, e.g. loss.gamma)"
        )
    if not key.startswith(SEARCHABLE) or key in NOT_SEARCHABLE:
        raise SearchError(
            f"{path}: {section}.{key}: a trial does not read it (searchable: seed, model.*, "
            f"loss.*, augment.*, train.* but {', '.join(NOT_SEARCHABLE)}); data.* needs its own "
            "preprocess: set it in params.yaml and run `dvc repro preprocess` first"
        )


def _check_conditions(path: Path, space: dict[str, Choices | Range]) -> None:
    """A ``when`` names a choice drawn before its key, with values among that choice's."""
    keys = list(space)
    for key, dimension in space.items():
        for condition, values in dimension.when.items():
            earlier = space.get(condition)
            if not isinstance(earlier, Choices) or keys.index(condition) > keys.index(key):
                raise SearchError(
                    f"{path}: space.{key}.when.{condition}: a condition names a key with "
                    "choices listed above it in space"
                )
            if unknown := [v for v in _as_list(values) if v not in earlier.choices]:
                raise SearchError(
                    f"{path}: space.{key}.when.{condition}: {unknown} not among its choices "
                    f"{earlier.choices}"
                )


def _as_list(values: Any) -> list[Any]:
    return values if isinstance(values, list) else [values]


def trial_params(base: dict[str, Any], search: SearchConfig, drawn: dict[str, Any]) -> Params:
    """params.yaml with the search's fixed params and one trial's drawn values, validated."""
    values = search.params | {k: v for k, v in drawn.items() if k != BACKBONE}
    raw = merge_mappings(base, nest_dotted(values))
    if BACKBONE in drawn:
        raw = raw | {"backbones": [drawn[BACKBONE]]}
    return parse_params(raw)


def backbone_of(params: Params, drawn: dict[str, Any]) -> str:
    """The trial's network: drawn, else the first of params.yaml's backbones."""
    return drawn.get(BACKBONE, params.backbones[0])


def suggest(trial: Any, search: SearchConfig) -> dict[str, Any]:
    """One value per searched key whose ``when`` holds, drawn by an Optuna trial."""
    drawn: dict[str, Any] = {}
    for key, dimension in search.space.items():
        if not dimension.applies(drawn):
            continue
        if isinstance(dimension, Choices):
            drawn[key] = trial.suggest_categorical(key, dimension.choices)
        elif dimension.integer:
            drawn[key] = trial.suggest_int(
                key, int(dimension.low), int(dimension.high), step=int(dimension.step or 1),
                log=dimension.log,
            )  # fmt: skip
        else:
            drawn[key] = trial.suggest_float(
                key, dimension.low, dimension.high, step=dimension.step, log=dimension.log
            )
    return drawn


def approach_overrides(search: SearchConfig, drawn: dict[str, Any], backbone: str) -> dict:
    """The best trial as an approach (configs/approaches/): every value it trained with."""
    values = search.params | {k: v for k, v in drawn.items() if k != BACKBONE}
    return {"backbones": [backbone], **nest_dotted(values)}
