"""compare, the model registry with its promotion gate, and predict on model folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pneumo.markdown import ReadmeError, update_readme_block
from pneumo.mlops import registry
from pneumo.records import Evaluation, InferenceSettings, ModelCardDocument, Registration
from tests.conftest import TINY_PARAMS, run_cli, store_uri, tool_env
from tests.test_promotion import version_tags

NAME = "pneumo-classifier"


def test_compare_before_evaluate_says_which_stage_to_run(in_tmp):
    result = run_cli("compare", params={"backbones": ["resnet50"]})
    assert result.exit_code == 1
    assert "not found: run `pneumo evaluate resnet50`" in result.output


def test_evaluations_of_different_caches_are_not_compared(in_tmp):
    predictions = pd.DataFrame({"image": ["a.jpeg"], "target": [1], "probability": [0.7]})
    for backbone, data_hash in (("resnet50", "aaa"), ("densenet121", "bbb")):
        folder = in_tmp / "reports/eval" / backbone
        folder.mkdir(parents=True)
        Evaluation(
            backbone=backbone, threshold=0.5, threshold_rule="0.5", tta_views=["identity"],
            calibration={"method": "none"}, referral={}, subgroups={}, gate={},
            test={}, test_no_tta={}, val={}, tta_gain={}, n_test=1, n_val=1, data_hash=data_hash,
            platforms=[],
        ).write(folder)  # fmt: skip
        for split in ("test", "val"):
            predictions.to_csv(Evaluation.predictions(folder, split), index=False)
    result = run_cli("compare", params={"backbones": ["resnet50", "densenet121"]})
    assert result.exit_code == 1
    assert "different preprocess caches" in result.output and "'bbb'" in result.output


def test_readme_without_the_markers_is_a_user_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    with pytest.raises(ReadmeError, match="lacks the markers.*put both lines back"):
        update_readme_block(readme, "table\n")


def _compare_and_register(project: Path) -> Path:
    for command in ("compare", "register"):
        result = run_cli(command)
        assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store_uri(project))
    return project


@pytest.fixture
def compared(project_copy: Path) -> Path:
    """A private copy of the tiny project after compare and register, as the working
    directory: for the tests that change it."""
    return _compare_and_register(project_copy)


@pytest.fixture(scope="module")
def compared_once(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the tiny project after compare and register, for the tests that only read
    it (its files and its MLflow store)."""
    root = tmp_path_factory.mktemp("compared") / "project"
    shutil.copytree(tiny_project, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        return _compare_and_register(root)


@pytest.fixture
def read_only(compared_once: Path) -> Path:
    mlflow.set_tracking_uri(store_uri(compared_once))
    return compared_once


def test_comparison_files(read_only):
    result = json.loads((read_only / "reports/comparison.json").read_text())
    assert set(result["rows"]) == {"resnet50", "efficientnet-b0", "ensemble"}
    assert result["best"] in {"resnet50", "efficientnet-b0"}
    val_metric = [result["rows"][n]["val"]["roc_auc"] for n in result["ranking"]]
    assert val_metric == sorted(val_metric, reverse=True)
    other = next(n for n in result["ranking"] if n not in (result["best"],))
    paired = result["paired_tests_vs_best"][other]
    assert 0 <= paired["mcnemar_p_accuracy"] <= 1 and 0 <= paired["delong"]["p"] <= 1
    assert paired["delong"]["difference"] == pytest.approx(paired["auc_difference"]["difference"])
    markdown = (read_only / "reports/comparison.md").read_text()
    assert "| DeLong p (AUC) |" in markdown
    assert "generated synthetic sample" in markdown and "| ensemble |" in markdown
    assert (read_only / "reports/comparison_roc.png").stat().st_size > 1000


def test_versions_are_registered_with_tags_and_a_challenger(read_only):
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 2
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    best = json.loads((read_only / "reports/comparison.json").read_text())["best"]
    assert challenger.tags["backbone"] == best
    for key in ("git_commit", "dvc_experiment", "data_hash", "val_auc", "val_recall", "threshold"):
        assert key in challenger.tags
    assert challenger.current_stage == "None"  # aliases only, no deprecated stages
    card = (read_only / "models" / best / ModelCardDocument.MARKDOWN).read_text()
    assert challenger.description == card  # the model card, for whoever browses the registry


def test_registration_writes_every_tag_the_gate_reads(read_only):
    """tests/test_promotion.py builds versions with these tags instead of training."""
    client = MlflowClient()
    for version in client.search_model_versions(f"name='{NAME}'"):
        assert set(version_tags()) <= set(version.tags)
        backbone = version.tags["backbone"]
        evaluation = Evaluation.read(read_only / "reports/eval" / backbone)
        assert version.tags["data_hash"] == evaluation.data_hash
        assert float(version.tags["val_auc"]) == pytest.approx(evaluation.val["roc_auc"], abs=1e-6)
        val = pd.read_csv(Evaluation.predictions(read_only / "reports/eval" / backbone, "val"))
        spread = float(version.tags[registry.SPREAD_TAG])
        assert spread == pytest.approx(val["probability"].std(ddof=0), rel=1e-5, abs=1e-12)


def test_registry_json_records_the_versions(read_only):
    record = Registration.read(read_only / "reports")
    client = MlflowClient()
    assert record.store == "embedded" and record.model_name == NAME
    for backbone, version in record.versions.items():
        assert client.get_model_version(NAME, version).tags["backbone"] == backbone
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == record.challenger
    assert record.why == "no challenger before"


def test_registering_the_same_folders_again_reuses_their_versions(compared):
    client = MlflowClient()
    first = Registration.read(compared / "reports")
    again = run_cli("register")
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    second = Registration.read(compared / "reports")
    assert second.versions == first.versions and second.challenger == first.challenger
    assert second.why == "already @challenger"


def test_a_changed_inference_setting_is_a_new_version(compared):
    """The key covers the settings, not only the weights: a new threshold answers otherwise."""
    client = MlflowClient()
    backbone = "resnet50"
    settings = InferenceSettings.read(compared / "models" / backbone)
    settings.model_copy(update={"threshold": 0.123}).write(compared / "models" / backbone)
    assert run_cli("register").exit_code == 0
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 3
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.tags["backbone"] == backbone
    assert Registration.read(compared / "reports").versions[backbone] == str(newest.version)


def test_a_clone_without_the_training_runs_registers_from_new_runs(compared, tmp_path):
    """Pulled outputs, no tracking store: each model gets a run that names its weights."""

    clone = tmp_path / "clone"
    shutil.copytree(compared, clone, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    shutil.rmtree(clone / ".pneumo")
    done = subprocess.run(
        [sys.executable, "-m", "pneumo", "register"],
        cwd=clone,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "is not in this tracking store" in done.stderr and "Traceback" not in done.stderr
    record = Registration.read(clone / "reports")
    assert record.versions == {"resnet50": "1", "efficientnet-b0": "2"}
    uri = store_uri(clone)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for backbone, version in record.versions.items():
        run = client.get_run(client.get_model_version(NAME, version).run_id)
        assert run.info.run_name.endswith(f"{backbone}-registration")
        assert run.info.status == "FINISHED"
        sha = InferenceSettings.read(clone / "models" / backbone).weights_sha256
        assert run.data.tags["weights_sha256"] == sha


def test_promote_moves_champion_and_the_gate_refuses_a_regression(compared):
    client = MlflowClient()
    # The tiny models learn little: the floors are tested in tests/test_promotion.py.
    no_floors = {"min_val_auc": 0.0, "min_prediction_spread": 0.0}
    (compared / "params.yaml").write_text(yaml.safe_dump({**TINY_PARAMS, "registry": no_floors}))
    first = run_cli("promote")
    assert first.exit_code == 0 and "promoted" in first.output
    champion = client.get_model_version_by_alias(NAME, "champion")
    other = next(
        v for v in client.search_model_versions(f"name='{NAME}'") if v.version != champion.version
    )
    client.set_model_version_tag(NAME, other.version, "val_auc", "0.0")

    refused = run_cli("promote", "--version", other.version)
    assert refused.exit_code == 1
    assert "not promoted" in refused.output and "val_auc 0.0000 <" in refused.output
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version
    assert client.get_model_version(NAME, other.version).tags["promotion"].startswith("refused")

    forced = run_cli("promote", "--version", other.version, "--force")
    assert forced.exit_code == 0 and "forced despite" in forced.output
    assert client.get_model_version_by_alias(NAME, "champion").version == other.version
    shown = run_cli("promote", "--history").output.splitlines()
    assert [line.split()[2] for line in shown[1:]] == ["promoted", "refused", "forced"]


def test_promote_without_a_challenger_explains_what_to_run(project_copy):
    result = run_cli("promote")
    assert result.exit_code == 1 and "pneumo register" in result.output


def _some_images(root: Path, n: int = 3) -> list[Path]:
    return sorted((root / "data/raw/test").rglob("*.jpeg"))[:n]


def test_predict_reports_a_corrupt_file_and_still_predicts_the_others(project_copy):
    images = _some_images(project_copy, 2)
    corrupt = project_copy / "corrupt.jpeg"
    corrupt.write_bytes(images[0].read_bytes()[:100])
    result = run_cli(
        "predict", str(images[0]), str(corrupt), str(images[1]), "--model", "models/resnet50"
    )
    assert result.exit_code == 1
    rows = list(pd.read_csv(__import__("io").StringIO(result.output)).itertuples())
    assert [Path(r.file).name for r in rows] == [images[0].name, "corrupt.jpeg", images[1].name]
    assert pd.isna(rows[1].probability) and isinstance(rows[1].error, str)
    assert 0 <= rows[0].probability <= 1 and rows[0].label in ("NORMAL", "PNEUMONIA", "REFER")


def test_predict_a_folder_with_the_local_model(project_copy):
    result = run_cli("predict", "data/raw/val", "--model", "models/efficientnet-b0")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1 + len(  # stderr has the progress bar
        list(Path("data/raw/val").rglob("*.jpeg"))
    )


def test_predict_without_a_champion_explains(project_copy):
    result = run_cli("predict", str(_some_images(project_copy, 1)[0]))
    assert result.exit_code == 1 and "pneumo promote" in result.output
