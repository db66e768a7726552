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
from pneumo.files import sha256_of, write_bytes_atomic
from pneumo.records import Exported, InferenceSettings

log = logging.getLogger(__name__)

OPSET = 18
# The exported graphs must answer as the torch module does: probabilities within this.
PARITY_TOLERANCE = 1e-4
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


def _runner(fmt: str, path: Path):
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda batch: session.run(list(Exported.OUTPUTS), {Exported.INPUT: batch})[0]
    module = torch.jit.load(str(path), map_location="cpu")

    @torch.inference_mode()
    def answer(batch: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(batch))[0].numpy()

    return answer


def parity(fmt: str, path: Path, images: np.ndarray, reference: np.ndarray, batch_size: int):
    """Largest |probability difference| of the exported graph at ``path`` from ``reference``
    (the torch module's per-view probabilities of ``images``)."""
    answer = _runner(fmt, path)
    found = np.hstack(
        [
            answer(np.ascontiguousarray(images[start : start + batch_size])[:, None])
            for start in range(0, len(images), batch_size)
        ]
    )
    return float(np.abs(found - reference).max())


def export_folder(
    folder: Path,
    images: np.ndarray,
    formats: list[str] | tuple[str, ...] = FORMATS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Write each of ``formats`` of the model ``folder``'s graph into it, check each on
    ``images`` (N, size, size) uint8 against the torch module, and record them in the
    folder's inference settings. Returns each format's largest |probability difference|
    from torch (a measurement, kept out of the settings: another CPU gives other last bits).
    A graph that differs by more than :data:`PARITY_TOLERANCE` is an error and is not kept."""
    graph, size = folder_graph(folder)
    reference, _ = run(graph, images, batch_size=batch_size)
    writers = {"onnx": (onnx_bytes, Exported.ONNX, f"opset {OPSET}")}
    writers["torchscript"] = (torchscript_bytes, Exported.TORCHSCRIPT, f"torch {torch.__version__}")
    exported, differences = {}, {}
    for fmt in formats:
        write, name, version = writers[fmt]
        path = folder / name
        write_bytes_atomic(path, write(graph, size))
        difference = parity(fmt, path, images, reference, batch_size)
        log.info("%s: %s, max |Δp| %.2g on %d images", folder.name, name, difference, len(images))
        if not difference <= PARITY_TOLERANCE:
            path.unlink()
            raise ExportError(
                f"the {fmt} graph of {folder.name} answers up to {difference:.3g} away from "
                f"torch (tolerance {PARITY_TOLERANCE:g}): not written. Report it with your "
                f"torch and onnxruntime versions"
            )
        exported[fmt] = Exported(file=name, sha256=sha256_of(path), version=version)
        differences[fmt] = difference
    for fmt in set(FORMATS) - set(formats):  # a format no longer asked for goes
        (folder / writers[fmt][1]).unlink(missing_ok=True)
    InferenceSettings.read(folder).model_copy(update={"exports": exported}).write(folder)
    return differences
