"""Using a trained model: load a model folder, prepare images, TTA views, device, decision.

A model folder (``models/<backbone>``, assembled by ``pneumo evaluate``) holds everything needed
to predict: the weights, the training card (architecture, image preparation) and the inference
settings chosen on the validation split (TTA views, calibration map, threshold, referral band,
input gate, SHA-256 of the weights) and the input gate's fitted arrays.
evaluate, ``pneumo predict`` and the registered MLflow model all go through this module, so a
folder copied anywhere predicts exactly as it was evaluated.

It imports no stage module and not MLflow: the registered model ships it with the few modules
it needs (:data:`SHIPPED_MODULES`), and ``pneumo predict`` on a folder starts quickly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pneumo.core import calibration, gate
from pneumo.core.devices import resolve_device
from pneumo.core.images import ImageDecodeError, prepare_image
from pneumo.core.models import PneumoniaNet, build_model
from pneumo.errors import UserError
from pneumo.files import sha256_of
from pneumo.records import InferenceSettings, InputGate, ModelCard, Referral
from pneumo.specs import View

# What a model needs at run time, relative to the package: the registered model ships these
# (tests/test_serving.py checks that loading and predicting imports no other pneumo module).
SHIPPED_MODULES = (
    "__init__.py", "errors.py", "files.py", "records.py", "specs.py", "core/__init__.py",
    "core/calibration.py", "core/devices.py", "core/gate.py", "core/images.py",
    "core/inference.py", "core/models.py",
)  # fmt: skip

# The model folder's name among a registered model's MLflow artifacts.
MODEL_ARTIFACT = "model"

Transform = Callable[[torch.Tensor], torch.Tensor]
BILINEAR = InterpolationMode.BILINEAR


class ModelFolderError(UserError):
    """The folder is not a usable model folder; the message says what to run."""


class IntegrityError(UserError):
    """The weights are not the ones the model's settings (or its registration) recorded."""


def load_network(folder: Path) -> tuple[PneumoniaNet, ModelCard]:
    """The network of a checkpoint or model folder (eval mode, CPU) and its card.

    The weights are a plain state dict read with ``weights_only=True``: loading them runs no
    pickled code.
    """
    card = ModelCard.read(folder)
    model_params = card.params["model"]
    net = build_model(
        card.backbone,
        pretrained=False,  # the checkpoint holds all weights; never download here
        dropout=model_params["dropout"],
        hidden_size=model_params["hidden_size"],
    )
    state = torch.load(ModelCard.weights(folder), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval(), card


def tta_view(spec: str) -> Transform:
    """The transform of a view (:class:`pneumo.specs.View`) on (N, C, H, W)."""
    view = View.parse(spec)
    if view.kind == "hflip":
        return F.horizontal_flip
    if view.kind == "rotate":
        return lambda x: F.rotate(x, view.amount, interpolation=BILINEAR)
    if view.kind == "scale":
        return lambda x: F.affine(
            x, angle=0.0, translate=[0, 0], scale=view.amount, shear=[0.0], interpolation=BILINEAR
        )
    return lambda x: x


@torch.inference_mode()
def tta_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    views: list[str],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """PNEUMONIA probabilities of (N, size, size) uint8 pixels, shape (len(views), N)."""
    model.eval()
    transforms = [tta_view(v) for v in views]
    out = np.empty((len(views), len(images)), dtype=np.float64)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size]))[:, None]
        batch = batch.to(device)
        for row, view in enumerate(transforms):
            probs = torch.sigmoid(model(view(batch)).float())
            out[row, start : start + len(batch)] = probs.cpu().numpy()
    return out


def verified_settings(folder: Path, expected_sha256: str | None = None) -> InferenceSettings:
    """The inference settings of a model folder whose weights hash to what the settings (and
    ``expected_sha256``, the registration's record, when given) recorded; reads the weights'
    bytes but builds no network."""
    if not (InferenceSettings.path(folder).is_file() and ModelCard.path(folder).is_file()):
        raise ModelFolderError(
            f"{folder} is not a model folder (it needs {ModelCard.FILE}, "
            f"{InferenceSettings.FILE} and {ModelCard.WEIGHTS}): pass --model "
            "models/<backbone> after `dvc repro`, or a models:/<name>@<alias> URI"
        )
    settings = InferenceSettings.read(folder)
    weights = ModelCard.weights(folder)
    if not weights.is_file():
        raise ModelFolderError(f"{weights} is missing: rerun `dvc repro` or copy it back")
    gate_file = folder / InputGate.FILE
    if not gate_file.is_file():
        raise ModelFolderError(f"{gate_file} is missing: rerun `dvc repro` or copy it back")
    for file, source, recorded in (
        (weights, InferenceSettings.FILE, settings.weights_sha256),
        (weights, "the registration", expected_sha256),
        (gate_file, InferenceSettings.FILE, settings.gate.sha256),
    ):
        digest = sha256_of(file)
        if recorded is not None and digest != recorded:
            raise IntegrityError(
                f"{file} has SHA-256 {digest[:16]}…, but {source} recorded "
                f"{recorded[:16]}…: the file changed after it was recorded; "
                "refusing to load it. Restore the folder (`dvc checkout`) or "
                "re-register the model"
            )
    return settings


