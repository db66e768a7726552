"""Answering from a model folder: its checks, the decision, and a runtime without torch.

A model folder (``models/<backbone>``, assembled by ``pneumo evaluate``) holds everything needed
to predict: the weights, the training card (architecture, image preparation), the inference
settings chosen on the validation split (TTA views, calibration map, threshold, referral band,
input gate, SHA-256 of every file they apply to), the input gate's arrays and the exported
graphs (:mod:`pneumo.core.export`). :class:`Classifier` turns image bytes into answers from
any runtime that gives each TTA view's probability and the identity view's features: torch
(:class:`pneumo.core.inference.TorchClassifier`) or ONNX Runtime (:class:`OnnxClassifier`).

This module, and everything it imports, needs numpy, Pillow and pydantic, not torch: the
``runtime`` extra installs pneumo with ONNX Runtime alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pneumo.core import calibration, gate
from pneumo.core.images import ImageDecodeError, prepare_image
from pneumo.errors import UserError
from pneumo.files import sha256_of
from pneumo.records import Exported, InferenceSettings, InputGate, ModelCard, Referral
from pneumo.specs import DeviceChoice

Runtime = Literal["auto", "onnx", "torch"]
# The gate file of model folders made before the ONNX export (a torch archive).
LEGACY_GATE = "gate.pt"
RUNTIMES: tuple[str, ...] = ("auto", "onnx", "torch")


class ModelFolderError(UserError):
    """The folder is not a usable model folder; the message says what to run."""


class IntegrityError(UserError):
    """A file is not the one the model's settings (or its registration) recorded."""


