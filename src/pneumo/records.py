"""The files that stages hand to each other, one typed definition each.

A stage writes a record with ``record.write(folder)`` and the next one reads it with
``Record.read(folder)``: the file name lives here only, a missing file names the command that
makes it, and a file of another shape fails on read rather than as a ``KeyError`` later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict

from pneumo.errors import UserError
from pneumo.files import write_json_atomic


class RecordError(UserError):
    """A record another stage should have written is missing or malformed."""


class Record(BaseModel):
    """A JSON file named ``FILE`` in a folder, written by the command ``WRITER`` (where
    ``{name}`` stands for the folder's name, the backbone of a per-backbone record)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str]
    WRITER: ClassVar[str]

    @classmethod
    def path(cls, folder: Path) -> Path:
        return folder / cls.FILE

    def write(self, folder: Path) -> Path:
        path = self.path(folder)
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, folder: Path) -> Self:
        path = cls.path(folder)
        writer = cls.WRITER.format(name=folder.name)
        if not path.is_file():
            raise RecordError(f"{path} not found: run `{writer}` (or `dvc repro`) first")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except ValueError as exc:  # not JSON, or a pydantic ValidationError
            raise RecordError(
                f"{path} is not a {cls.__name__} record ({exc.__class__.__name__}): rerun "
                f"`{writer}`"
            ) from None


class ModelCard(Record):
    """What a checkpoint needs besides its weights, in ``checkpoints/<backbone>`` and, copied
    by evaluate, in the model folder ``models/<backbone>``.

    Only facts about the model: the MLflow run that trained it is noted outside DVC's
    outputs (``pneumo.mlops.tracking.remember_training_run``), so a rerun gives the same folder.
    """

    FILE = "meta.json"
    WRITER = "pneumo train {name}"
    WEIGHTS: ClassVar[str] = "model.pt"

    backbone: str
    class_names: list[str]
    image_size: int
    resize: str
    normalisation: dict[str, list[float]]
    best_epoch: int
    data_hash: str
    params: dict[str, Any]
    # Where it was trained (pneumo.platforms.describe): the weights repeat bit for bit on an
    # equal platform. Empty in cards written before it was recorded.
    platform: dict[str, Any] = {}

    @classmethod
    def weights(cls, folder: Path) -> Path:
        """The checkpoint (a state dict) that the card describes, beside it."""
        return folder / cls.WEIGHTS


class Calibration(BaseModel):
    """A monotone map from the TTA-averaged probability to a calibrated one, fitted on the
    validation split (pneumo.core.calibration applies it): ``sigmoid(slope·logit(p) +
    intercept)`` for temperature (slope 1/T) and Platt scaling, linear interpolation between
    ``knots`` (probability, calibrated) for isotonic regression, the identity for none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "temperature", "platt", "isotonic"] = "none"
    slope: float = 1.0
    intercept: float = 0.0
    knots: list[tuple[float, float]] = []


class Referral(BaseModel):
    """The band of calibrated probabilities answered REFER instead of a label, ``low <= p <
    high``, chosen on the validation split by ``rule`` (pneumo.core.referral). It always holds
    the threshold, so an answered image gets the label the threshold gives it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    LABEL: ClassVar[str] = "REFER"

    rule: str
    low: float
    high: float

    def refers(self, probability):
        """True inside the band, for a probability or elementwise for an array of them."""
        return (self.low <= probability) & (probability < self.high)


class InputGate(BaseModel):
    """The input gate of a model folder (pneumo.core.gate): its fitted arrays lie in ``FILE``
    beside the weights, hash-checked like them; an image scoring above ``threshold`` (the
    ``percentile`` of the validation images' scores) gets no label."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str] = "gate.npz"

    method: str
    components: int
    percentile: float
    threshold: float
    sha256: str


class Exported(BaseModel):
    """One exported graph of the model folder (pneumo.core.export), beside the weights and
    hash-checked like them. Both formats compute the same function: ``pixels``, a uint8 array
    (N, 1, size, size) prepared as the model card says (8-bit grayscale, padded or cropped to
    a square, bilinear resize to ``image_size``), in; ``probabilities`` (views, N), each TTA
    view's raw PNEUMONIA probability, and ``features`` (N, D), the identity view's pooled
    features for the input gate, out (float32). The answer is then the mean over the views,
    through the calibration map, against the threshold and referral band of these settings,
    with the gate's distances from ``gate.npz``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ONNX: ClassVar[str] = "model.onnx"
    TORCHSCRIPT: ClassVar[str] = "model.torchscript.pt"
    INPUT: ClassVar[str] = "pixels"
    OUTPUTS: ClassVar[tuple[str, str]] = ("probabilities", "features")

    file: str
    sha256: str
    # ONNX operator set (onnx) or the torch version that traced it (torchscript)
    version: str


