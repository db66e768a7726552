"""Grad-CAM heatmaps: which part of a radiograph raised the PNEUMONIA logit.

:func:`target_layer` picks, per backbone and image size, the convolutional stage to attribute
to; :func:`grad_cam` computes captum's ``LayerGradCam`` there and brings the map to the image's
size; :func:`explanation_png` draws the image beside its heatmap for people to look at.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from pneumo.core.models import PneumoniaNet
from pneumo.figures import png_figure

# Grad-CAM is sharpest in meaning on the deepest stage and coarsest in space there: at the
# small sizes this pipeline trains at (48 px by default) the last stages are 3x3, 2x2 or 1x1,
# where the middle cell straddles both lungs and a 1x1 map cannot point anywhere at all. A 6x6
# map still gives each lung two or three columns and each lung field three rows, and 6 rather
# than 7 lets 48 px use the 6x6 stage instead of falling back to the 12x12 one, which is
# two stages shallower; at 224 px the standard 7x7 last stage is kept either way. At 48 px
# this is ResNet layer2, DenseNet denseblock2 and the end of EfficientNet's third stage.
MIN_SIDE = 6


def _candidate_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages that may be attributed to, shallow to deep, named as in it."""
    from efficientnet_pytorch import EfficientNet
    from torchvision.models import DenseNet, ResNet

    if isinstance(backbone, ResNet):
        return [
            (name, getattr(backbone, name)) for name in ("layer1", "layer2", "layer3", "layer4")
        ]
    if isinstance(backbone, DenseNet):
        # A transition layer halves the side and the dense block after it keeps that side, so
        # at any size the block is the deeper choice of the two: only blocks are candidates.
        return [
            (f"features.{name}", module)
            for name, module in backbone.features.named_children()
            if name.startswith("denseblock")
        ]
    if isinstance(backbone, EfficientNet):
        # Every block is a candidate; the deepest one of a given side is the end of a stage,
        # so choosing by side alone lands on stage ends without reading the block arguments.
        blocks = [(f"_blocks.{index}", block) for index, block in enumerate(backbone._blocks)]
        return [*blocks, ("_conv_head", backbone._conv_head)]
    raise TypeError(f"no Grad-CAM target layers known for a {type(backbone).__name__} backbone")


