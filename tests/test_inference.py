"""pneumo.core.graph's TTA views, pneumo.core.inference/runtime: model folders (integrity,
copies, devices) and streaming."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pneumo.core.export import PARITY_TOLERANCE
from pneumo.core.graph import TTAViews, tta_probabilities
from pneumo.core.inference import TorchClassifier as Classifier
from pneumo.core.runtime import IntegrityError, ModelFolderError
from pneumo.mlops.predict import COLUMNS
from pneumo.records import InferenceSettings, InputGate, Referral
from tests.conftest import (
    answers,
    assert_calibrated_close,
    expected_answers,
    jpeg_bytes,
    run_cli,
    tool_env,
    write_tree,
)


def _symmetric_image() -> torch.Tensor:
    half = torch.randint(0, 256, (1, 1, 16, 8), dtype=torch.uint8)
    return torch.cat([half, half.flip(-1)], dim=-1)


def _view(spec: str, image: torch.Tensor) -> torch.Tensor:
    return TTAViews([spec], image.shape[-1])(image.float())[0]


def test_hflip_of_a_symmetric_image_is_the_image():
    image = _symmetric_image()
    assert torch.equal(_view("hflip", image), image.float())
    asymmetric = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    assert torch.equal(_view("hflip", asymmetric), asymmetric.flip(-1).float())


def test_identity_zero_rotation_and_unit_scale_change_nothing():
    image = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    for spec in ("identity", "rotate:0", "scale:1.0"):
        torch.testing.assert_close(_view(spec, image), image.float(), atol=1e-4, rtol=0)


def test_rotation_by_ninety_degrees_is_counter_clockwise_and_exact():
    image = torch.arange(25, dtype=torch.uint8).view(1, 1, 5, 5)
    expected = torch.rot90(image, 1, dims=(-2, -1)).float()
    torch.testing.assert_close(_view("rotate:90", image), expected, atol=1e-4, rtol=0)


def test_rotation_matches_torchvisions_in_float():
    """The grid is torchvision's rotation (same direction, centre and interpolation)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    image = torch.randint(0, 256, (2, 1, 24, 24)).float()
    for degrees in (-15.0, 10.0):
        theirs = F.rotate(image, degrees, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(_view(f"rotate:{degrees}", image), theirs, atol=1e-2, rtol=0)


def test_scale_zooms_about_the_centre():
    image = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    image[..., 4, 4] = 255
    zoomed = _view("scale:2.0", image)
    assert zoomed[..., 4, 4].item() == 255 and zoomed.sum() > image.sum()


class MeanBrightness(nn.Module):
    """Logit = mean of the left half minus mean of the right half (flip-sensitive); the
    difference is also the "feature" its one-unit head passes on."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.fc = nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255
        half = x.shape[-1] // 2
        difference = x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3))
        return self.backbone.fc(difference[:, None] * 4).squeeze(1)


def test_tta_probabilities_average_views_per_image():
    images = np.zeros((3, 8, 8), np.uint8)
    images[:, :, :4] = 255  # bright left half
    per_view = tta_probabilities(MeanBrightness(), images, ["identity", "hflip"], batch_size=2)
    assert per_view.shape == (2, 3)
    assert per_view[0] == pytest.approx(1 / (1 + np.exp(-4)))
    assert per_view[1] == pytest.approx(1 / (1 + np.exp(4)))
    assert per_view.mean(axis=0) == pytest.approx(0.5)


def _test_images(project, count: int) -> pd.DataFrame:
    """The first ``count`` test images with the probabilities evaluate gave them."""
    predictions = pd.read_csv(project / "reports/eval/resnet50/predictions.csv").head(count)
    predictions["file"] = [str(project / "data/raw" / image) for image in predictions.image]
    return predictions


def _pneumo(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumo", *args],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("runtime", "tolerance"),
    [("torch", 1e-6), ("onnx", PARITY_TOLERANCE)],  # auto picks onnx: the folder has the graph
)
def test_a_copied_model_folder_predicts_what_evaluate_did(
    tiny_project, tmp_path, runtime, tolerance
):
    """Copied out of the repository, run from a folder without params.yaml, in a new process:
    torch gives evaluate's numbers, ONNX Runtime the same within the export's tolerance, and
    both the same answers."""
    copy = tmp_path / "x"
    shutil.copytree(tiny_project / "models/resnet50", copy)
    expected = _test_images(tiny_project, 12)
    args = ["predict", "--model", str(copy), "--runtime", runtime, *expected.file]
    result = _pneumo(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    predicted = pd.read_csv(StringIO(result.stdout))
    assert list(predicted.file) == list(expected.file)
    assert_calibrated_close(copy, predicted.probability, expected, tolerance)
    assert answers(predicted.label) == expected_answers(expected)


def test_weights_changed_after_evaluation_are_refused(tiny_project, tmp_path):
    copy = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "x")
    weights = bytearray((copy / "model.pt").read_bytes())
    weights[-100] ^= 0xFF  # one flipped byte inside the tensor data
    (copy / "model.pt").write_bytes(bytes(weights))
    with pytest.raises(IntegrityError, match="SHA-256 .* but inference.json recorded"):
        Classifier.load(copy)
    image = _test_images(tiny_project, 1).file[0]
    # torch reads the weights (ONNX Runtime reads the graph, checked in test_export.py)
    result = _pneumo("predict", "--model", str(copy), "--runtime", "torch", image, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "refusing to load it" in result.stderr


def test_a_gate_file_changed_after_evaluation_is_refused(tiny_project, tmp_path):
    copy = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "x")
    gate_file = copy / InputGate.FILE
    data = bytearray(gate_file.read_bytes())
    data[-100] ^= 0xFF
    gate_file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="gate.npz has SHA-256 .* but inference.json"):
        Classifier.load(copy)


def test_inputs_unlike_the_training_images_get_no_label_unless_allowed(tiny_project, in_tmp):
    """Noise is flagged by the tiny model's real gate; the test images mostly pass it."""
    files = write_tree(in_tmp, {"noise.jpeg": jpeg_bytes(0)})  # uniform noise
    model = str(tiny_project / "models/resnet50")
    result = run_cli("predict", "--model", model, "--output", "json", str(files / "noise.jpeg"))
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["in_distribution"] is False and row["label"] is None
    assert "not a chest radiograph" in row["reason"] and row["gate_score"] > 1
    allowed = run_cli("predict", "--model", model, "--allow-ood", "--output", "json",
                      str(files / "noise.jpeg"))  # fmt: skip
    [labelled] = json.loads(allowed.stdout)
    assert labelled["in_distribution"] is False and labelled["label"] in (
        "NORMAL",
        "PNEUMONIA",
        "REFER",
    )

    # the test images: as evaluate's gate scores said (8 validation images put the tiny
    # model's cuts low: a few test images are flagged too)
    expected = _test_images(tiny_project, 40)
    rows = pd.read_csv(StringIO(run_cli("predict", "--model", model, *expected.file).stdout))
    assert list(rows.in_distribution) == list(expected.in_distribution)
    assert rows.in_distribution.mean() >= 0.75
    assert rows.label.isna().sum() == (~rows.in_distribution).sum()


def test_weights_other_than_the_registered_ones_are_refused(tiny_project):
    with pytest.raises(IntegrityError, match="the registration recorded 0000000000000000"):
        Classifier.load(tiny_project / "models/resnet50", expected={"weights": "0" * 64})


def test_a_checkpoint_without_inference_settings_is_not_a_model_folder(tiny_project):
    with pytest.raises(ModelFolderError, match="needs meta.json, inference.json and model.pt"):
        Classifier.load(tiny_project / "checkpoints/resnet50")


def test_a_device_that_is_not_there_is_a_one_line_error(tiny_project, in_tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    image = write_tree(in_tmp, {"scan.jpeg": jpeg_bytes(1)}) / "scan.jpeg"
    model = str(tiny_project / "models/resnet50")
    result = run_cli("predict", "--model", model, "--device", "cuda", str(image))
    assert result.exit_code == 1
    assert result.output == "Error: device is 'cuda' but no CUDA device is visible\n"


def test_files_stream_through_in_bounded_batches(tiny_project, monkeypatch):
    classifier = Classifier.load(tiny_project / "models/resnet50")
    files = list(_test_images(tiny_project, 40).file) * 2
    batches: list[int] = []
    real = Classifier.assess
    monkeypatch.setattr(
        Classifier,
        "assess",
        lambda self, pixels, **kw: batches.append(len(pixels)) or real(self, pixels, **kw),
    )
    rows = classifier.predict_files([Path(f) for f in files], batch_size=32)
    first = next(rows)
    assert batches == [32]  # rows come out before later files are even read
    assert [first["file"], *(row["file"] for row in rows)] == files
    assert batches == [32, 32, 16]


def test_predicting_with_a_model_folder_does_not_import_mlflow(tiny_project, tmp_path):
    image = _test_images(tiny_project, 1).file[0]
    code = (
        "import sys\nfrom pneumo.cli import main\n"
        f"main(['predict', '--model', {str(tiny_project / 'models/resnet50')!r}, {image!r}], "
        "standalone_mode=False)\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=tool_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(",".join(COLUMNS) + "\n")


def test_predict_explain_writes_one_grad_cam_figure_per_image(tiny_project, in_tmp):
    images = _test_images(tiny_project, 3).file.tolist()
    corrupt = write_tree(in_tmp, {"corrupt.jpeg": b"not an image"}) / "corrupt.jpeg"
    model = str(tiny_project / "models/resnet50")
    result = run_cli("predict", "--model", model, "--explain", "cams", *images, str(corrupt))
    assert result.exit_code == 1  # the corrupt file, reported in its row
    rows = pd.read_csv(StringIO(result.stdout))
    figures = [Path(f) for f in rows.explanation.dropna()]
    assert [f.name for f in figures] == [Path(i).stem + ".png" for i in images]
    assert all(f.stat().st_size > 10_000 for f in figures)
    assert pd.isna(rows.explanation.iloc[-1]) and isinstance(rows.error.iloc[-1], str)


def test_an_image_in_the_referral_band_is_answered_refer(tiny_project, in_tmp, monkeypatch):
    """A folder whose band holds every probability answers REFER in CSV and JSON, and the
    Grad-CAM title says so; the same images outside the band get their labels."""
    from pneumo.core import explain

    folder = shutil.copytree(tiny_project / "models/resnet50", in_tmp / "model")
    settings = InferenceSettings.read(folder)
    images = _test_images(tiny_project, 3).file.tolist()
    everything = Referral(rule="test", low=0.0, high=1.5)
    settings.model_copy(update={"referral": everything}).write(folder)
    titles = []
    drawn = explain.explanation_png
    monkeypatch.setattr(
        explain,
        "explanation_png",
        lambda pixels, cam, p, label, path: (
            titles.append(label) or drawn(pixels, cam, p, label, path)
        ),
    )
    result = run_cli("predict", "--model", str(folder), "--explain", "cams", *images)
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(StringIO(result.stdout)).label) == ["REFER"] * 3
    assert titles == ["REFER: in the referral band [0.000, 1.500)"] * 3
    result = run_cli("predict", "--model", str(folder), "--output", "json", images[0])
    assert json.loads(result.stdout)[0]["label"] == "REFER"

    empty = Referral(rule="none", low=settings.threshold, high=settings.threshold)
    settings.model_copy(update={"referral": empty}).write(folder)
    result = run_cli("predict", "--model", str(folder), *images)
    assert "REFER" not in set(pd.read_csv(StringIO(result.stdout)).label)
