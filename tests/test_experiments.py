"""Approaches as params overrides, the parallel DVC queue, and the report tables."""

from __future__ import annotations

import json
import os
import time

import mlflow
import pytest
import yaml

from pneumo.config import ConfigError
from pneumo.mlops import experiments
from pneumo.mlops.experiments import (
    APPROACH_ORDER,
    ExperimentError,
    build_report,
    collect,
    load_approach,
    parse_queue_status,
    queue_and_run,
    render_report,
    set_param_args,
)
from tests.conftest import REPO_ROOT, run_cli, run_tool, store_uri, tiny_repository

APPROACHES = REPO_ROOT / "configs/approaches"


def test_every_approach_is_valid_and_final_valthreshold_extends_final():
    for name in APPROACH_ORDER:
        args = set_param_args(load_approach(name, APPROACHES), REPO_ROOT / "params.yaml")
        assert args[0::2] == ["-S"] * (len(args) // 2)
    final = load_approach("final", APPROACHES)
    ours = load_approach("final-valthreshold", APPROACHES)
    assert ours["evaluate"]["threshold"] == "youden" and final["evaluate"]["threshold"] == 0.8
    assert {k: v for k, v in ours.items() if k != "evaluate"} == {
        k: v for k, v in final.items() if k != "evaluate"
    }
    assert load_approach("baseline", APPROACHES)["loss"] == {"name": "bce", "pos_weight": "none"}


def test_set_param_args_quote_strings_for_dvc():
    args = set_param_args(
        {"evaluate": {"tta": ["identity", "rotate:-10"], "threshold": "recall>=0.9"}},
        REPO_ROOT / "params.yaml",
    )
    assert args == [
        "-S", "evaluate.tta=['identity','rotate:-10']",
        "-S", "evaluate.threshold='recall>=0.9'",
    ]  # fmt: skip


def test_invalid_approach_fails_before_queueing(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"loss": {"gama": 1}}))
    with pytest.raises(ConfigError, match="loss.gama"):
        set_param_args(load_approach("bad", tmp_path), REPO_ROOT / "params.yaml")
    with pytest.raises(ExperimentError, match="known: \\['bad'\\]"):
        load_approach("missing", tmp_path)


QUEUE_STATUS = """\
Task     Name      Created    Status
1a2b3c4  baseline  06:40 AM   {baseline}
5d6e7f8  balanced  06:40 AM   {balanced}

Worker status: {active} active, {idle} idle
"""


def test_queue_status_reads_states_and_live_workers():
    status = parse_queue_status(
        QUEUE_STATUS.format(baseline="Running", balanced="Queued", active=1, idle=1)
    )
    assert status.states == {"baseline": "Running", "balanced": "Queued"}
    assert status.workers == 2
    empty = parse_queue_status(
        "No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n"
    )
    assert empty.states == {} and empty.workers == 0


def test_waiting_on_a_queue_without_workers_fails_instead_of_hanging(monkeypatch):
    """A worker that never starts (or is killed) leaves its experiments Queued/Running for ever:
    the wait must end with an error that names them."""
    calls = []

    def fake_dvc(*args, env=None):
        calls.append(args[:2])
        if args[:2] == ("queue", "status"):
            return QUEUE_STATUS.format(baseline="Running", balanced="Queued", active=0, idle=0)
        return ""

    monkeypatch.setattr("pneumo.mlops.experiments._dvc", fake_dvc)
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ExperimentError, match=r"\['balanced', 'baseline'\].*no DVC queue worker"):
        queue_and_run(["baseline", "balanced"], jobs=2, poll_seconds=0, workerless_seconds=0.05)
    assert calls.count(("queue", "status")) >= 2  # it waited for the grace period first


