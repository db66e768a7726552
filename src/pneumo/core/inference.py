"""Answering from a model folder with torch: the network and its test-time views in one
module (:class:`pneumo.core.graph.InferenceGraph`), the folder's checks and decision from
:mod:`pneumo.core.runtime`.

evaluate, ``pneumo predict --runtime torch`` and the registered MLflow model go through this
module, so a folder copied anywhere predicts exactly as it was evaluated. It imports no stage
module and not MLflow: the registered model ships it with the few modules it needs
(:data:`SHIPPED_MODULES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumo.core import gate
from pneumo.core.devices import resolve_device
from pneumo.core.graph import InferenceGraph, run
from pneumo.core.models import PneumoniaNet, build_model
from pneumo.core.runtime import Classifier, verified_settings
from pneumo.records import ModelCard

# What a model needs at run time, relative to the package: the registered model ships these
# (tests/test_serving.py checks that loading and predicting imports no other pneumo module).
SHIPPED_MODULES = (
    "__init__.py", "errors.py", "files.py", "records.py", "specs.py", "core/__init__.py",
    "core/calibration.py", "core/devices.py", "core/gate.py", "core/graph.py",
    "core/images.py", "core/inference.py", "core/models.py", "core/runtime.py",
)  # fmt: skip

# The model folder's name among a registered model's MLflow artifacts.
MODEL_ARTIFACT = "model"


def load_network(folder: Path) -> tuple[PneumoniaNet, ModelCard]:
    """The network of a checkpoint or model folder (eval mode, CPU) and its card.

    The weights are a plain state dict read with ``weights_only=True``: loading them runs no
    pickled code.
    """
    card = ModelCard.read(folder)
    model_params = card.params["model"]
    # Built without memory and without initialising weights the checkpoint replaces anyway
    # (1.4 s of a ResNet50's cold start on 2 cores), then given the checkpoint's tensors.
    with torch.device("meta"):
        net = build_model(
            card.backbone,
            pretrained=False,  # the checkpoint holds all weights; never download here
            dropout=model_params["dropout"],
            hidden_size=model_params["hidden_size"],
        )
    state = torch.load(ModelCard.weights(folder), map_location="cpu", weights_only=True)
    net.load_state_dict(state, assign=True)
    return net.eval(), card


@dataclass(frozen=True)
class TorchClassifier(Classifier):
    """A model folder answered by its network in torch, on any device."""

    graph: InferenceGraph | None = None
    device: torch.device = torch.device("cpu")
    runtime: str = field(default="torch", init=False)

    @classmethod
    def load(
        cls, folder: Path, device: str = "cpu", *, expected: dict[str, str | None] | None = None
    ) -> TorchClassifier:
        """Load ``folder`` after checking its files (:func:`verified_settings`)."""
        settings = verified_settings(folder, expected, reads="torch")
        net, card = load_network(folder)
        target = resolve_device(device, setting="device")
        graph = InferenceGraph(net, settings.tta_views, card.image_size).to(target)
        return cls(card, settings, gate.load(folder), graph, target)

    @property
    def net(self) -> PneumoniaNet:
        return self.graph.net

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def views_and_features(
        self, pixels: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return run(self.graph, pixels, batch_size=batch_size, device=self.device)
