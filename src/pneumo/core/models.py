"""Backbones built by name, each with a one-logit PNEUMONIA head.

Every model takes the cache's pixels as they are, a ``(N, 1, H, W)`` uint8 (or float in
0..255) batch, and adapts them itself: scale to 0..1, repeat the gray channel three times and
normalise. The adaptation lives in the model so that training, evaluation, ``pneumo predict``
and the registered pyfunc model cannot disagree about it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from pneumo.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Without pretrained weights there are no ImageNet statistics to match; centre 0..1 instead.
PLAIN_MEAN = (0.5, 0.5, 0.5)
PLAIN_STD = (0.25, 0.25, 0.25)


class WeightsUnavailableError(UserError):
    """Pretrained weights are neither cached nor downloadable."""


class GrayToBackboneInput(nn.Module):
    """uint8 gray pixels → normalised 3-channel floats."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class PneumoniaNet(nn.Module):
    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.adapt = GrayToBackboneInput(mean, std)
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of PNEUMONIA, shape (N,)."""
        return self.backbone(self.adapt(pixels)).squeeze(1)


def normalisation(pretrained: bool) -> dict[str, tuple[float, ...]]:
    return {
        "mean": IMAGENET_MEAN if pretrained else PLAIN_MEAN,
        "std": IMAGENET_STD if pretrained else PLAIN_STD,
    }


def _checkpoint_folder() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_weights(url: str, load: Callable[[], nn.Module]) -> nn.Module:
    """Run a library's own weight loading, turning a failed download into a clear error."""
    filename = url.rsplit("/", 1)[-1]
    try:
        return load()
    except (URLError, OSError, RuntimeError) as exc:
        if (_checkpoint_folder() / filename).is_file():
            raise
        raise WeightsUnavailableError(
            f"pretrained weights {filename} are not cached and could not be downloaded "
            f"({type(exc).__name__}). Put {filename} into {_checkpoint_folder()} (set "
            "TORCH_HOME to move it), or set model.pretrained: false"
        ) from exc


def _linear_head(features: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, 1))


def _densenet121(pretrained: bool, dropout: float, hidden: int) -> nn.Module:
    from torchvision.models import DenseNet121_Weights, densenet121

    weights = DenseNet121_Weights.IMAGENET1K_V1
    model = (
        _load_weights(weights.url, lambda: densenet121(weights=weights))
        if pretrained
        else densenet121()
    )
    model.classifier = _linear_head(model.classifier.in_features, dropout)
    return model


def _resnet50(pretrained: bool, dropout: float, hidden: int) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    weights = ResNet50_Weights.IMAGENET1K_V2
    model = (
        _load_weights(weights.url, lambda: resnet50(weights=weights)) if pretrained else resnet50()
    )
    model.fc = _linear_head(model.fc.in_features, dropout)
    return model


def _he_init(model: nn.Module) -> None:
    """Initialise a from-scratch EfficientNet as torchvision initialises its own EfficientNet
    and ResNet (He normal, fan out, for convolutions). efficientnet-pytorch leaves PyTorch's
    default, whose activations shrink from block to block: on the generated sample B4 then
    stayed near chance for three epochs (test AUC 0.50-0.62) where ResNet50 learned."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.out_features**0.5
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def _efficientnet(variant: str) -> Callable[[bool, float, int], nn.Module]:
    def build(pretrained: bool, dropout: float, hidden: int) -> nn.Module:
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import url_map

        # The library keeps TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): running
        # statistics then lag far behind a short fine-tune or from-scratch run, and eval-mode
        # outputs collapse to a constant. Use PyTorch's usual 0.1 like the other backbones.
        # Its own dropout before the classifier (0.4 for B4) is off: the recipe's head below
        # has its dropout, and two in a row only slow learning.
        options = {"batch_norm_momentum": 0.9, "dropout_rate": 0.0}
        if pretrained:
            model = _load_weights(
                url_map[variant],
                lambda: EfficientNet.from_pretrained(variant, num_classes=1000, **options),
            )
        else:
            model = EfficientNet.from_name(variant, **options)
            _he_init(model)
        # The recipe's head: features -> hidden -> 1 with dropout, replacing the 1000-way FC.
        model._fc = nn.Sequential(
            nn.Linear(model._fc.in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        return model

    return build


BUILDERS: dict[str, Callable[[bool, float, int], nn.Module]] = {
    "densenet121": _densenet121,
    "resnet50": _resnet50,
    **{f"efficientnet-b{i}": _efficientnet(f"efficientnet-b{i}") for i in range(8)},
}


def build_model(
    name: str, *, pretrained: bool = False, dropout: float = 0.5, hidden_size: int = 512
) -> PneumoniaNet:
    if name not in BUILDERS:
        raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BUILDERS)}")
    backbone = BUILDERS[name](pretrained, dropout, hidden_size)
    norm = normalisation(pretrained)
    return PneumoniaNet(backbone, norm["mean"], norm["std"])
