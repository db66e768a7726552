"""What a study of `pneumo tune` gives: a report (Optuna's figures, every trial, the best
ones) and its best trial as an approach that runs through the whole pipeline."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pneumo import paths
from pneumo.files import write_text_atomic
from pneumo.mlops import experiments, tracking
from pneumo.mlops.search import SearchConfig, approach_overrides
from pneumo.mlops.tune import BACKBONE_ATTR, TuneError, state

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def publish(study: optuna.Study, search: SearchConfig, parent_run: str | None) -> Path:
    """Write the study's report; log it to the study's MLflow run when given. Returns its
    folder."""
    folder = report_dir(study.study_name)
    written = write_report(study, search, folder)
    if parent_run is not None:
        tracking.log_artifacts(written, "report", run_id=parent_run)
    return folder


def write_report(study: optuna.Study, search: SearchConfig, folder: Path) -> list[Path]:
    """Optuna's figures (history, per-epoch values, importances) as PNGs, every trial as CSV
    and a summary; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as figures

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    complete = study.get_trials(deepcopy=False, states=[state("COMPLETE")])
    importances = _importances(study) if len(complete) >= 2 else {}
    plots = {"history.png": figures.plot_optimization_history,
             "epochs.png": figures.plot_intermediate_values}  # fmt: skip
    if importances:
        plots["importances.png"] = lambda s: figures.plot_param_importances(
            s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    for file, plot in plots.items():
        with warnings.catch_warnings():  # Optuna marks its matplotlib figures experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            figure = plot(study).figure
        figure.set_size_inches(8, 4.5)
        figure.savefig(folder / file, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / file)
    table = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    table.to_csv(folder / "trials.csv", index=False)
    summary = folder / "summary.md"
    write_text_atomic(summary, _summary(study, search, importances))
    return [*written, folder / "trials.csv", summary]


def _importances(study: optuna.Study) -> dict[str, float]:
    import optuna

    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same values
        log.info("no parameter importances: %s", exc)
        return {}


def _summary(study: optuna.Study, search: SearchConfig, importances: dict[str, float]) -> str:
    trials = study.get_trials(deepcopy=False)
    states = {t.state.name for t in trials}
    counts = ", ".join(f"{sum(t.state.name == s for t in trials)} {s}" for s in sorted(states))
    lines = [
        f"# Study {study.study_name}",
        "",
        f"Objective: {search.objective} ({search.direction}d, on validation). Trials: {counts}.",
        "",
    ]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    complete.sort(key=lambda t: t.value, reverse=search.direction == "maximize")
    if complete:
        keys = list(search.space)
        lines += [f"| trial | {search.objective} | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]  # fmt: skip
        for trial in complete[:5]:
            cells = " | ".join(_cell(trial.params.get(k)) for k in keys)
            lines.append(f"| {trial.number} | {trial.value:.4f} | {cells} |")
        lines.append("")
    if importances:
        lines += ["Parameter importances (fANOVA): " + ", ".join(
            f"{k} {v:.2f}" for k, v in importances.items()), ""]  # fmt: skip
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"  # a conditional key this trial did not draw
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def apply_best(
    study: optuna.Study, search: SearchConfig, folder: Path = experiments.APPROACHES_DIR
) -> tuple[Path, list[str]]:
    """The best trial as ``configs/approaches/tuned-<study>.yaml``; returns the file and the
    `dvc exp run` command that runs it through the whole pipeline."""
    complete = study.get_trials(deepcopy=False, states=[state("COMPLETE")])
    if not complete:
        raise TuneError(f"study {study.study_name!r} has no complete trial to apply yet")
    best = study.best_trial
    overrides = approach_overrides(search, best.params, best.user_attrs[BACKBONE_ATTR])
    name = f"tuned-{study.study_name}"
    args = experiments.set_param_args(overrides)  # the merged params must be valid
    header = (
        f"# The best trial ({best.number}, {search.objective} {best.value:.4f} on validation)"
        f" of the study {study.study_name}, written by `pneumo tune --apply`.\n"
    )
    file = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, header + yaml.safe_dump(overrides, sort_keys=False))
    return file, ["dvc", "exp", "run", "-n", name, *args]


def report_dir(study_name: str) -> Path:
    return paths.REPORTS_DIR / "tune" / study_name
