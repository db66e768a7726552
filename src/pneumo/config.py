"""Typed, validated view of params.yaml.

Every section is a frozen pydantic model that forbids unknown keys, so a typo such as
``loss.gama`` fails before any work starts, with the key's dotted name in the message.
Only this module reads params.yaml; stages receive the typed sections they need.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from pneumo import paths
from pneumo.errors import UserError
from pneumo.specs import DeviceChoice, ReferralRule, ThresholdRule, View, finite_number

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
Backbone = Literal[
    "densenet121",
    "resnet50",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
    "efficientnet-b4",
    "efficientnet-b5",
    "efficientnet-b6",
    "efficientnet-b7",
]
BACKBONES: tuple[str, ...] = get_args(Backbone)  # models.BUILDERS has a builder for each


def _refuse_bool(value: Any) -> Any:
    """YAML's true/false would otherwise pass as the numbers 1 and 0."""
    if isinstance(value, bool):
        raise ValueError("expects a number, not true/false")
    return value


# Integers are strict (no true/false, no "3"); floats take integers but no booleans; no
# float anywhere may be nan or inf (``allow_inf_nan`` on every section).
Int = Annotated[int, Strict()]
Real = Annotated[float, BeforeValidator(_refuse_bool)]
Fraction = Annotated[Real, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[Int, Field(gt=0)]
Seed = Annotated[Int, Field(ge=0, le=2**32 - 1)]  # the range numpy and scikit-learn accept
Name = Annotated[str, Field(min_length=1, pattern=r"^\S(.*\S)?$")]  # not blank, no edge spaces


class ConfigError(UserError):
    """params.yaml is missing, malformed or holds an invalid value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitCounts(Section):
    normal: PositiveInt
    pneumonia: PositiveInt


class SampleConfig(Section):
    """The generated data set: counts per official split, image side, images per patient."""

    train: SplitCounts = SplitCounts(normal=90, pneumonia=270)
    val: SplitCounts = SplitCounts(normal=8, pneumonia=8)
    test: SplitCounts = SplitCounts(normal=60, pneumonia=100)
    image_size: Annotated[Int, Field(ge=32, le=1024)] = 128
    max_images_per_patient: Annotated[Int, Field(ge=1, le=10)] = 3


class Acquisition(Section):
    """How a generated image is acquired, relative to the training sample's (all 1: the same
    settings): what an external set of phantoms changes to stand for another site."""

    # Detector dose: the image's intensities (0..1) are raised to this power, so above 1
    # darkens it, as more dose blackens film.
    exposure: Annotated[Real, Field(ge=0.2, le=5.0)] = 1.0
    noise: Annotated[Real, Field(ge=0.0, le=20.0)] = 1.0  # times the training images' noise
    # Above 1 the field is wider (the chest fills less of the image), below 1 a closer crop.
    field_of_view: Annotated[Real, Field(ge=0.5, le=2.0)] = 1.0


class ExternalSample(Section):
    """A generated external set: phantoms under other acquisition settings."""

    normal: PositiveInt = 40
    pneumonia: PositiveInt = 60
    image_size: Annotated[Int, Field(ge=32, le=1024)] = 128
    # Phantoms are functions of (seed, index): another seed than the training sample's keeps
    # every external image new.
    seed: Seed = 2018
    acquisition: Acquisition = Acquisition()


class ExternalSet(Section):
    """A data set the models are evaluated on after everything is chosen: ``path`` (a folder or
    .zip with ``NORMAL``/``PNEUMONIA`` folders at any depth, or a CSV of ``path,label``) or
    ``sample`` (generated)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    path: Name | None = None
    sample: ExternalSample | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ExternalSet:
        if (self.path is None) == (self.sample is None):
            raise ValueError(f"external set {self.name!r} needs either path or sample, not both")
        return self


class ZipLimits(Section):
    """Bounds on a ``.zip`` source, so a damaged or hostile archive cannot fill disk or memory.

    The defaults accept the Kaggle archive (about 1.2 GB holding 5,856 JPEGs twice, as a
    nested copy, plus macOS debris).
    """

    max_entry_mb: Annotated[Real, Field(gt=0.0)] = 64.0
    max_total_mb: Annotated[Real, Field(gt=0.0)] = 10_000.0
    max_compression_ratio: Annotated[Real, Field(ge=1.0)] = 100.0


