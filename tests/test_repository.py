"""The committed repository stays consistent: README results, dvc.yaml paths, params."""

from __future__ import annotations

import json

import yaml

from pneumo import paths
from pneumo.compare import readme_block, render_table, update_readme_block
from tests.conftest import REPO_ROOT


def test_readme_results_block_equals_the_committed_comparison():
    result = json.loads((REPO_ROOT / paths.COMPARISON_JSON).read_text())
    assert readme_block(REPO_ROOT / "README.md") == render_table(result)


def test_readme_block_is_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    original = (REPO_ROOT / "README.md").read_text()
    readme.write_text(original)
    assert update_readme_block(readme, "new table\n")
    assert readme_block(readme) == "new table\n"
    text = readme.read_text()
    assert text.startswith(original.split("<!-- comparison:start")[0])
    assert text.endswith(original.split("<!-- comparison:end -->")[1])


def _stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _outs(stage: dict) -> set[str]:
    found = set()
    for kind in ("outs", "metrics", "plots"):
        for item in stage.get(kind, []):
            found.add(item if isinstance(item, str) else next(iter(item)))
    return found


def test_dvc_yaml_paths_match_the_code():
    stages = _stages()
    b = "${item.backbone}"
    assert _outs(stages["fetch"]) == {str(paths.RAW_DIR)}
    assert _outs(stages["preprocess"]) == {str(paths.PROCESSED_DIR)}
    assert str(paths.RAW_DIR) in stages["preprocess"]["deps"]
    assert _outs(stages["train"]) == {
        str(paths.model_dir(b)),
        str(paths.train_report_dir(b) / "metrics.json"),
        str(paths.history_csv(b)),
    }
    assert str(paths.PROCESSED_DIR) in stages["train"]["deps"]
    evaluate_dir = paths.eval_report_dir(b)
    assert _outs(stages["evaluate"]) == {
        str(evaluate_dir / name)
        for name in (
            "metrics.json",
            "predictions.csv",
            "val_predictions.csv",
            "evaluation.png",
            "roc.csv",
            "pr.csv",
            "calibration.csv",
        )
    }
    assert str(paths.model_dir(b)) in stages["evaluate"]["deps"]
    assert _outs(stages["compare"]) == {
        str(p) for p in (paths.COMPARISON_JSON, paths.COMPARISON_MD, paths.COMPARISON_ROC_PNG)
    }


def test_each_stage_depends_on_the_modules_it_runs():
    stages = _stages()
    expected = {
        "fetch": {"fetch.py", "phantoms.py"},
        "preprocess": {"preprocess.py", "images.py"},
        "train": {"train.py", "models.py", "losses.py", "data.py", "tracking.py"},
        "evaluate": {"evaluate.py", "metrics.py"},
        "compare": {"compare.py", "registry.py", "predict.py"},
    }
    for name, modules in expected.items():
        deps = {d.removeprefix("src/pneumo/") for d in stages[name]["deps"]}
        assert modules <= deps, name
        assert stages[name]["cmd"].startswith(f"pneumo {name}")
