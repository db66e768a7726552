"""The evaluate stage on the tiny trained project: metrics, threshold, plots, model folder."""

from __future__ import annotations

import json
from io import StringIO

import numpy as np
import pandas as pd
import pytest
import yaml

from pneumo.core import calibration, phantoms
from pneumo.files import sha256_of
from pneumo.records import InferenceSettings, ModelCardDocument
from pneumo.stages.evaluate import pr_panel, roc_panel
from tests.conftest import jpeg_bytes, run_cli, write_tree


def test_evaluate_outputs(tiny_project):
    out = tiny_project / "reports/eval/resnet50"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_rule"] == "youden" and 0 <= metrics["threshold"] <= 1
    for name in ("accuracy", "roc_auc", "recall", "specificity", "brier", "average_precision"):
        value = metrics["test"][name]
        assert value["ci_low"] <= value["value"] <= value["ci_high"], name
    assert set(metrics["tta_gain"]) == {"accuracy", "roc_auc", "f1"}
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == [
        "image",
        "patient",
        "label",
        "target",
        "probability",
        "predicted",
        "referred",
        "p_identity",
        "p_hflip",
        "subtype",
        "size_band",
        "gate_score",
        "in_distribution",
    ]
    assert len(predictions) == metrics["n_test"]
    # the mean of the views through the calibration map the model folder keeps
    mapping = InferenceSettings.read(tiny_project / "models/resnet50").calibration
    assert mapping.method == metrics["calibration"]["method"]
    raw = predictions[["p_identity", "p_hflip"]].mean(1).to_numpy()
    assert np.allclose(predictions.probability, calibration.apply(mapping, raw))
    for when in ("before", "after"):
        ece = metrics["calibration"][f"test_{when}"]["ece"]
        assert ece["ci_low"] <= ece["value"] <= ece["ci_high"]
    # the band the folder keeps, holding the threshold, and what it did on test
    band = InferenceSettings.read(tiny_project / "models/resnet50").referral
    assert (band.rule, band.low, band.high) == tuple(
        metrics["referral"][k] for k in ("rule", "low", "high")
    )
    assert band.low <= metrics["threshold"] <= band.high
    assert list(predictions.referred) == list(band.refers(predictions.probability))
    coverage = metrics["referral"]["test"]["coverage"]
    assert coverage["value"] == pytest.approx(1 - predictions.referred.mean())
    assert metrics["referral"]["test"]["n_referred"] == predictions.referred.sum()
    # the generated sample names its PNEUMONIA images bacterial or viral, all of one size
    found = metrics["subgroups"]
    positives = predictions[predictions.target == 1]
    assert set(positives.subtype) == set(found["subtype"]) == {"bacterial", "viral"}
    for name, group in found["subtype"].items():
        hits = positives[positives.subtype == name].predicted == "PNEUMONIA"
        assert group["n_pneumonia"] == len(hits)
        assert group["recall"]["value"] == pytest.approx(hits.mean())
    assert list(found["size_band"]) == ["all sizes"]
    # the input gate: fitted on train, cut on validation, measured on test and shifted inputs
    settings = InferenceSettings.read(tiny_project / "models/resnet50")
    assert settings.gate.sha256 == sha256_of(tiny_project / "models/resnet50/gate.npz")
    assert settings.gate.threshold == metrics["gate"]["threshold"] == 1.0
    scores = metrics["gate"]["scores"]
    assert set(scores) == {"gate", "features", "pixels", "logit-energy"}
    assert set(scores["gate"]["detection"]) == set(phantoms.SHIFTS)
    assert 0 <= scores["gate"]["test_false_alarm"] <= 1
    # the model card, JSON and Markdown, in the folder
    folder = tiny_project / "models/resnet50"
    document = ModelCardDocument.read(folder)
    assert document.model == "resnet50" and "not for diagnosis" in document.intended_use
    assert document.data["splits"]["test"] == {
        "NORMAL": int((predictions.target == 0).sum()),
        "PNEUMONIA": int((predictions.target == 1).sum()),
    }
    assert document.test_metrics["accuracy"] == metrics["test"]["accuracy"]
    assert any("phantoms" in limit for limit in document.limits)
    markdown = (folder / ModelCardDocument.MARKDOWN).read_text()
    assert markdown.startswith("# Model card: resnet50") and len(markdown) < 5000
    assert "Research use only, not for diagnosis" in markdown
    counts = metrics["test"]
    assert counts["tp"] + counts["fn"] == (predictions.target == 1).sum()
    for plot in ("roc.csv", "pr.csv", "calibration.csv", "risk_coverage.csv", "evaluation.png",
                 "reliability.png", "referral.png", "val_predictions.csv"):  # fmt: skip
        assert (out / plot).stat().st_size > 0


def test_threshold_calibration_and_referral_band_ignore_the_test_split(project_copy):
    """Scrambling the cached test images changes test metrics but never the threshold, the
    calibration map, the referral band or how they were chosen."""
    before = json.loads((project_copy / "reports/eval/resnet50/metrics.json").read_text())
    settings = InferenceSettings.read(project_copy / "models/resnet50")
    test_file = project_copy / "data/processed/test_images.npy"
    images = np.load(test_file)
    np.save(test_file, np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8))
    assert run_cli("evaluate", "resnet50").exit_code == 0
    after = json.loads((project_copy / "reports/eval/resnet50/metrics.json").read_text())
    assert after["threshold"] == before["threshold"]
    assert after["val"] == before["val"]
    assert InferenceSettings.read(project_copy / "models/resnet50") == settings
    assert (
        after["calibration"]["val_out_of_fold_log_loss"]
        == (before["calibration"]["val_out_of_fold_log_loss"])
    )
    for key in ("rule", "low", "high", "val_coverage"):
        assert after["referral"][key] == before["referral"][key]
    assert after["test"]["roc_auc"]["value"] != before["test"]["roc_auc"]["value"]