def feature_sides(model: PneumoniaNet, image_size: int) -> list[tuple[str, nn.Module, int]]:
    """Each candidate stage with the side of its feature map for square images of that size.

    Measured by one forward pass with hooks in eval mode (so no batch-norm statistics change),
    rather than derived from strides, which differ in padding and rounding between libraries.
    The model's training mode is restored afterwards.
    """
    candidates = _candidate_layers(model.backbone)
    sides: dict[str, int] = {}

    def record_side(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            sides[name] = min(output.shape[-2:])

        return hook

    hooks = [module.register_forward_hook(record_side(name)) for name, module in candidates]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [(f"backbone.{name}", module, sides[name]) for name, module in candidates]


def target_layer(model: PneumoniaNet, image_size: int) -> tuple[str, nn.Module]:
    """The layer Grad-CAM attributes to, and its name within ``model``.

    The deepest candidate stage (ResNet ``layer1..4``, DenseNet dense blocks, EfficientNet
    blocks and ``_conv_head``) whose feature map is at least ``MIN_SIDE`` on a side at this
    image size. Below about 24 px no stage is that large and the shallowest one, the largest
    map there is, is used.
    """
    stages = feature_sides(model, image_size)
    name, layer, _side = stages[0]
    for stage_name, stage_layer, side in stages:
        if side >= MIN_SIDE:
            name, layer = stage_name, stage_layer
    return name, layer


def grad_cam(model: PneumoniaNet, pixels: np.ndarray, layer: nn.Module) -> np.ndarray:
    """Grad-CAM maps of the PNEUMONIA logit at ``layer`` for a batch of images.

    ``pixels`` is an ``(N, S, S)`` uint8 batch as the cache holds it. Returns ``(N, S, S)``
    float32: captum's ``LayerGradCam`` with negative evidence cut off (ReLU), upsampled
    bilinearly to ``S x S`` and divided by its maximum per image, so 1 marks the strongest
    evidence for PNEUMONIA in that image and 0 none. A map with no positive evidence anywhere
    stays all zero rather than being stretched. The whole batch goes through in one pass, on
    the model's device, also under ``torch.no_grad`` or ``torch.inference_mode``; the model is
    run in eval mode and left as it was, and its parameters' gradients are not touched (captum
    takes gradients with ``torch.autograd.grad``).
    """
    side = pixels.shape[-1]
    device = next(model.parameters()).device
    was_training = model.training
    # Gradients are the method, so switch them on even where a caller runs inference without.
    with torch.inference_mode(False), torch.enable_grad():
        # Made here, not under the caller's inference mode, so autograd may use them; a copy,
        # since prepared pixels are read-only arrays.
        inputs = torch.tensor(pixels, device=device).unsqueeze(1)
        try:
            model.eval()
            # The model returns one logit per image, so no target index is needed.
            cams = LayerGradCam(model, layer).attribute(inputs, relu_attributions=True)
        finally:
            model.train(was_training)
    cams = LayerAttribution.interpolate(cams.detach(), (side, side), interpolate_mode="bilinear")
    cams = cams.squeeze(1)
    peaks = cams.amax(dim=(1, 2), keepdim=True)
    # Dividing an all-zero map by 1 keeps it zero instead of making it NaN.
    return (cams / torch.where(peaks > 0, peaks, 1.0)).cpu().numpy()


# The pointing game's tolerance: 15 px at the 224 px input of Zhang et al. (2016).
POINTING_TOLERANCE = 15 / 224


def within_reach(masks: np.ndarray, tolerance: float) -> np.ndarray:
    """``(N, S, S)`` masks grown by ``tolerance`` pixels (a disk around every pixel)."""
    from scipy.ndimage import binary_dilation

    reach = int(np.floor(tolerance))
    if reach == 0:
        return masks
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disk = dx**2 + dy**2 <= tolerance**2
    return np.stack([binary_dilation(mask, disk) for mask in masks])


def pointing_game(cams: np.ndarray, masks: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """Whether each map's strongest point lies within ``tolerance`` pixels of its image's
    lesion mask: the pointing game of Zhang et al. (2016), per image. ``cams`` and ``masks``
    are ``(N, S, S)``; a map with no positive evidence points at its first pixel."""
    near = within_reach(masks, tolerance)
    peaks = cams.reshape(len(cams), -1).argmax(axis=1)
    return near.reshape(len(near), -1)[np.arange(len(near)), peaks]


def explanation_png(
    pixels: np.ndarray, cam: np.ndarray, probability: float, label: str, path: Path
) -> Path:
    """Write the image and its Grad-CAM overlay side by side as a PNG; returns ``path``.

    ``pixels`` is the prepared ``(S, S)`` uint8 image the model saw and ``cam`` its map in
    0..1 (from :func:`grad_cam`). The title names the predicted ``label`` and the model's
    PNEUMONIA ``probability``. About 900 x 450 px, whatever ``S`` is.
    """
    side_by_side = png_figure(path, 1, 2, figsize=(9, 4.5), layout="constrained", tight=False)
    with side_by_side as (fig, (plain, overlaid)):
        for axis, title in ((plain, "prepared image"), (overlaid, "Grad-CAM")):
            # Nearest-neighbour pixels: the model saw these exact pixels, not a smoothed one.
            axis.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axis.set_title(title)
            axis.set_axis_off()
        heat = overlaid.imshow(cam, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45)
        fig.colorbar(heat, ax=overlaid, fraction=0.046, label="evidence for PNEUMONIA (relative)")
        fig.suptitle(f"{label}, p = {probability:.3f}", fontsize=14)
    return path
