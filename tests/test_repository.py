"""The committed repository stays consistent: README results, dvc.yaml paths, params."""

from __future__ import annotations

import yaml

from pneumo import paths
from pneumo.markdown import readme_block, render_comparison, update_readme_block
from pneumo.records import Comparison, Evaluation, Registration, TrainSummary
from tests.conftest import REPO_ROOT


def test_readme_results_block_equals_the_committed_comparison():
    result = Comparison.read(REPO_ROOT / paths.REPORTS_DIR)
    assert readme_block(REPO_ROOT / "README.md") == render_comparison(result)


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
    assert _outs(stages["validate"]) == {str(paths.RESOLVED_PARAMS)}
    assert _outs(stages["fetch"]) == {str(paths.RAW_DIR)}
    assert _outs(stages["preprocess"]) == {str(paths.PROCESSED_DIR)}
    assert str(paths.RAW_DIR) in stages["preprocess"]["deps"]
    assert _outs(stages["train"]) == {
        str(paths.checkpoint_dir(b)),
        str(TrainSummary.path(paths.train_report_dir(b))),
        str(paths.history_csv(b)),
    }
    assert str(paths.PROCESSED_DIR) in stages["train"]["deps"]
    evaluate_dir = paths.eval_report_dir(b)
    assert _outs(stages["evaluate"]) == {
        str(Evaluation.path(evaluate_dir)),
        *(str(Evaluation.predictions(evaluate_dir, split)) for split in ("test", "val")),
        *(
            str(evaluate_dir / name)
            for name in (
                paths.EVALUATION_PNG,
                paths.RELIABILITY_PNG,
                paths.REFERRAL_PNG,
                paths.ROC_CSV,
                paths.PR_CSV,
                paths.CALIBRATION_CSV,
                paths.RISK_COVERAGE_CSV,
            )
        ),  # fmt: skip
        str(paths.model_dir(b)),
    }
    assert str(paths.checkpoint_dir(b)) in stages["evaluate"]["deps"]
    comparison = Comparison.path(paths.REPORTS_DIR)
    assert _outs(stages["compare"]) == {
        str(p)
        for p in (
            comparison,
            paths.REPORTS_DIR / Comparison.MARKDOWN,
            paths.REPORTS_DIR / Comparison.ROC_PNG,
        )
    }
    assert {str(paths.MODELS_DIR), str(paths.RAW_DIR), str(comparison)} <= set(
        stages["register"]["deps"]
    )
    assert _outs(stages["register"]) == {str(Registration.path(paths.REPORTS_DIR))}
    assert _outs(stages["readme"]) == set()  # README.md is prose people edit: no DVC output
    assert str(comparison) in stages["readme"]["deps"]


def test_every_stage_takes_its_params_from_the_validated_file():
    """So DVC runs `validate` before any of them and a bad value removes nothing."""
    stages = _stages()
    assert stages["validate"]["params"] == [{"params.yaml": None}]
    assert stages["validate"]["outs"] == [
        {str(paths.RESOLVED_PARAMS): {"cache": False, "persist": True}}
    ]
    for name, stage in stages.items():
        if name not in ("validate", "readme"):
            files = [next(iter(item)) for item in stage["params"]]
            assert files == [str(paths.RESOLVED_PARAMS)], name


def test_training_curve_plots_overlay_every_backbone():
    backbones = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["backbones"]
    plots = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["plots"]
    columns = set()
    for plot in plots:
        (definition,) = plot.values()
        assert definition["x"] == "epoch"
        assert set(definition["y"]) == {str(paths.history_csv(b)) for b in backbones}
        (column,) = set(definition["y"].values())  # one quantity per plot
        columns.add(column)
    assert columns == {"val_auc", "val_loss", "train_loss"}
