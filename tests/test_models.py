"""Backbone registry, heads, input adaptation and pretrained-weight loading."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn

from pneumo.config import BACKBONES
from pneumo.core.models import (
    BUILDERS,
    IMAGENET_MEAN,
    WeightsUnavailableError,
    build_model,
)
from pneumo.errors import UserError


@pytest.mark.parametrize("name", ["densenet121", "resnet50", "efficientnet-b0", "efficientnet-b4"])
def test_each_backbone_gives_one_logit_per_uint8_image(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    pixels = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(pixels)
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_heads_follow_the_recipe():
    resnet = build_model("resnet50", dropout=0.3)
    assert isinstance(resnet.backbone.fc[0], nn.Dropout) and resnet.backbone.fc[0].p == 0.3
    assert resnet.backbone.fc[1].out_features == 1
    effnet = build_model("efficientnet-b4", hidden_size=256)
    layers = list(effnet.backbone._fc)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert layers[0].in_features == 1792 and layers[0].out_features == 256
    assert layers[2].p == 0.5 and layers[3].out_features == 1


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(UserError, match="resnet18.*densenet121"):
        build_model("resnet18")
    assert set(BUILDERS) == set(BACKBONES)  # every name params.yaml accepts can be built


def test_gray_input_is_repeated_and_normalised():
    model = build_model("resnet50", pretrained=False)
    model.adapt.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
    model.adapt.std.fill_(255.0)
    x = model.adapt(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx([1 - m for m in IMAGENET_MEAN])


@pytest.mark.parametrize(
    ("name", "filename"),
    [
        ("resnet50", "resnet50-11ad3fa6.pth"),
        ("densenet121", "densenet121-a639ec97.pth"),
        ("efficientnet-b0", "efficientnet-b0-355c32eb.pth"),
    ],
)
def test_pretrained_weights_load_from_the_torch_hub_cache(name, filename, tmp_path, monkeypatch):
    """A state dict placed where the library looks is loaded, with no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = build_model(name, pretrained=False)
    backbone_state = reference.backbone.state_dict()
    # The cache file holds the library's original 1000-class model; our head replaces it.
    original = {
        k: v for k, v in backbone_state.items() if not k.startswith(("fc.", "classifier.", "_fc."))
    }
    for key, shape in {"fc": (1000, 2048), "classifier": (1000, 1024), "_fc": (1000, 1280)}.items():
        if any(k.startswith(f"{key}.") for k in backbone_state):
            original[f"{key}.weight"] = torch.full(shape, 0.01)
            original[f"{key}.bias"] = torch.zeros(shape[0])
    folder = Path(tmp_path) / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(original, folder / filename)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = build_model(name, pretrained=True)
    first_conv = next(k for k in original if k.endswith("weight") and original[k].dim() == 4)
    assert torch.equal(model.backbone.state_dict()[first_conv], original[first_conv])
    assert model.adapt.mean[0, 0, 0, 0].item() == pytest.approx(IMAGENET_MEAN[0] * 255)


def test_missing_pretrained_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        build_model("resnet50", pretrained=True)
    message = str(error.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "model.pretrained: false" in message