@dataclass(frozen=True)
class Classifier:
    """A loaded model folder: image file bytes in; PNEUMONIA probability, whether the input
    passes the gate, and the answer out."""

    net: PneumoniaNet
    card: ModelCard
    settings: InferenceSettings
    gate: dict[str, np.ndarray]
    device: torch.device

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str = "cpu",
        *,
        expected_sha256: str | None = None,
    ) -> Classifier:
        """Load ``folder`` after checking its weights and gate (:func:`verified_settings`)."""
        settings = verified_settings(folder, expected_sha256)
        net, card = load_network(folder)
        target = resolve_device(device, setting="device")
        return cls(net.to(target), card, settings, gate.load(folder), target)

    @property
    def image_size(self) -> int:
        return self.card.image_size

    def prepare(self, data: bytes) -> np.ndarray:
        """Encoded file bytes → the (size, size) uint8 pixels the model was trained on."""
        return prepare_image(data, self.card.image_size, self.card.resize)

    def assess(self, pixels: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated PNEUMONIA probability (the mean over the TTA views, through the folder's
        calibration map) and input-gate score (:func:`pneumo.core.gate.score`) for
        (N, size, size) uint8 pixels."""
        probability, distances = self.examine(pixels, batch_size)
        return probability, gate.score(distances)

    def examine(
        self, pixels: np.ndarray, batch_size: int = 64
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Calibrated PNEUMONIA probability and the gate's distance in each of its spaces (in
        units of the space's cut); the gate sees the identity view's features, taken from the
        same forward passes where it is one of the views."""
        views = self.settings.tta_views
        tap = gate.FeatureTap(self.net)
        try:
            per_view = tta_probabilities(
                self.net, pixels, views, batch_size=batch_size, device=self.device
            )
            if "identity" in views:  # the tap saw each batch once per view, in view order
                chunks, step = tap.captured, len(views)
                identity = chunks[views.index("identity") :: step]
                feats = torch.cat(identity).numpy().astype(np.float64)
            else:
                tap.captured.clear()
                feats = gate.features(self.net, pixels, batch_size=batch_size, device=self.device)
        finally:
            tap.close()
        probability = calibration.apply(self.settings.calibration, per_view.mean(axis=0))
        found = {"features": feats, "pixels": gate.pixel_features(pixels)}
        return probability, gate.distances(self.gate, found)

    def decide(self, probability: float, gate_score: float, allow_ood: bool = False) -> dict:
        """The answer for one calibrated probability and gate score: none for an input the
        gate flags (unless ``allow_ood``), REFER inside the referral band, else the label the
        threshold gives."""
        cut = self.settings.gate.threshold
        row = {"probability": probability, "in_distribution": bool(gate_score <= cut)}
        row["gate_score"] = gate_score
        if not row["in_distribution"]:
            row["reason"] = (
                f"unlike the training images (input-gate score {gate_score:.3g} above the cut "
                f"{cut:.3g}): not a chest radiograph as the model knows one"
            )
            if not allow_ood:
                return row | {"label": None}
        if self.settings.referral.refers(probability):
            return row | {"label": Referral.LABEL}
        positive = probability >= self.settings.threshold
        return row | {"label": self.card.class_names[int(positive)]}

    def predict_files(
        self, files: list[Path], batch_size: int = 32, allow_ood: bool = False
    ) -> Iterator[dict]:
        """One row per file, in order, ``batch_size`` files in memory at a time
        (:meth:`decide` for each).

        An unreadable file gets an ``error`` and no probability; the others go on.
        """
        for start in range(0, len(files), batch_size):
            rows: list[dict] = []
            ready: list[tuple[int, np.ndarray]] = []
            for file in files[start : start + batch_size]:
                try:
                    ready.append((len(rows), self.prepare(file.read_bytes())))
                    rows.append({"file": str(file)})
                except (ImageDecodeError, OSError) as exc:
                    rows.append({"file": str(file), "error": str(exc)})
            if ready:
                probabilities, scores = self.assess(np.stack([image for _, image in ready]))
                for (row, _), p, score in zip(ready, probabilities, scores, strict=True):
                    rows[row] |= self.decide(float(p), float(score), allow_ood)
            yield from rows