def test_roc_panel_marks_the_operating_point_and_names_the_auc_interval():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.2, 0.4, 0.6, 0.7, 0.9, 0.95])
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2)
    roc_panel(roc_ax, y, p, 0.5, {"value": 0.75, "ci_low": 0.41, "ci_high": 0.97})
    pr_panel(pr_ax, y, p)
    labels = {line.get_label(): line for line in roc_ax.get_lines()}
    assert "TTA, AUC 0.750 (95% CI 0.410–0.970)" in labels
    point = labels["threshold 0.500: sensitivity 0.67, specificity 0.75"]
    assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx((0.25, 4 / 6))
    baseline = next(line for line in pr_ax.get_lines() if line.get_label().startswith("prev"))
    assert baseline.get_label() == "prevalence 0.60 (no skill)"
    assert list(baseline.get_ydata()) == pytest.approx([0.6, 0.6])
    plt.close(fig)


def test_external_sets_are_evaluated_at_the_folders_settings_and_change_nothing_chosen(
    project_copy,
):
    """A generated set from another "site" and a user's CSV (one file corrupt): evaluate
    reports them in metrics.json and the model card without changing any setting, and
    `pneumo evaluate-external` on the same CSV gives what predict's probabilities give."""
    settings = InferenceSettings.read(project_copy / "models/resnet50")
    raw = yaml.safe_load((project_copy / "params.yaml").read_text())
    test = pd.read_csv(project_copy / "reports/eval/resnet50/predictions.csv")
    test = test.groupby("label").head(8)
    rows = list(zip("data/raw/" + test.image, test.label, strict=True))
    write_tree(project_copy / "site", {"broken.jpeg": b"not an image"})
    table = project_copy / "site/labels.csv"
    lines = ["path,label", *(f"../{p},{label}" for p, label in rows), "broken.jpeg,1"]
    table.write_text("\n".join(lines) + "\n")
    other_site = {"normal": 8, "pneumonia": 8, "image_size": 96}
    other_site |= {"acquisition": {"exposure": 1.8, "noise": 3.0, "field_of_view": 1.3}}
    raw["evaluate"]["external"] = [
        {"name": "other-site", "sample": other_site},
        {"name": "csv-site", "path": str(table)},
    ]
    (project_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    evaluated = run_cli("evaluate", "resnet50")
    assert evaluated.exit_code == 0, evaluated.output

    assert InferenceSettings.read(project_copy / "models/resnet50") == settings
    metrics = json.loads((project_copy / "reports/eval/resnet50/metrics.json").read_text())
    found = metrics["external"]
    assert list(found) == ["other-site", "csv-site"]
    assert (found["other-site"]["n"], found["other-site"]["n_pneumonia"]) == (16, 8)
    assert (found["csv-site"]["n"], found["csv-site"]["n_unreadable"]) == (16, 1)
    # darker, noisier and wider than training: further from it than the test split
    shift, in_domain = found["other-site"]["shift"], metrics["gate"]["test_shift"]
    assert shift["histogram_distance"] > 3 * in_domain["histogram_distance"]
    assert shift["pixels_distance"] > in_domain["pixels_distance"]
    card = ModelCardDocument.read(project_copy / "models/resnet50")
    assert [entry["name"] for entry in card.external] == ["other-site", "csv-site"]
    assert "csv-site (16 images)" in (project_copy / "models/resnet50/MODEL_CARD.md").read_text()

    result = run_cli("evaluate-external", "csv-site", str(table), "--model", "models/resnet50")
    assert result.exit_code == 0, result.output
    assert "| models/resnet50 | csv-site | 16 |" in result.output
    report = json.loads((project_copy / "reports/external/csv-site.json").read_text())
    alone = report["models"]["models/resnet50"]
    assert alone["metrics"] == found["csv-site"]["metrics"]
    files = [path for path, _ in rows]
    predicted = run_cli("predict", "--model", "models/resnet50", "--allow-ood", *files)
    probability = pd.read_csv(StringIO(predicted.stdout)).probability.to_numpy()
    targets = np.array([label == "PNEUMONIA" for _, label in rows])
    accuracy = ((probability >= settings.threshold) == targets).mean()
    assert alone["metrics"]["accuracy"]["value"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"holiday/cat.jpeg": jpeg_bytes(1)}, "no images in NORMAL/ or PNEUMONIA/ folders"),
        ({"NORMAL/a.jpeg": jpeg_bytes(1)}, "external set 'photos' needs both classes"),
        ({"NORMAL/a.jpeg": b"x", "PNEUMONIA/b.png": b"y"}, "none of its images decodes"),
    ],
)
def test_an_unusable_external_set_is_a_clear_error(project_copy, files, message):
    write_tree(project_copy / "photos", files)
    result = run_cli("evaluate-external", "photos", "photos", "--model", "models/resnet50")
    assert result.exit_code == 1
    assert message in result.output
    assert not (project_copy / "reports/external").exists()
