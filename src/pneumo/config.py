"""Typed, validated view of params.yaml.

Every section is a frozen pydantic model that forbids unknown keys, so a typo such as
``loss.gama`` fails before any work starts, with the key's dotted name in the message.
Only this module reads params.yaml; stages receive the typed sections they need.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pneumo.errors import UserError

PARAMS_FILE = "params.yaml"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
BACKBONES = (
    "densenet121",
    "resnet50",
    *(f"efficientnet-b{i}" for i in range(8)),
)
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
TTA_VIEW = re.compile(r"^(identity|hflip|rotate:[+-]?\d+(\.\d+)?|scale:\d+(\.\d+)?)$")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
THRESHOLD_RULE = re.compile(r"^(youden|recall>=(0(\.\d+)?|1(\.0+)?))$")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(UserError):
    """params.yaml is missing, malformed or holds an invalid value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitCounts(Section):
    normal: PositiveInt
    pneumonia: PositiveInt


class SampleConfig(Section):
    """The generated data set: counts per official split, image side, images per patient."""

    train: SplitCounts = SplitCounts(normal=90, pneumonia=270)
    val: SplitCounts = SplitCounts(normal=8, pneumonia=8)
    test: SplitCounts = SplitCounts(normal=60, pneumonia=100)
    image_size: Annotated[int, Field(ge=32, le=1024)] = 128
    max_images_per_patient: Annotated[int, Field(ge=1, le=10)] = 3


class DataConfig(Section):
    source: Literal["sample", "kaggle", "local"] = "sample"
    kaggle_dataset: str = "paultimothymooney/chest-xray-pneumonia"
    local_path: str | None = None
    sample: SampleConfig = SampleConfig()
    image_size: Annotated[int, Field(ge=16, le=1024)] = 48
    resize: Literal["pad", "crop"] = "pad"
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    max_bad_fraction: Fraction = 0.01

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataConfig:
        if self.source == "local" and not self.local_path:
            raise ValueError("data.source 'local' needs data.local_path (a folder or a .zip)")
        return self


class ModelConfig(Section):
    pretrained: bool = False
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    hidden_size: PositiveInt = 512


class LossConfig(Section):
    """``alpha`` weighs the positive (PNEUMONIA) class in focal loss; negatives weigh 1."""

    name: Literal["focal", "bce"] = "focal"
    gamma: Annotated[float, Field(ge=0.0)] = 2.0
    alpha: Annotated[float, Field(gt=0.0)] = 2.0
    pos_weight: Literal["auto", "none"] | Annotated[float, Field(gt=0.0)] = "none"


class AugmentConfig(Section):
    """Training-time augmentations; 0 / false switches one off."""

    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 10.0
    hflip: bool = True
    translate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    brightness: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    contrast: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    blur_sigma: Annotated[float, Field(ge=0.0, le=5.0)] = 0.0
    crop_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9


class TrainConfig(Section):
    """How one backbone is fitted; the device settings below change speed, not the recipe.

    ``batch_size`` is the global batch: under ``nproc`` processes each takes an equal share,
    so a run gives comparable results whatever the number of processes.
    """

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    patience: PositiveInt = 3
    weighted_sampler: bool = True
    device: str = "auto"
    amp: Literal["fp16", "bf16", "off"] = "fp16"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = True
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    resume: bool = True
    nproc: PositiveInt = 1
    sync_batchnorm: bool = False

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; allowed: auto, cpu, cuda, cuda:<N>, mps")
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.nproc:
            raise ValueError(
                f"train.batch_size {self.batch_size} is the global batch: it must be a multiple "
                f"of train.nproc {self.nproc}"
            )
        if self.nproc > 1 and re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError("train.nproc > 1 gives each process its own GPU: use device cuda")
        return self


class BootstrapConfig(Section):
    resamples: Annotated[int, Field(ge=10)] = 1000
    seed: int = 0


class EvaluateConfig(Section):
    tta: list[str] = ["identity", "hflip"]
    threshold: float | str = "youden"
    bootstrap: BootstrapConfig = BootstrapConfig()
    batch_size: PositiveInt = 64

    @field_validator("tta")
    @classmethod
    def _known_views(cls, views: list[str]) -> list[str]:
        if not views:
            raise ValueError("needs at least one view, e.g. [identity]")
        for view in views:
            if not TTA_VIEW.match(view):
                raise ValueError(
                    f"unknown view {view!r}; allowed: identity, hflip, rotate:<degrees>, "
                    "scale:<factor>"
                )
        return views

    @field_validator("threshold")
    @classmethod
    def _threshold_rule(cls, value: float | str) -> float | str:
        if isinstance(value, float | int):
            if not 0.0 < value < 1.0:
                raise ValueError("a fixed threshold lies strictly between 0 and 1")
            return float(value)
        if not THRESHOLD_RULE.match(value):
            raise ValueError(f"{value!r} is neither a number nor 'youden' nor 'recall>=X'")
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
    model_name: str = "pneumo-classifier"


class TrackingConfig(Section):
    """``uri: null`` means a SQLite file at the repository root (see pneumo.tracking)."""

    uri: str | None = None
    experiment: str = "pneumo"


class Params(Section):
    seed: int = 42
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
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; every problem is reported with its dotted key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n  ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid params:\n  {lines}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run pneumo from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)


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