class DataConfig(Section):
    source: Literal["sample", "kaggle", "local"] = "sample"
    # a kagglehub handle: owner/dataset, optionally pinned with /versions/N
    kaggle_dataset: Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+(/versions/\d+)?$")] = (
        "paultimothymooney/chest-xray-pneumonia"
    )
    local_path: str | None = None
    sample: SampleConfig = SampleConfig()
    image_size: Annotated[Int, Field(ge=32, le=1024)] = 48  # below 32 px some backbones fail
    resize: Literal["pad", "crop"] = "pad"
    val_fraction: Annotated[Real, Field(gt=0.0, lt=0.5)] = 0.15
    max_bad_fraction: Fraction = 0.01
    min_image_side: Annotated[Int, Field(ge=1)] = 64
    limits: ZipLimits = ZipLimits()

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataConfig:
        if self.source == "local" and not self.local_path:
            raise ValueError("data.source 'local' needs data.local_path (a folder or a .zip)")
        return self

    @model_validator(mode="after")
    def _sample_fills_the_split(self) -> DataConfig:
        """Preprocess must keep the generated images and find ``val_folds`` patients of each
        class in the pooled train+val."""
        if self.source != "sample":
            return self
        if self.sample.image_size < self.min_image_side:
            raise ValueError(
                f"data.sample.image_size={self.sample.image_size} is below "
                f"data.min_image_side={self.min_image_side}: preprocess would exclude every image"
            )
        folds, per_patient = val_folds(self.val_fraction), self.sample.max_images_per_patient
        for label in ("normal", "pneumonia"):
            counts = (getattr(self.sample.train, label), getattr(self.sample.val, label))
            fewest = sum(math.ceil(n / per_patient) for n in counts)
            if fewest < folds:
                raise ValueError(
                    f"data.sample.train.{label} + data.sample.val.{label} = {sum(counts)} "
                    f"images may come from only {fewest} patients (up to "
                    f"data.sample.max_images_per_patient={per_patient} each); "
                    f"data.val_fraction={self.val_fraction} needs {folds} patients per class"
                )
        return self


def val_folds(val_fraction: float) -> int:
    """Folds of the patient-grouped split; one of them becomes the validation split."""
    return max(2, round(1.0 / val_fraction))


class ModelConfig(Section):
    pretrained: StrictBool = False
    dropout: Annotated[Real, Field(ge=0.0, lt=1.0)] = 0.5
    hidden_size: PositiveInt = 512


class LossConfig(Section):
    """``alpha`` weighs the positive (PNEUMONIA) class in focal loss; negatives weigh 1."""

    name: Literal["focal", "bce"] = "focal"
    gamma: Annotated[Real, Field(ge=0.0)] = 1.5
    alpha: Annotated[Real, Field(gt=0.0)] = 2.0
    pos_weight: Literal["auto", "none"] | float = "none"

    @field_validator("pos_weight", mode="before")
    @classmethod
    def _pos_weight(cls, value: Any) -> Any:
        # Checked here rather than as a union of types, to give one message for one mistake.
        if value in ("auto", "none"):
            return value
        if finite_number(value) and value > 0:
            return float(value)
        raise ValueError("a number above 0, 'auto' or 'none'")


class AugmentConfig(Section):
    """Training-time augmentations; 0 / false switches one off."""

    rotation: Annotated[Real, Field(ge=0.0, le=180.0)] = 10.0
    hflip: StrictBool = True
    translate: Annotated[Real, Field(ge=0.0, lt=1.0)] = 0.05
    brightness: Annotated[Real, Field(ge=0.0, le=1.0)] = 0.1
    contrast: Annotated[Real, Field(ge=0.0, le=1.0)] = 0.1
    blur_sigma: Annotated[Real, Field(ge=0.0, le=5.0)] = 0.0
    crop_scale: Annotated[Real, Field(gt=0.0, le=1.0)] = 0.9