def test_dvc_returns_when_it_exits_although_a_daemon_it_left_holds_its_output(
    tmp_path, monkeypatch
):
    """`dvc queue start` exits leaving workers that inherit its stdout; an idle worker may
    live on, and waiting for the end of a pipe it holds would hang `pneumo approaches`."""
    fake = tmp_path / "dvc"
    fake.write_text("#!/bin/sh\n(sleep 30) &\necho started\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    assert experiments._dvc("queue", "start") == "started\n"
    assert time.monotonic() - started < 10


def test_approaches_refuse_another_params_file(in_tmp):
    """DVC experiments change params.yaml, whatever --params says: running them from another
    file would validate one file and run another."""
    result = run_cli("--params", "other.yaml", "approaches", "baseline")
    assert result.exit_code == 1
    assert "reads params.yaml: drop --params" in result.stderr
    assert not (in_tmp / ".dvc").exists()  # refused before anything was queued


def _metric(value: float) -> dict:
    return {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}


def _exp_show(name: str, backbones: list[str], threshold) -> dict:
    params = {"backbones": backbones, "evaluate": {"threshold": threshold}}
    metrics = {
        f"reports/eval/{b}/metrics.json": {
            "data": {
                "threshold": 0.5 if threshold == "youden" else threshold,
                "n_test": 10,
                "test": {m: _metric(0.7) for m in
                         ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")}
                | {"tp": 3},
            }
        }
        for b in backbones
    }  # fmt: skip
    rev = {"name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}
    return {"name": name, "revs": [rev]}


def test_report_tables_from_exp_show():
    shown = [
        {"rev": "workspace", "experiments": None},
        {
            "rev": "abc",
            "experiments": [
                _exp_show("final", ["densenet121", "resnet50"], 0.8),
                _exp_show("baseline", ["resnet50"], 0.5),
                _exp_show("unrelated", ["resnet50"], 0.5),
            ],
        },
    ]
    report = build_report(collect(shown, ["baseline", "final"]))
    assert [(r["approach"], r["backbone"]) for r in report["rows"]] == [
        ("baseline", "resnet50"), ("final", "densenet121"), ("final", "resnet50"),
    ]  # fmt: skip
    markdown = render_report(report)
    resnet_table = markdown.split("**Backbones")[0]
    assert resnet_table.index("| baseline |") < resnet_table.index("| final |")
    assert "| densenet121 (final) | 0.700 (0.650–0.750)" in markdown
    with pytest.raises(ExperimentError, match="not found"):
        collect(shown, ["precision"])


def test_readme_experiments_block_equals_the_committed_report():
    from pneumo.markdown import readme_block

    report = json.loads((REPO_ROOT / "reports/experiments.json").read_text())
    assert readme_block(REPO_ROOT / "README.md", "experiments") == render_report(report)


@pytest.mark.slow
@pytest.mark.scenario
@pytest.mark.timeout(900)  # ~1 min here; a queue that never drains fails long before CI's limit
def test_two_queued_experiments_in_parallel_lose_no_mlflow_run(tmp_path):
    root = tiny_repository(tmp_path / "repo")

    def run(*args: str) -> str:
        return run_tool(*args, cwd=root)

    # Straight from the commit: each experiment fetches and preprocesses its own tiny sample.
    output = run("pneumo", "approaches", "baseline", "balanced", "-j", "2", "-S",
                 "train.epochs=1")  # fmt: skip
    assert "finished experiments: baseline, balanced" in output
    logs = run("dvc", "queue", "logs", "baseline") + run("dvc", "queue", "logs", "balanced")
    assert "database is locked" not in logs.lower()
    mlflow.set_tracking_uri(store_uri(root))
    for name in ("baseline", "balanced"):
        runs = mlflow.search_runs(
            experiment_names=["tests"], filter_string=f"tags.dvc_experiment = '{name}'"
        )
        assert list(runs["tags.mlflow.runName"]) == [f"{name}-resnet50"]
        assert runs["metrics.test_roc_auc"].notna().all()  # evaluate logged into the same run
    table = run("pneumo", "report", "baseline", "balanced", "--output", "tables.md")
    assert "| baseline |" in table and "| balanced |" in table
