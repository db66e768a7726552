"""pneumo.core.export and the torch-free runtime (pneumo.core.runtime): the exported graph
answers as torch does, is hash-checked, and runs where torch is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumo.core import export
from pneumo.core.export import PARITY_TOLERANCE, export_folder, parity_images
from pneumo.core.inference import TorchClassifier
from pneumo.core.runtime import IntegrityError, ModelFolderError, OnnxClassifier, load_classifier
from pneumo.records import Exported, InferenceSettings
from tests.conftest import (
    answers,
    assert_calibrated_close,
    copy_repository,
    expected_answers,
    run_cli,
    tool_env,
)


def _test_split(project: Path) -> np.ndarray:
    return np.load(project / "data/processed/test_images.npy")


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet-b0"])
def test_onnx_answers_the_test_split_as_torch_does(tiny_project, backbone):
    """Evaluate exported the folder: through ONNX Runtime the test split's calibrated
    probabilities lie within the tolerance of torch's, with the same answers."""
    folder = tiny_project / "models" / backbone
    assert set(InferenceSettings.read(folder).exports) == {"onnx"}
    pixels = _test_split(tiny_project)
    torch_side, onnx_side = TorchClassifier.load(folder), OnnxClassifier.load(folder)
    # The fp32 contract is on the graph's output; a steep isotonic step of the calibration map
    # can magnify it (1.8e-5 became 1.8e-4 under AVX2 kernels), so calibrated answers are
    # compared by their labels.
    raw_torch, _ = torch_side.views_and_features(pixels, 64)
    raw_onnx, _ = onnx_side.views_and_features(pixels, 64)
    assert np.abs(raw_onnx - raw_torch).max() <= PARITY_TOLERANCE
    p_torch, gate_torch = torch_side.assess(pixels)
    p_onnx, gate_onnx = onnx_side.assess(pixels)
    np.testing.assert_allclose(gate_onnx, gate_torch, rtol=1e-3, atol=1e-4)
    decide = [
        [side.decide(float(p), float(g))["label"] for p, g in zip(probs, gates, strict=True)]
        for side, probs, gates in (
            (torch_side, p_torch, gate_torch),
            (onnx_side, p_onnx, gate_onnx),
        )
    ]
    assert decide[0] == decide[1]
    recorded = json.loads((tiny_project / f"reports/eval/{backbone}/metrics.json").read_text())
    assert recorded["exports"]["onnx"]["test_max_abs_diff_from_torch"] <= PARITY_TOLERANCE


def test_rotated_and_scaled_views_export_with_parity(tiny_project, tmp_path):
    """The rotate and scale views are sampling grids in the graph: ONNX gives torch's views."""
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "m")
    settings = InferenceSettings.read(folder)
    views = ["identity", "hflip", "rotate:-12", "scale:1.15"]
    settings.model_copy(update={"tta_views": views}).write(folder)
    parity = export_folder(folder, parity_images(settings_size(folder)), ["onnx"])
    assert parity["onnx"] <= PARITY_TOLERANCE
    pixels = _test_split(tiny_project)[:20]
    per_view_torch, feats_torch = TorchClassifier.load(folder).views_and_features(pixels, 8)
    per_view_onnx, feats_onnx = OnnxClassifier.load(folder).views_and_features(pixels, 8)
    assert per_view_onnx.shape == (4, 20)
    assert np.abs(per_view_onnx - per_view_torch).max() <= PARITY_TOLERANCE
    # pooled ReLU features of 0-6: other kernels' float32 sums move them by up to 2e-4
    np.testing.assert_allclose(feats_onnx, feats_torch, rtol=1e-3, atol=1e-3)


def settings_size(folder: Path) -> int:
    return json.loads((folder / "meta.json").read_text())["image_size"]


def test_a_graph_that_disagrees_with_torch_is_not_kept(tiny_project, tmp_path, monkeypatch):
    """The folder keeps the graph it had, usable, and its settings as they were."""
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "m")
    before, graph = InferenceSettings.read(folder), (folder / Exported.ONNX).read_bytes()
    monkeypatch.setattr(export, "parity", lambda *args: (0.01, 0.0))
    with pytest.raises(export.ExportError, match="answers up to 0.01 away from torch"):
        export_folder(folder, parity_images(settings_size(folder), count=4), ["onnx"])
    assert (folder / Exported.ONNX).read_bytes() == graph
    assert InferenceSettings.read(folder) == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert OnnxClassifier.load(folder).runtime == "onnx"
    monkeypatch.setattr(export, "parity", lambda *args: (0.0, 0.5))  # features far off
    with pytest.raises(export.ExportError, match="features 0.5"):
        export_folder(folder, parity_images(settings_size(folder), count=4), ["onnx"])


def test_an_onnx_file_changed_after_export_is_refused(tiny_project, tmp_path):
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "m")
    graph = bytearray((folder / Exported.ONNX).read_bytes())
    graph[-200] ^= 0xFF
    (folder / Exported.ONNX).write_bytes(bytes(graph))
    for runtime in ("onnx", "auto"):
        with pytest.raises(IntegrityError, match="model.onnx has SHA-256 .* but inference.json"):
            load_classifier(folder, runtime)
    assert load_classifier(folder, "torch").runtime == "torch"  # checks what it reads


def test_a_folder_with_its_graph_alone_answers_through_onnx(tiny_project, tmp_path):
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "m")
    (folder / "model.pt").unlink()
    assert load_classifier(folder, "onnx").runtime == "onnx"
    with pytest.raises(ModelFolderError, match="model.pt is missing"):
        load_classifier(folder, "torch")