def verified_settings(
    folder: Path, expected: dict[str, str | None] | None = None, reads: str = "all"
) -> InferenceSettings:
    """The inference settings of a model folder whose files hash to what the settings
    recorded (and to ``expected``, the registration's record: ``{"weights": sha256,
    "onnx": sha256}``, when given); reads the files' bytes but builds no network.

    ``reads`` names what will be loaded, ``torch`` (the weights) or ``onnx`` (the graph), and
    only those files and the gate are checked: each runtime checks what it runs, so a folder
    shipped with its graph alone answers through ONNX. ``all`` checks every file.
    """
    if not (InferenceSettings.path(folder).is_file() and ModelCard.path(folder).is_file()):
        raise ModelFolderError(
            f"{folder} is not a model folder (it needs {ModelCard.FILE}, "
            f"{InferenceSettings.FILE} and {ModelCard.WEIGHTS}): pass --model "
            "models/<backbone> after `dvc repro`, or a models:/<name>@<alias> URI"
        )
    if (folder / LEGACY_GATE).is_file() and not (folder / InputGate.FILE).is_file():
        raise ModelFolderError(
            f"{folder} was made by an earlier pneumo (its gate is {LEGACY_GATE}): rebuild it "
            "with `dvc repro` (evaluate), or use that pneumo version"
        )
    settings = InferenceSettings.read(folder)
    expected = expected or {}
    gate_file = folder / InputGate.FILE
    checks = [(gate_file, InferenceSettings.FILE, settings.gate.sha256)]
    if reads in ("all", "torch"):
        weights = ModelCard.weights(folder)
        checks += [
            (weights, InferenceSettings.FILE, settings.weights_sha256),
            (weights, "the registration", expected.get("weights")),
        ]
    for fmt, exported in settings.exports.items():
        if reads == "all" or reads == fmt:
            checks.append((folder / exported.file, InferenceSettings.FILE, exported.sha256))
    if "onnx" in settings.exports and reads in ("all", "onnx"):
        checks.append((folder / Exported.ONNX, "the registration", expected.get("onnx")))
    for file, source, recorded in checks:
        if not file.is_file():
            raise ModelFolderError(f"{file} is missing: rerun `dvc repro` or copy it back")
        if recorded is None:
            continue
        digest = sha256_of(file)
        if digest != recorded:
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
    passes the gate, and the answer out. Subclasses run the network
    (:meth:`views_and_features`)."""

    card: ModelCard
    settings: InferenceSettings
    gate: dict[str, np.ndarray]
    runtime: str = field(default="", init=False)

    @property
    def image_size(self) -> int:
        return self.card.image_size

    @property
    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU (which wants larger batches than a CPU)."""
        return False

    def prepare(self, data: bytes) -> np.ndarray:
        """Encoded file bytes → the (size, size) uint8 pixels the model was trained on."""
        return prepare_image(data, self.card.image_size, self.card.resize)

    def views_and_features(
        self, pixels: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each TTA view's raw probability (views, N) and the identity view's features
        (N, D) of (N, size, size) uint8 pixels."""
        raise NotImplementedError

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
        units of the space's cut)."""
        per_view, features = self.views_and_features(pixels, batch_size)
        probability = calibration.apply(self.settings.calibration, per_view.mean(axis=0))
        found = {"features": features, "pixels": gate.pixel_features(pixels)}
        return probability, gate.distances(self.gate, found)

    def decide(self, probability: float, gate_score: float, allow_ood: bool = False) -> dict:
        """The answer for one calibrated probability and gate score: none for an input the
        gate flags (unless ``allow_ood``), REFER inside the referral band, else the label the
        threshold gives."""
        cut = self.settings.gate.threshold
        row: dict[str, Any] = {"probability": probability}
        row |= {"in_distribution": bool(gate_score <= cut), "gate_score": gate_score}
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
        self, files: list[Path], batch_size: int = 32, allow_ood: bool = False, workers: int = 1
    ) -> Iterator[dict]:
        """One row per file, in order (:meth:`decide` for each), ``batch_size`` files at a
        time; with ``workers`` > 1, threads decode the next batch while the network runs on
        this one, so at most two batches are in memory.

        An unreadable file gets an ``error`` and no probability; the others go on.
        """
        batches = [files[start : start + batch_size] for start in range(0, len(files), batch_size)]
        if workers <= 1:
            for batch in batches:
                yield from self._answer(batch, [self._read(file) for file in batch], allow_ood)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            ahead = None
            for index, batch in enumerate(batches):
                decoding = ahead or [pool.submit(self._read, file) for file in batch]
                if index + 1 < len(batches):
                    ahead = [pool.submit(self._read, file) for file in batches[index + 1]]
                yield from self._answer(batch, [job.result() for job in decoding], allow_ood)

    def _read(self, file: Path) -> np.ndarray | str:
        """The prepared pixels of ``file``, or why it cannot be read."""
        try:
            return self.prepare(file.read_bytes())
        except (ImageDecodeError, OSError) as exc:
            return str(exc)

    def _answer(
        self, files: list[Path], decoded: list[np.ndarray | str], allow_ood: bool
    ) -> list[dict]:
        rows = [
            {"file": str(file)} | ({"error": found} if isinstance(found, str) else {})
            for file, found in zip(files, decoded, strict=True)
        ]
        ready = [i for i, found in enumerate(decoded) if not isinstance(found, str)]
        if ready:
            pixels = np.stack([decoded[i] for i in ready])
            probabilities, scores = self.assess(pixels, batch_size=len(pixels))
            for i, p, score in zip(ready, probabilities, scores, strict=True):
                rows[i] |= self.decide(float(p), float(score), allow_ood)
        return rows