class InferenceSettings(Record):
    """How the model folder ``models/<backbone>`` decides, chosen by evaluate on the
    validation split: TTA views, calibration, threshold and referral band (on calibrated
    probabilities), the input gate, and the SHA-256 of the weights they were chosen for
    (loading refuses other weights)."""

    FILE = "inference.json"
    WRITER = "pneumo evaluate {name}"

    tta_views: list[str]
    calibration: Calibration
    threshold: float
    threshold_rule: str
    referral: Referral
    gate: InputGate
    weights_sha256: str
    # {"onnx": …, "torchscript": …}; empty in folders made before pneumo exported graphs
    exports: dict[Literal["onnx", "torchscript"], Exported] = {}


class ModelCardDocument(Record):
    """What a person deciding whether to use a model folder needs, in the folder beside the
    weights as JSON and as Markdown (``MARKDOWN``, also the registered version's description):
    intended use, data, recipe, metrics with intervals, calibration, referral band, input
    gate, subgroups, external results, platform and known limits."""

    FILE = "model_card.json"
    WRITER = "pneumo evaluate {name}"
    MARKDOWN: ClassVar[str] = "MODEL_CARD.md"

    model: str
    intended_use: str
    not_for: str
    data: dict[str, Any]
    recipe: dict[str, Any]
    test_metrics: dict[str, Any]
    decision: dict[str, Any]  # threshold, calibration, referral band, input gate
    subgroups: dict[str, Any]
    external: list[dict[str, Any]]
    platforms: list[dict[str, Any]]
    limits: list[str]


class TrainSummary(Record):
    """The best epoch of a training run, in ``reports/train/<backbone>`` (DVC metrics)."""

    FILE = "metrics.json"
    WRITER = "pneumo train {name}"

    best_epoch: int
    epochs_run: int
    best_val_loss: float
    best_val_auc: float


class Evaluation(Record):
    """Test and validation metrics of one backbone, in ``reports/eval/<backbone>``.

    The per-image predictions lie beside it (:meth:`predictions`).
    """

    FILE = "metrics.json"
    WRITER = "pneumo evaluate {name}"
    PREDICTIONS: ClassVar[dict[str, str]] = {
        "test": "predictions.csv",
        "val": "val_predictions.csv",
    }

    backbone: str
    threshold: float
    threshold_rule: str
    tta_views: list[str]
    # the map, how it was chosen, and test ECE/MCE/Brier before and after it
    calibration: dict[str, Any]
    # the band, and on test its coverage and the metrics of the answered images (with CIs)
    referral: dict[str, Any]
    # test sensitivity (and specificity) per PNEUMONIA subtype and per image size band
    subgroups: dict[str, Any]
    # the input gate's cut, its false alarms on test and its detection of shifted inputs
    gate: dict[str, Any]
    test: dict[str, dict[str, float] | int]  # value and interval per metric; confusion counts
    test_no_tta: dict[str, float | int]
    val: dict[str, float | int]
    tta_gain: dict[str, float]
    n_test: int
    n_val: int
    data_hash: str
    platforms: list[dict[str, Any]]  # the training's and, if another, the evaluation's
    # per external set (evaluate.external): metrics at the folder's settings, gate alarms, shift
    external: dict[str, Any] = {}
    # per exported format (evaluate.export): its file and the largest |probability difference|
    # from the torch module over the test split's views
    exports: dict[str, Any] = {}

    @classmethod
    def predictions(cls, folder: Path, split: str) -> Path:
        """Per-image probabilities of ``split`` (test or val), written with the record."""
        return folder / cls.PREDICTIONS[split]


class Comparison(Record):
    """Every backbone and their ensemble ranked on validation, in ``reports``; the README's
    results block is rendered from it."""

    FILE = "comparison.json"
    WRITER = "pneumo compare"
    MARKDOWN: ClassVar[str] = "comparison.md"  # the table, rendered from the record
    ROC_PNG: ClassVar[str] = "comparison_roc.png"  # every model's test ROC curve

    data: str
    select_by: str
    threshold_rule: str
    tta_views: list[str]
    n_test: int
    n_val: int
    settings: dict[str, Any]
    platforms: list[dict[str, Any]]  # every platform that trained or evaluated a model here
    best: str
    ranking: list[str]
    rows: dict[str, dict[str, Any]]
    paired_tests_vs_best: dict[str, dict[str, Any]]


class Registration(Record):
    """What `pneumo register` put in the model registry, in ``reports``: each backbone's
    version, and the version ``@challenger`` marks, with why.

    The versions are the store's: an empty store gives 1, 2, 3 in backbone order; a store that
    already holds a model folder's weights and settings gives that version back.
    """

    FILE = "registry.json"
    WRITER = "pneumo register"

    model_name: str
    store: str  # "embedded" (the repository's mlflow.db) or the tracking server's URI
    versions: dict[str, str]
    challenger: str
    why: str
