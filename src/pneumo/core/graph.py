"""What a model folder computes, as one torch module: uint8 pixels in; each test-time view's
PNEUMONIA probability and the identity view's pooled features (the input gate's) out.

evaluate, ``pneumo predict --runtime torch`` and the served model run this module, and
:mod:`pneumo.core.export` writes this same module to ONNX and TorchScript, so an exported
graph computes what evaluate measured. Its views are built for that: a rotation or a scale
is one ``grid_sample`` on a sampling grid computed once for the folder's image size (an ONNX
``GridSample`` on a constant), in float, with zeros outside the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pneumo.specs import View


def head_input(model: nn.Module) -> nn.Module:
    """The classification head whose input is the pooled feature vector."""
    backbone = model.backbone
    for name in ("fc", "classifier", "_fc"):  # torchvision ResNet, DenseNet; efficientnet-pytorch
        if hasattr(backbone, name):
            return getattr(backbone, name)
    raise TypeError(f"no known head on {type(backbone).__name__}")


def sampling_grid(view: View, size: int) -> torch.Tensor:
    """The (1, size, size, 2) grid that rotates the image counter-clockwise by ``view.amount``
    degrees about its centre, or zooms it by ``view.amount`` (above 1: in)."""
    angle = math.radians(view.amount) if view.kind == "rotate" else 0.0
    scale = view.amount if view.kind == "scale" else 1.0
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # Each output pixel's position, in [-1, 1] coordinates, maps to the input position it reads.
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float64)
    return F.affine_grid(theta, [1, 1, size, size], align_corners=False).float()


class TTAViews(nn.Module):
    """Test-time views of a (N, 1, size, size) float batch: one tensor per view, in order."""

    def __init__(self, views: list[str], size: int) -> None:
        super().__init__()
        self.views = [View.parse(spec) for spec in views]
        for index, view in enumerate(self.views):
            if view.kind in ("rotate", "scale"):
                self.register_buffer(f"grid{index}", sampling_grid(view, size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for index, view in enumerate(self.views):
            if view.kind == "hflip":
                out.append(x.flip(-1))
            elif view.kind in ("rotate", "scale"):
                grid = getattr(self, f"grid{index}").expand(x.shape[0], -1, -1, -1)
                out.append(F.grid_sample(x, grid, mode="bilinear", align_corners=False))
            else:
                out.append(x)
        return out


class InferenceGraph(nn.Module):
    """A network with its test-time views: (N, 1, size, size) uint8 → probabilities
    (views, N) and the identity view's features (N, D), both float32."""

    def __init__(self, net: nn.Module, views: list[str], size: int) -> None:
        super().__init__()
        self.net = net
        self.views = TTAViews(views, size)
        self._features: torch.Tensor | None = None
        self._hook = head_input(net).register_forward_pre_hook(self._keep_features)

    def _keep_features(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features = inputs[0].flatten(1)

    def close(self) -> None:
        """Detach from the network (which then runs as it did before)."""
        self._hook.remove()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.float()
        probabilities, features = [], None
        for view, viewed in zip(self.views.views, self.views(x), strict=True):
            probabilities.append(torch.sigmoid(self.net(viewed).float()))
            if view.kind == "identity":
                features = self._features
        if features is None:  # no identity among the views: one more pass for the gate
            self.net(x)
            features = self._features
        return torch.stack(probabilities), features.float()


@torch.inference_mode()
def run(
    graph: nn.Module, images: np.ndarray, *, batch_size: int = 64, device="cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-view probabilities (views, N) and identity features (N, D), float64, of
    (N, size, size) uint8 pixels, ``batch_size`` images at a time."""
    graph.eval()
    probabilities, features = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size]))[:, None]
        p, f = graph(batch.to(device))
        probabilities.append(p.cpu().numpy())
        features.append(f.cpu().numpy())
    return np.hstack(probabilities).astype(np.float64), np.vstack(features).astype(np.float64)


def tta_probabilities(
    model: nn.Module, images: np.ndarray, views: list[str], *, batch_size: int = 64, device="cpu"
) -> np.ndarray:
    """PNEUMONIA probabilities of (N, size, size) uint8 pixels, shape (len(views), N)."""
    graph = InferenceGraph(model, views, images.shape[-1]).to(device)
    try:
        return run(graph, images, batch_size=batch_size, device=device)[0]
    finally:
        graph.close()


def features(model: nn.Module, images: np.ndarray, *, batch_size: int = 64, device="cpu"):
    """Pooled features (N, D) of (N, size, size) uint8 pixels, the identity view."""
    graph = InferenceGraph(model, ["identity"], images.shape[-1]).to(device)
    try:
        return run(graph, images, batch_size=batch_size, device=device)[1]
    finally:
        graph.close()
