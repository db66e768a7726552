"""Stage `compare`: one table of every backbone plus their ensemble, with paired tests.

Rows are ranked by a *validation* metric (``compare.select_by``); test metrics are reported
with their bootstrap intervals but never used to choose anything. The README's results block
is rendered from ``reports/comparison.json`` by :func:`render_table` in its own stage
(``pneumo readme``), so the README cannot drift from the runs (tests/test_repository.py checks
it).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo import paths, platforms
from pneumo.config import Params, selected_metric
from pneumo.errors import UserError
from pneumo.files import write_text_atomic
from pneumo.metrics import (
    binary_metrics,
    choose_threshold,
    delong_test,
    mcnemar_exact,
    metrics_with_ci,
    paired_bootstrap_auc,
)
from pneumo.records import Comparison, Evaluation

log = logging.getLogger(__name__)

README_BLOCKS = {"comparison": "pneumo readme", "experiments": "pneumo report"}
ENSEMBLE = "ensemble"
TABLE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


class CompareError(UserError):
    """The evaluations cannot be compared, or the README cannot take the table."""


def _load(eval_dir: Path) -> tuple[Evaluation, pd.DataFrame, pd.DataFrame]:
    record = Evaluation.read(eval_dir)
    test, val = (
        pd.read_csv(Evaluation.predictions(eval_dir, split)).set_index("image")
        for split in ("test", "val")
    )
    return record, test, val


def describe_data(params: Params) -> str:
    source = params.data.source
    if source == "sample":
        return (
            "generated synthetic sample (phantom radiographs, not real X-rays; these numbers "
            "only show that the pipeline works)"
        )
    if source == "local":
        return f"local archive `{Path(params.data.local_path or '').name}`"
    return f"Kaggle data set `{params.data.kaggle_dataset}` (official test split)"


def compare(params: Params, backbones: list[str]) -> Comparison:
    boot = params.evaluate.bootstrap
    loaded = {b: _load(paths.eval_report_dir(b)) for b in backbones}
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
        },
        best=best,
        ranking=ranking,
        rows=rows,
        paired_tests_vs_best=tests,
    )
    _roc_png(y_test, p_test, paths.COMPARISON_ROC_PNG)
    result.write(paths.REPORTS_DIR)
    write_text_atomic(paths.COMPARISON_MD, render_table(result))
    log.info("ranking by %s: %s", params.compare.select_by, ranking)
    return result


def _cell(metric: dict) -> str:
    return f"{metric['value']:.3f} ({metric['ci_low']:.3f}–{metric['ci_high']:.3f})"


def render_table(result: Comparison) -> str:
    """The comparison as Markdown; a pure function of comparison.json."""
    settings = result.settings
    init = "ImageNet-pretrained" if settings["pretrained"] else "random init"
    header = " | ".join(TABLE_METRICS)
    lines = [
        f"Data: {result.data}. Test images: {result.n_test}, validation images: {result.n_val}.",
        "",
        "Platform: " + "; ".join(map(platforms.summary, result.platforms)) + ".",
        "",
        f"Settings: {settings['image_size']} px, {settings['epochs']} epochs, "
        f"{settings['loss']} loss, {init}, "
        f"TTA views {', '.join(result.tta_views)}; threshold rule `{result.threshold_rule}` "
        f"on validation; ranked by `{result.select_by}`. Test metrics with 95% stratified "
        "bootstrap intervals.",
        "",
        f"| model | {header} | threshold | {result.select_by} | TTA Δacc |",
        "|---" * (len(TABLE_METRICS) + 4) + "|",
    ]
    select = selected_metric(result.select_by)
    for name in result.ranking:
        row = result.rows[name]
        gain = row["tta_gain_accuracy"]
        cells = [_cell(row["test"][m]) for m in TABLE_METRICS]
        lines.append(
            f"| {'**' + name + '**' if name == result.best else name} | "
            + " | ".join(cells)
            + f" | {row['threshold']:.3f} | {row['val'][select]:.3f} | "
            + ("–" if gain is None else f"{gain:+.3f}")
            + " |"
        )
    lines += [
        "",
        f"Paired tests, {result.best} against each other model on the same test images:",
        "",
    ]
    lines += [
        "| vs | McNemar p (accuracy) | ΔAUC (95% CI) | bootstrap p (AUC) | DeLong p (AUC) |",
        "|---|---|---|---|---|",
    ]
    for other, test in result.paired_tests_vs_best.items():
        auc = test["auc_difference"]
        # comparison.json files written before DeLong's test was added lack it
        delong = f"{test['delong']['p']:.3f}" if "delong" in test else "–"
        lines.append(
            f"| {other} | {test['mcnemar_p_accuracy']:.3f} | {auc['difference']:+.3f} "
            f"({auc['ci_low']:+.3f}–{auc['ci_high']:+.3f}) | {auc['p']:.3f} | {delong} |"
        )
    return "\n".join(lines) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- {name}:start (generated by `{README_BLOCKS[name]}`; do not edit) -->",
        f"<!-- {name}:end -->",
    )


def update_readme_block(readme: Path, block: str, name: str = "comparison") -> bool:
    """Replace the text between the README markers of ``name``; returns whether it changed."""
    start, end = _markers(name)
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise CompareError(
            f"{readme} lacks the markers {start!r} … {end!r}: put both lines back where the "
            "generated block belongs"
        )
    updated = pattern.sub(lambda _: f"{start}\n{block}{end}", text)
    readme.write_text(updated)
    return updated != text


def readme_block(readme: Path, name: str = "comparison") -> str:
    start, end = _markers(name)
    text = readme.read_text()
    return text[text.index(start) + len(start) + 1 : text.index(end)]


def _roc_png(y: np.ndarray, probabilities: dict[str, np.ndarray], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in probabilities.items():
        RocCurveDisplay.from_predictions(y, p, ax=ax, name=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title("Test ROC, all models")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
