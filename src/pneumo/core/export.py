"""Exporting a model folder's network with its test-time views (:class:`InferenceGraph`) to
ONNX and TorchScript, each checked against the torch module on real images.

ONNX: opset 18, with a dynamic batch axis. Opset 16 is the least that has ``GridSample``
(the rotate and scale views); 18 is what torch's newer exporter writes by default too, so
moving to it changes nothing for a runtime, and ONNX Runtime reads it from 1.14 (2023) on.
The graph is written by torch's TorchScript-based exporter (``dynamo=False``): on these
networks it gave the same graph numerics as the ``torch.export``-based one (within 1.2e-7 of
torch) in a sixth of the time (3-5 s against 16-34 s per backbone, measured here), and
evaluate exports every model folder it makes. EfficientNet's memory-efficient Swish is a
custom autograd function no exporter can trace, so it is swapped for the plain one
(``x·sigmoid(x)``, the same function) first.

The ONNX file is the same bytes for the same weights, wherever pneumo is installed. A
TorchScript archive is not (it records class-name counters of the tracing process and the
traced source's paths): it is written on request only, since a model folder that changes on
every run would break DVC's byte-for-byte reproduction and the registry's deduplication.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from pneumo.core.graph import InferenceGraph, run
from pneumo.core.inference import load_network
from pneumo.core.runtime import onnx_session
from pneumo.errors import UserError
from pneumo.files import sha256_of
from pneumo.records import Exported, InferenceSettings

log = logging.getLogger(__name__)

OPSET = 18
# The exported graphs must answer as the torch module does: probabilities within this, and
# the gate's features within this share of their largest magnitude (other kernels' float32
# sums moved them by up to 0.17% of it, a one-epoch EfficientNet-B4; a broken output is off
# by the whole magnitude).
PARITY_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-2
FORMATS = ("onnx", "torchscript")


class ExportError(UserError):
    """An exported graph does not compute what the torch module does."""


def parity_images(
    size: int, resize: str = "pad", files: list[Path] | None = None, count: int = 64
) -> np.ndarray:
    """Images to check an export on when no test split is at hand: ``files`` prepared as the
    model prepares them, or ``count`` generated phantoms (half with pneumonia)."""
    if files:
        from pneumo.core.images import prepare_image

        return np.stack([prepare_image(file.read_bytes(), size, resize) for file in files])
    from pneumo.core.phantoms import phantom

    return np.stack([phantom(0, i, size, pneumonia=bool(i % 2)) for i in range(count)])


def folder_graph(folder: Path) -> tuple[InferenceGraph, int]:
    """The model folder's network with its TTA views on the CPU, ready to export, and its
    image size."""
    net, card = load_network(folder)
    if hasattr(net.backbone, "set_swish"):  # efficientnet-pytorch
        net.backbone.set_swish(memory_efficient=False)
    settings = InferenceSettings.read(folder)
    return InferenceGraph(net, settings.tta_views, card.image_size).eval(), card.image_size


def _example(size: int) -> torch.Tensor:
    return torch.zeros((2, 1, size, size), dtype=torch.uint8)


def onnx_bytes(graph: InferenceGraph, size: int) -> bytes:
    """The ONNX graph of ``graph`` for (N, 1, size, size) uint8 pixels, any N."""
    buffer = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings():  # the exporter's advice to move to dynamo=True
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (_example(size),),
            buffer,
            input_names=[Exported.INPUT],
            output_names=list(Exported.OUTPUTS),
            dynamic_axes={Exported.INPUT: batch, "probabilities": {1: "batch"}, "features": batch},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def torchscript_bytes(graph: InferenceGraph, size: int) -> bytes:
    """``graph`` traced to TorchScript (``torch.jit.load`` runs it without pneumo)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (_example(size),), check_trace=False)
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _runners(fmt: str, path: Path) -> list:
    """Functions from a (N, 1, size, size) uint8 batch to (probabilities, features) through
    the exported file, one per way pneumo runs it (both ONNX Runtime session kinds)."""
    if fmt == "onnx":
        sessions = [onnx_session(path, quick_start=quick) for quick in (False, True)]
        names = list(Exported.OUTPUTS)
        return [
            lambda batch, session=session: session.run(names, {Exported.INPUT: batch})
            for session in sessions
        ]
    module = torch.jit.load(str(path), map_location="cpu")

    @torch.inference_mode()
    def answer(batch: np.ndarray) -> list[np.ndarray]:
        return [out.numpy() for out in module(torch.from_numpy(batch))]

    return [answer]


def parity(
    fmt: str,
    path: Path,
    images: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    batch_size: int,
) -> tuple[float, float]:
    """How far the exported graph at ``path`` lies from ``reference``, the torch module's
    (per-view probabilities, features) of ``images``: the largest |probability difference|,
    and the largest |feature difference| relative to the features' largest magnitude."""
    probabilities, features = reference
    worst_p, worst_f = 0.0, 0.0
    scale = max(1.0, float(np.abs(features).max()))
    for answer in _runners(fmt, path):
        found = [
            answer(np.ascontiguousarray(images[start : start + batch_size])[:, None])
            for start in range(0, len(images), batch_size)
        ]
        p = np.hstack([out[0] for out in found])
        f = np.vstack([out[1] for out in found])
        worst_p = max(worst_p, float(np.abs(p - probabilities).max()))
        worst_f = max(worst_f, float(np.abs(f - features).max()) / scale)
    return worst_p, worst_f  # fmt: skip


def export_folder(
    folder: Path,
    images: np.ndarray,
    formats: list[str] | tuple[str, ...] = FORMATS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Write each of ``formats`` of the model ``folder``'s graph into it, check each on
    ``images`` (N, size, size) uint8 against the torch module, and record them in the
    folder's inference settings (beside the formats already there). Returns each format's
    largest |probability difference| from torch (a measurement, kept out of the settings:
    another CPU gives other last bits). A graph that differs by more than the tolerances is an
    error, and the folder keeps the graph it had."""
    graph, size = folder_graph(folder)
    reference = run(graph, images, batch_size=batch_size)
    writers = {"onnx": (onnx_bytes, Exported.ONNX, f"opset {OPSET}")}
    writers["torchscript"] = (torchscript_bytes, Exported.TORCHSCRIPT, f"torch {torch.__version__}")
    exported, differences = {}, {}
    for fmt in formats:
        write, name, version = writers[fmt]
        path, candidate = folder / name, folder / f".{name}.new"
        candidate.write_bytes(write(graph, size))
        try:  # checked before it replaces the folder's graph
            difference, feature_difference = parity(fmt, candidate, images, reference, batch_size)
            log.info(
                "%s: %s, max |Δp| %.2g, features %.2g (relative) on %d images",
                folder.name, name, difference, feature_difference, len(images),
            )  # fmt: skip
            if not (difference <= PARITY_TOLERANCE and feature_difference <= FEATURE_TOLERANCE):
                raise ExportError(
                    f"the {fmt} graph of {folder.name} answers up to {difference:.3g} away "
                    f"from torch (tolerance {PARITY_TOLERANCE:g}; features "
                    f"{feature_difference:.3g}, tolerance {FEATURE_TOLERANCE:g}): not written. "
                    "Report it with your torch and onnxruntime versions"
                )
            candidate.replace(path)
        finally:
            candidate.unlink(missing_ok=True)
        exported[fmt] = Exported(file=name, sha256=sha256_of(path), version=version)
        differences[fmt] = difference
    settings = InferenceSettings.read(folder)
    settings.model_copy(update={"exports": settings.exports | exported}).write(folder)
    return differences
