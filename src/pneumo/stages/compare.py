"""Stage `compare`: one table of every backbone plus their ensemble, with paired tests.

Rows are ranked by a *validation* metric (``compare.select_by``); test metrics are reported
with their bootstrap intervals but never used to choose anything. comparison.md and the
README's results block are rendered from the record by :func:`pneumo.markdown.render_comparison`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo import platforms
from pneumo.config import Params
from pneumo.core.metrics import (
    binary_metrics,
    choose_threshold,
    delong_test,
    mcnemar_exact,
    metrics_with_ci,
    paired_bootstrap_auc,
)
from pneumo.errors import UserError
from pneumo.figures import png_figure
from pneumo.files import write_text_atomic
from pneumo.markdown import describe_data, render_comparison
from pneumo.records import Comparison, Evaluation

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"


class CompareError(UserError):
    """The evaluations cannot be compared."""


def _load(eval_dir: Path) -> tuple[Evaluation, pd.DataFrame, pd.DataFrame]:
    record = Evaluation.read(eval_dir)
    test, val = (
        pd.read_csv(Evaluation.predictions(eval_dir, split)).set_index("image")
        for split in ("test", "val")
    )
    return record, test, val


def compare(
    params: Params, backbones: list[str], eval_dirs: dict[str, Path], reports_dir: Path
) -> Comparison:
    """Compare the backbones' evaluations (``eval_dirs``) and write the record, its table
    and the ROC figure into ``reports_dir``."""
    boot = params.evaluate.bootstrap
    loaded = {b: _load(eval_dirs[b]) for b in backbones}
    data_hashes = {b: record.data_hash for b, (record, _, _) in loaded.items()}
    if len(set(data_hashes.values())) > 1:
        raise CompareError(
            f"the evaluations were made on different preprocess caches {data_hashes}, so their "
            "test images differ: rerun `dvc repro` to train and evaluate every backbone anew"
        )
    first_test = loaded[backbones[0]][1]
    y_test = first_test.target.to_numpy()
    y_val = loaded[backbones[0]][2].target.to_numpy()

    rows: dict[str, dict] = {}
    for backbone, (record, _, _) in loaded.items():
        rows[backbone] = {
            "threshold": record.threshold,
            "val": record.val,
            "test": record.test,
            "tta_gain_accuracy": record.tta_gain["accuracy"],
            "tta_gain_roc_auc": record.tta_gain["roc_auc"],
            "calibration": {
                "method": record.calibration["method"],
                **{when: record.calibration[f"test_{when}"] for when in ("before", "after")},
            },
            "referral": {key: record.referral[key] for key in ("rule", "low", "high")}
            | record.referral["test"],
            "subgroups": record.subgroups,
            "gate": record.gate["scores"],
            "external": record.external,
            "in_domain": {
                "n": record.n_test,
                "metrics": record.test,
                "calibration": {"ece": record.calibration["test_after"]["ece"]},
                "referral": {"coverage": record.referral["test"]["coverage"]},
                "gate_alarm": record.gate["scores"]["gate"]["test_false_alarm"],
                "shift": record.gate["test_shift"],
            },
        }
    p_test = {
        b: t.loc[first_test.index, "probability"].to_numpy() for b, (_, t, _) in loaded.items()
    }
    p_val = {b: v.probability.to_numpy() for b, (_, _, v) in loaded.items()}

    if len(backbones) > 1:
        ens_val, ens_test = np.mean(list(p_val.values()), 0), np.mean(list(p_test.values()), 0)
        threshold = choose_threshold(params.evaluate.threshold, y_val, ens_val)
        rows[ENSEMBLE] = {
            "threshold": threshold,
            "val": binary_metrics(y_val, ens_val, threshold),
            "test": metrics_with_ci(
                y_test, ens_test, threshold, resamples=boot.resamples, seed=boot.seed
            ),
            "tta_gain_accuracy": None,
            "tta_gain_roc_auc": None,
        }
        p_test[ENSEMBLE] = ens_test

    select = params.compare.metric
    ranking = sorted(rows, key=lambda name: -rows[name]["val"][select])
    best = next(name for name in ranking if name != ENSEMBLE)
    tests = {}
    for other in ranking:
        if other == best:
            continue
        predicted_best = p_test[best] >= rows[best]["threshold"]
        predicted_other = p_test[other] >= rows[other]["threshold"]
        tests[other] = {
            "mcnemar_p_accuracy": mcnemar_exact(y_test, predicted_best, predicted_other),
            "auc_difference": paired_bootstrap_auc(
                y_test, p_test[best], p_test[other], resamples=boot.resamples, seed=boot.seed
            ),
            "delong": delong_test(y_test, p_test[best], p_test[other]),
        }

    result = Comparison(
        data=describe_data(params),
        select_by=params.compare.select_by,
        threshold_rule=str(params.evaluate.threshold),
        tta_views=list(params.evaluate.tta),
        n_test=int(len(y_test)),
        n_val=int(len(y_val)),
        platforms=platforms.distinct(
            [described for record, _, _ in loaded.values() for described in record.platforms]
        ),
        settings={
            "image_size": params.data.image_size,
            "epochs": params.train.epochs,
            "loss": params.loss.name,
            "pretrained": params.model.pretrained,
            "calibration": params.evaluate.calibration,
            "refer": params.evaluate.refer,
        },
        best=best,
        ranking=ranking,
        rows=rows,
        paired_tests_vs_best=tests,
    )
    _roc_png(y_test, p_test, reports_dir / Comparison.ROC_PNG)
    result.write(reports_dir)
    write_text_atomic(reports_dir / Comparison.MARKDOWN, render_comparison(result))
    log.info("ranking by %s: %s", params.compare.select_by, ranking)
    return result


def _roc_png(y: np.ndarray, probabilities: dict[str, np.ndarray], png: Path) -> None:
    from sklearn.metrics import RocCurveDisplay

    with png_figure(png, figsize=(5.5, 5)) as (_, ax):
        for name, p in probabilities.items():
            RocCurveDisplay.from_predictions(y, p, ax=ax, name=name)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title("Test ROC, all models")