class TrainConfig(Section):
    """How one backbone is fitted; the device settings below change speed, not the recipe.

    ``batch_size`` is the global batch: under ``nproc`` processes each takes an equal share,
    so a run gives comparable results whatever the number of processes.
    """

    epochs: PositiveInt = 3
    batch_size: Annotated[Int, Field(ge=2)] = 32  # BatchNorm cannot train on one image
    lr: Annotated[Real, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[Real, Field(ge=0.0)] = 1e-4
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    patience: PositiveInt = 3
    precise_bn: Annotated[Int, Field(ge=0)] = 256  # training images; 0: running averages
    weighted_sampler: StrictBool = True
    device: str = "auto"
    amp: Literal["fp16", "bf16", "off"] = "fp16"
    channels_last: StrictBool = True
    compile: StrictBool = False
    deterministic: StrictBool | Literal["portable"] = True  # portable: pneumo.platforms
    num_workers: Literal["auto"] | Annotated[Int, Field(ge=0)] = "auto"
    resume: StrictBool = True
    nproc: PositiveInt = 1
    sync_batchnorm: StrictBool = False

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        DeviceChoice.parse(value)
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.nproc:
            raise ValueError(
                f"train.batch_size {self.batch_size} is the global batch: it must be a multiple "
                f"of train.nproc {self.nproc}"
            )
        if self.nproc > 1 and DeviceChoice.parse(self.device).index is not None:
            raise ValueError("train.nproc > 1 gives each process its own GPU: use device cuda")
        return self


class BootstrapConfig(Section):
    resamples: Annotated[Int, Field(ge=10)] = 1000
    seed: Seed = 0


class GateConfig(Section):
    """The input gate (pneumo.core.gate): principal components of the training features it
    keeps, and the percentile of validation scores above which an input gets no label."""

    components: Annotated[Int, Field(ge=1)] = 32
    percentile: Annotated[Real, Field(gt=50.0, le=100.0)] = 99.0


class EvaluateConfig(Section):
    tta: list[str] = ["identity", "hflip"]
    # A map fitted on validation (pneumo.core.calibration); auto: the lowest cross-validated
    # log loss among none, temperature, platt and isotonic.
    calibration: Literal["auto", "none", "temperature", "platt", "isotonic"] = "auto"
    threshold: float | str = "youden"
    # Floors on validation that pick a band of probabilities answered REFER instead of a label
    # (pneumo.core.referral); none answers every image.
    refer: str = "none"
    gate: GateConfig = GateConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    batch_size: PositiveInt = 64
    # Data sets every model folder is also evaluated on (pneumo.stages.external); nothing is
    # chosen on them.
    external: list[ExternalSet] = []
    # Graphs written into every model folder (pneumo.core.export), each checked against torch
    # on the test split: onnx (for `pneumo predict --runtime onnx`, no torch), torchscript
    # (its archive differs from run to run, so the folder does too: not by default).
    export: list[Literal["onnx", "torchscript"]] = ["onnx"]

    @field_validator("export")
    @classmethod
    def _each_format_once(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"a format is listed twice: {formats}")
        return formats

    @field_validator("external")
    @classmethod
    def _distinct_names(cls, sets: list[ExternalSet]) -> list[ExternalSet]:
        names = [entry.name for entry in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"external set names must differ, got {names}")
        return sets

    @field_validator("tta")
    @classmethod
    def _known_views(cls, views: list[str]) -> list[str]:
        if not views:
            raise ValueError("needs at least one view, e.g. [identity]")
        for view in views:
            View.parse(view)
        if len(set(views)) != len(views):
            raise ValueError("a view is listed twice; each view weighs once in the average")
        return views

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_rule(cls, value: Any) -> float | str:
        rule = ThresholdRule.parse(value)
        return value if rule.fixed is None else rule.fixed

    @field_validator("refer")
    @classmethod
    def _referral_rule(cls, value: str) -> str:
        ReferralRule.parse(value)
        return value


class CompareConfig(Section):
    select_by: Literal["val_auc", "val_average_precision", "val_f1", "val_balanced_accuracy"] = (
        "val_auc"
    )

    @property
    def metric(self) -> str:
        """The key of ``select_by`` in the metrics dicts (``val_auc`` → ``roc_auc``)."""
        return selected_metric(self.select_by)


def selected_metric(select_by: str) -> str:
    return select_by.removeprefix("val_").replace("auc", "roc_auc")


class RegistryConfig(Section):
    """The registered model's name and the floors of the promotion gate (`pneumo promote`).

    MLflow refuses '/' and ':' in model names; '@' would end the name in models:/name@alias.
    The floors hold for every candidate, the first champion included; ``--force`` overrides
    them and the history records it. They are read by `pneumo promote` only, not by a stage.
    """

    model_name: Annotated[Name, Field(pattern=r"^[^/:@]+$")] = "pneumo-classifier"
    min_val_auc: Fraction = 0.8
    # The standard deviation of probabilities in [0, 1] is at most 0.5.
    min_prediction_spread: Annotated[Real, Field(ge=0.0, le=0.5)] = 0.001


class TrackingConfig(Section):
    """``uri: null`` means a SQLite file at the repository root (see pneumo.mlops.store)."""

    uri: Name | None = None
    experiment: Annotated[Name, Field(max_length=500)] = "pneumo"  # MLflow's length limit


class Params(Section):
    seed: Seed = 42
    backbones: list[Backbone] = ["densenet121", "resnet50", "efficientnet-b4"]
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("backbones")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if not names or len(set(names)) != len(names):
            raise ValueError("needs one or more distinct backbone names")
        return names


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against params.yaml's documented keys)"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a whole section: the message names the keys
        return f"{key}: {message}"
    return f"{key}: {message} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; every problem is reported with its dotted key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n  ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid params:\n  {lines}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last value silently, so a second ``train:`` block would quietly
    replace the first one's settings.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice (lines {lines[key]} and {line})",
                    problem_mark=key_node.start_mark,
                )
            if isinstance(key, Hashable):
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A YAML file through :class:`UniqueKeyLoader`; errors become one line naming the spot."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(f"{path} is not valid YAML: {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def load_params(path: str | Path = paths.PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run pneumo from the repository root")
    raw = load_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)


def merge_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``, section by section (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_mappings(base[key], value)
        else:
            merged[key] = value
    return merged


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys → nested mapping (``{"loss.gamma": 2}`` → ``{"loss": {"gamma": 2}}``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def flatten_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """Nested mapping → dotted keys (``{"loss": {"gamma": 2}}`` → ``{"loss.gamma": 2}``)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{inner}": item for inner, item in flatten_mapping(value).items()}
        else:
            flat[key] = value
    return flat


def flatten(params: BaseModel) -> dict[str, Any]:
    """Dotted keys → values, the shape MLflow's params table wants."""
    return flatten_mapping(params.model_dump())