def test_a_folder_from_before_the_export_says_to_rebuild_it(tiny_project, tmp_path):
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "m")
    (folder / "gate.npz").rename(folder / "gate.pt")
    for runtime in ("onnx", "torch"):
        with pytest.raises(ModelFolderError, match="made by an earlier pneumo .* `dvc repro`"):
            load_classifier(folder, runtime)


def test_an_onnx_file_other_than_the_registered_one_is_refused(tiny_project):
    folder = tiny_project / "models/resnet50"
    with pytest.raises(IntegrityError, match="model.onnx .* the registration recorded 00000000"):
        load_classifier(folder, "onnx", expected={"onnx": "0" * 64})


def test_a_folder_without_a_graph_says_how_to_export_it(tiny_project, tmp_path):
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "old")
    settings = InferenceSettings.read(folder)
    settings.model_copy(update={"exports": {}}).write(folder)
    (folder / Exported.ONNX).unlink()
    with pytest.raises(ModelFolderError, match=f"run `pneumo export {folder}`"):
        OnnxClassifier.load(folder)
    assert load_classifier(folder, "auto").runtime == "torch"  # auto falls back


def test_auto_takes_torch_where_onnxruntime_cannot_run_it(tiny_project, monkeypatch):
    from pneumo.core import runtime

    folder = tiny_project / "models/resnet50"
    assert load_classifier(folder, "auto").runtime == "onnx"
    if not runtime._onnx_has_cuda():  # onnxruntime, not onnxruntime-gpu
        with pytest.raises(ModelFolderError, match="onnxruntime runs on the CPU only"):
            load_classifier(folder, "onnx", "cuda")
    monkeypatch.setattr(runtime, "find_spec", lambda name: None)  # not installed
    assert load_classifier(folder, "auto").runtime == "torch"


def test_pneumo_export_writes_both_formats_into_an_older_folder(tiny_project, tmp_path):
    folder = shutil.copytree(tiny_project / "models/resnet50", tmp_path / "old")
    settings = InferenceSettings.read(folder)
    settings.model_copy(update={"exports": {}}).write(folder)
    (folder / Exported.ONNX).unlink()
    result = run_cli("export", str(folder), "--format", "onnx", "--format", "torchscript")
    assert result.exit_code == 0, result.output
    assert "model.onnx: onnx (opset 18), max |Δp| from torch" in result.output
    exports = InferenceSettings.read(folder).exports
    assert set(exports) == {"onnx", "torchscript"}
    pixels = _test_split(tiny_project)[:10]
    assert run_cli("export", str(folder), "--format", "torchscript").exit_code == 0
    assert set(InferenceSettings.read(folder).exports) == {"onnx", "torchscript"}  # kept
    traced = torch.jit.load(str(folder / Exported.TORCHSCRIPT))
    with torch.inference_mode():
        per_view = traced(torch.from_numpy(pixels)[:, None])[0].double().numpy()
    expected, _ = TorchClassifier.load(folder).views_and_features(pixels, 16)
    assert np.abs(per_view - expected).max() <= PARITY_TOLERANCE


def test_predict_with_onnx_imports_no_torch(tiny_project, tmp_path):
    """The ONNX path of `pneumo predict` never imports torch (nor MLflow): it starts fast."""
    image = pd.read_csv(tiny_project / "reports/eval/resnet50/predictions.csv").image[0]
    script = (
        "import sys\n"
        "from pneumo.cli import main\n"
        "try:\n"
        f"    main(['predict', '--model', {str(tiny_project / 'models/resnet50')!r}, "
        f"'--runtime', 'onnx', {str(tiny_project / 'data/raw' / image)!r}])\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'pandas', 'sklearn') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "imported: []"


@pytest.mark.slow
@pytest.mark.scenario
def test_the_runtime_extra_installs_without_torch_and_answers_as_evaluate(tiny_project, tmp_path):
    """A venv with `pip install pneumo[runtime]` only: no torch in it, `pneumo predict` gives
    evaluate's probabilities within the export tolerance and the same answers, and a pipeline
    command says which extra it needs."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    source = copy_repository(tmp_path / "source")  # pip builds in the source tree (build/)
    install = subprocess.run(
        [bin_dir / "pip", "install", "--quiet", "--progress-bar", "off", f"{source}[runtime]"],
        capture_output=True, text=True, cwd=tmp_path, env=tool_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    installed = subprocess.run(
        [bin_dir / "python", "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {package["name"].lower() for package in json.loads(installed)}
    assert "onnxruntime" in names and not names & {"torch", "torchvision", "mlflow", "dvc"}

    expected = pd.read_csv(tiny_project / "reports/eval/resnet50/predictions.csv").head(8)
    files = [str(tiny_project / "data/raw" / image) for image in expected.image]
    model = str(tiny_project / "models/resnet50")
    env = tool_env() | {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(
        [bin_dir / "pneumo", "predict", "--model", model, *files],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    predicted = pd.read_csv(StringIO(result.stdout))
    assert_calibrated_close(Path(model), predicted.probability, expected, PARITY_TOLERANCE)
    assert answers(predicted.label) == expected_answers(expected)

    needs = subprocess.run(
        [bin_dir / "pneumo", "predict", "--model", model, "--runtime", "torch", files[0]],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert needs.returncode == 1
    assert "needs torch, which is not installed: pip install 'pneumo[pipeline]'" in needs.stderr
    exported = subprocess.run(
        [bin_dir / "pneumo", "export", model], capture_output=True, text=True, env=env
    )
    assert exported.returncode == 1 and "Traceback" not in exported.stderr
    assert "needs torch, which is not installed" in exported.stderr