@dataclass(frozen=True)
class OnnxClassifier(Classifier):
    """A model folder answered by its ONNX graph through ONNX Runtime, without torch."""

    session: Any = None
    runtime: str = field(default="onnx", init=False)

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str = "cpu",
        *,
        expected: dict[str, str | None] | None = None,
        quick_start: bool = False,
    ) -> OnnxClassifier:
        """Load ``folder`` after checking the files it reads; ``quick_start`` for one or a
        few images (:func:`onnx_session`)."""
        recorded = InferenceSettings.path(folder)
        if recorded.is_file() and "onnx" not in InferenceSettings.read(folder).exports:
            raise ModelFolderError(
                f"{folder} has no ONNX graph: run `pneumo export {folder}` (made with "
                "evaluate.export without onnx), or pass --runtime torch"
            )
        settings = verified_settings(folder, expected, reads="onnx")
        session = onnx_session(folder / Exported.ONNX, device, quick_start)
        return cls(ModelCard.read(folder), settings, gate.load(folder), session)

    @property
    def on_gpu(self) -> bool:
        return self.session.get_providers()[0] == "CUDAExecutionProvider"

    def views_and_features(
        self, pixels: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = [], []
        for start in range(0, len(pixels), batch_size):
            batch = np.ascontiguousarray(pixels[start : start + batch_size])[:, None]
            p, f = self.session.run(list(Exported.OUTPUTS), {Exported.INPUT: batch})
            probabilities.append(p)
            features.append(f)
        return np.hstack(probabilities).astype(np.float64), np.vstack(features).astype(np.float64)


def onnx_session(path: Path, device: str = "cpu", quick_start: bool = False) -> Any:
    """An ONNX Runtime session of ``path``: CUDA first when ``device`` asks for a GPU and the
    installed onnxruntime has it, else the CPU.

    ONNX Runtime's layout optimisations (convolutions in blocked NCHWc) answer each image about
    1.7x faster on a CPU (ResNet50 at 224 px: 11 against 6.5 images/s here) but take 0.25 s to
    apply and double the session's memory (300 against 155 MiB): ``quick_start`` (one or a few
    images from a new process) leaves them out.
    """
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        raise ModelFolderError(
            "the ONNX runtime needs onnxruntime: pip install 'pneumo[runtime]' "
            "(or pass --runtime torch)"
        ) from exc
    kind = _device(device).kind
    if kind == "mps" or (kind == "cuda" and not _onnx_has_cuda()):
        raise ModelFolderError(
            f"device is {device!r} but this onnxruntime runs on the CPU only: install "
            "onnxruntime-gpu for CUDA, or pass --runtime torch"
        )
    providers = ["CPUExecutionProvider"]
    if kind in ("cuda", "auto") and _onnx_has_cuda():
        index = _device(device).index or 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    if quick_start:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


def load_classifier(
    folder: Path,
    runtime: str = "auto",
    device: str = "cpu",
    *,
    expected: dict[str, str | None] | None = None,
    quick_start: bool = False,
) -> Classifier:
    """The folder's classifier on ``runtime`` (``quick_start``: :func:`onnx_session`):
    ``onnx``, ``torch``, or ``auto``: ONNX Runtime where the folder has its graph and
    ``device`` is the CPU (or a GPU that the installed onnxruntime has a provider for;
    ``auto`` uses ONNX Runtime's GPU if it has one, else the CPU) and onnxruntime is
    installed, else torch."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime = _auto_runtime(folder, _device(device).kind)
    if runtime == "onnx":
        return OnnxClassifier.load(folder, device, expected=expected, quick_start=quick_start)
    try:
        from pneumo.core.inference import TorchClassifier
    except ModuleNotFoundError as exc:
        raise ModelFolderError(
            f"the torch runtime needs {exc.name}, which is not installed: pip install "
            "'pneumo[pipeline]', or use --runtime onnx"
        ) from exc
    return TorchClassifier.load(folder, device, expected=expected)


def _auto_runtime(folder: Path, kind: str) -> str:
    """ONNX Runtime where it can run the folder's graph on the device asked for (for ``auto``,
    unless torch would use a GPU that this onnxruntime cannot), else torch."""
    if find_spec("onnxruntime") is None or not InferenceSettings.path(folder).is_file():
        return "torch"
    if "onnx" not in InferenceSettings.read(folder).exports:
        return "torch"
    if kind == "cpu" or _onnx_has_cuda():
        return "onnx"
    if kind == "cuda" or (kind == "auto" and _torch_has_cuda()):
        return "torch"
    return "onnx" if kind == "auto" else "torch"  # mps: torch


def _torch_has_cuda() -> bool:
    if find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _device(device: str) -> DeviceChoice:
    try:
        return DeviceChoice.parse(device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _onnx_has_cuda() -> bool:
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
