"""`pneumo tune`: search files, trials as nested MLflow runs, pruning, the budget, killed
workers, the report and --apply. Two workers on PostgreSQL: tests/test_team_server.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pneumo.config import ConfigError, load_yaml
from pneumo.mlops import experiments, tune, tune_report
from pneumo.mlops.search import approach_overrides, load_search, suggest, trial_params
from tests.conftest import (
    REPO_ROOT,
    TINY_PARAMS,
    TINY_SEARCH,
    pneumo_process,
    preprocessed_copy,
    run_cli,
    store_uri,
)

BASE = load_yaml(REPO_ROOT / "params.yaml")


def _search_file(folder: Path, search: dict, name: str = "search") -> Path:
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(search, sort_keys=False))  # the space is drawn in order
    return file


def _with(**changes) -> dict:
    return {**TINY_SEARCH, **changes}


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (_with(space={"loss.gama": {"low": 1, "high": 2}}), "space.loss.gama: not a params.yaml"),
        (_with(space={"data.image_size": {"choices": [32, 64]}}), "data.* needs its own"),
        (_with(space={"train.nproc": {"choices": [1, 2]}}), "space.train.nproc: a trial does"),
        (_with(space={"evaluate.threshold": {"choices": [0.5]}}), "space.evaluate.threshold: a"),
        (_with(space={"backbones": {"choices": [["resnet50"]]}}), "trains one `backbone`"),
        (_with(space={"model.dropout": {"low": 0.2, "high": 1.5}}),
         "space.model.dropout: the value 1.5 is invalid"),
        (_with(space={"backbone": {"choices": ["resnet50", "vgg16"]}}),
         "space.backbone: the value 'vgg16' is invalid"),
        (_with(space={"train.lr": {"low": 0.01, "high": 0.001}}), "must be below high"),
        (_with(space={"train.lr": {"low": 0.0, "high": 0.1, "log": True}}), "log range needs low"),
        (_with(params={"train.epochs": 0}), "train.epochs"),
        (_with(objective="test_auc"), "objective"),
        (_with(pruner={"name": "threshold"}), "threshold is needed"),
        (_with(space={}), "space"),
        (_with(spaces={"train.lr": {"choices": [0.1]}}), "spaces"),
        (_with(space={"loss.gamma": {"low": 1, "high": 2, "when": {"loss.name": "focal"}},
                      "loss.name": {"choices": ["focal", "bce"]}}),
         "space.loss.gamma.when.loss.name: a condition names a key with choices listed above"),
        (_with(space={"loss.name": {"choices": ["focal", "bce"]},
                      "loss.gamma": {"low": 1, "high": 2, "when": {"loss.name": "focl"}}}),
         "space.loss.gamma.when.loss.name: ['focl'] not among its choices"),
    ],
)  # fmt: skip
def test_an_invalid_search_fails_before_any_trial_naming_the_key(
    search: dict, message: str, tmp_path: Path
):
    with pytest.raises(ConfigError) as error:
        load_search(_search_file(tmp_path, search), BASE)
    assert message in str(error.value)


def test_the_example_search_is_valid():
    for file in (REPO_ROOT / "configs/search").glob("*.yaml"):
        load_search(file, BASE)


def test_trials_draw_typed_values_that_pass_params_validation(tmp_path: Path):
    search = load_search(
        _search_file(tmp_path, _with(space={
            "backbone": {"choices": ["resnet50", "densenet121"]},
            "augment.rotation": {"low": 0, "high": 20, "step": 5},
            "loss.gamma": {"low": 1.0, "high": 3.0},
            "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        })), BASE,
    )  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        drawn = suggest(study.ask(), search)
        assert isinstance(drawn["augment.rotation"], int) and drawn["augment.rotation"] % 5 == 0
        assert isinstance(drawn["loss.gamma"], float) and 1.0 <= drawn["loss.gamma"] <= 3.0
        params = trial_params(BASE, search, drawn)
        assert params.backbones == [drawn["backbone"]]
        assert params.augment.rotation == drawn["augment.rotation"]
        assert params.train.lr == drawn["train.lr"]
        assert params.train.epochs == BASE["train"]["epochs"]


def test_a_conditional_key_is_drawn_only_when_its_condition_holds(tmp_path: Path):
    search = load_search(
        _search_file(tmp_path, _with(space={
            "loss.name": {"choices": ["focal", "bce"]},
            "loss.gamma": {"low": 1.0, "high": 3.0, "when": {"loss.name": "focal"}},
            "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        })), BASE,
    )  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for value in range(12):
        trial = study.ask()
        drawn = suggest(trial, search)
        assert ("loss.gamma" in drawn) == (drawn["loss.name"] == "focal")
        study.tell(trial, float(value))
    assert {t.params["loss.name"] for t in study.trials} == {"focal", "bce"}
    # Nothing credits a value a trial did not read: not the report's importances, not the winner
    tune_report.write_report(study, search, tmp_path / "report")
    summary = (tmp_path / "report/summary.md").read_text()
    importances = next(line for line in summary.splitlines() if line.startswith("Parameter imp"))
    assert "loss.name" in importances and "loss.gamma" not in importances
    assert "| bce | – |" in summary
    bce = next(t for t in study.trials if t.params["loss.name"] == "bce")
    assert "gamma" not in approach_overrides(search, bce.params, "resnet50")["loss"]


def test_killed_workers_trials_do_not_use_the_budget():
    def frozen(state: str, **attrs) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], value=0.0 if state == "COMPLETE" else None,
            user_attrs=attrs,
        )  # fmt: skip

    assert tune._uses_budget(frozen("COMPLETE"))
    assert tune._uses_budget(frozen("PRUNED"))
    assert tune._uses_budget(frozen("FAIL", **{tune.FAILURE_ATTR: "TrainingDivergedError: nan"}))
    assert not tune._uses_budget(frozen("FAIL"))  # its worker was lost


def test_study_names_become_file_names_so_they_are_checked():
    assert tune.check_study_name("recipe-2026.12_a") == "recipe-2026.12_a"
    for bad in ("../x", "a b", "", "-x"):
        with pytest.raises(tune.TuneError):
            tune.check_study_name(bad)


def test_a_study_refuses_a_worker_with_another_search(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = load_search(_search_file(tmp_path, TINY_SEARCH), BASE)
    other = load_search(_search_file(tmp_path, _with(objective="val_auc"), "other"), BASE)
    study, created = tune.open_study("s", storage, first)
    assert created and tune.open_study("s", storage, first)[1] is False
    with pytest.raises(tune.TuneError, match="another search space"):
        tune.open_study("s", storage, other)
    del study


def test_apply_writes_the_best_trial_as_an_approach(tmp_path: Path):
    search = load_search(_search_file(tmp_path, _with(params={"train.epochs": 3})), BASE)
    study = optuna.create_study(study_name="demo", direction=search.direction)
    for value, lr in ((0.30, 1e-3), (0.10, 3e-4), (0.20, 1e-2)):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"train.lr": lr, "train.epochs": 1, "model.dropout": 0.2},
            distributions={
                "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                "train.epochs": optuna.distributions.CategoricalDistribution([1, 2]),
                "model.dropout": optuna.distributions.FloatDistribution(0.1, 0.5),
            },
            user_attrs={tune.BACKBONE_ATTR: "resnet50"},
        ))  # fmt: skip
    file, command = tune_report.apply_best(study, search, tmp_path / "approaches")
    assert file.name == "tuned-demo.yaml"
    approach = experiments.load_approach("tuned-demo", tmp_path / "approaches")
    assert approach == approach_overrides(
        search, {"train.lr": 3e-4, "train.epochs": 1, "model.dropout": 0.2}, "resnet50"
    )
    assert approach["train"] == {"epochs": 1, "lr": 3e-4}  # drawn beats fixed
    assert command[:5] == ["dvc", "exp", "run", "-n", "tuned-demo"]
    assert "train.lr=0.0003" in command and "backbones=['resnet50']" in command


def test_apply_without_a_complete_trial_says_so(tmp_path: Path):
    search = load_search(_search_file(tmp_path, TINY_SEARCH), BASE)
    study = optuna.create_study(study_name="empty", direction=search.direction)
    with pytest.raises(tune.TuneError, match="no complete trial"):
        tune_report.apply_best(study, search, tmp_path)


def test_tune_without_a_budget_or_cache_fails_early(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _search_file(tmp_path, TINY_SEARCH)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = run_cli("tune", "search.yaml")
    assert result.exit_code == 1 and "nothing to do" in result.output
    result = run_cli("tune", "search.yaml", "--trials", "2")
    assert result.exit_code == 1 and "run `dvc repro preprocess` first" in result.output
    bad = _search_file(tmp_path, _with(space={"loss.gama": {"low": 1, "high": 2}}), "bad")
    result = run_cli("tune", str(bad), "--trials", "2")
    assert result.exit_code == 1 and "space.loss.gama" in result.output
    assert not (tmp_path / "optuna.db").exists()  # a bad search creates no study


def _study(project: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def _runs(project: Path, study: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store_uri(project))
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`optuna.study` = '{study}'"
    )


@pytest.mark.slow
def test_trials_are_nested_runs_pruned_by_epoch_and_the_report_and_apply_follow(
    tiny_project: Path, tmp_path: Path, monkeypatch
):
    project = preprocessed_copy(tiny_project, tmp_path / "project")
    monkeypatch.chdir(project)
    _search_file(project, TINY_SEARCH)
    result = run_cli("tune", "search.yaml", "--trials", "4", "--apply")
    assert result.exit_code == 0, result.output

    trials = _study(project, "search").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    # The threshold pruner stops a trial at epoch 2 unless that is its last: complete exactly
    # when it drew 1 or 2 epochs
    states = {t.number: t.state.name for t in trials}
    assert states == {
        t.number: "COMPLETE" if t.params["train.epochs"] <= 2 else "PRUNED" for t in trials
    }
    assert {t.params["train.epochs"] for t in trials} == {1, 2, 3}  # the seed's draws

    runs = _runs(project, "search")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["best_trial"] == str(_study(project, "search").best_trial.number)
    assert parent.data.metrics["trials_pruned"] + parent.data.metrics["trials_complete"] == 4
    children = {int(r.data.tags["optuna.trial"]): r for r in runs if r is not parent}
    assert sorted(children) == [0, 1, 2, 3]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store_uri(project))
    for number, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == states[number]
        assert run.info.status == "FINISHED"
        trial = trials[number]
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        steps = list(range(1, min(trial.params["train.epochs"], 2) + 1))  # pruned at 2
        assert [m.step for m in history] == steps
        assert [m.value for m in history] == [trial.intermediate_values[s] for s in steps]
        if states[number] == "COMPLETE":
            assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value)

    report = project / "reports/tune/search"
    for name in ("history.png", "epochs.png", "trials.csv", "summary.md"):
        assert (report / name).stat().st_size > 0
    complete = sum(state == "COMPLETE" for state in states.values())
    summary = (report / "summary.md").read_text()
    assert f"Trials: {complete} COMPLETE, {4 - complete} PRUNED." in summary
    approach = yaml.safe_load((project / "configs/approaches/tuned-search.yaml").read_text())
    best = _study(project, "search").best_trial
    assert approach["train"]["lr"] == best.params["train.lr"]
    assert approach["backbones"] == ["resnet50"]  # not searched: params.yaml's first
    assert "dvc exp run -n tuned-search" in result.output

    # Another worker continues the same study: the budget is the study's, so 4 more make 6
    result = run_cli("tune", "search.yaml", "--trials", "6")
    assert result.exit_code == 0, result.output
    assert [t.number for t in _study(project, "search").trials] == list(range(6))


@pytest.mark.slow
@pytest.mark.scenario
def test_a_killed_workers_trial_ends_fail_and_its_run_killed_when_the_next_worker_starts(
    tiny_project: Path, tmp_path: Path
):
    project = preprocessed_copy(tiny_project, tmp_path / "project")
    search = _with(pruner={"name": "none"}, params={"train.epochs": 4},
                   space={"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}})  # fmt: skip
    _search_file(project, search, "slow")
    worker = pneumo_process("tune", "slow.yaml", "--trials", "50", cwd=project)
    deadline, running = time.monotonic() + 240, []
    while not running and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if (project / "optuna.db").exists():
            try:
                trials = _study(project, "slow").get_trials(states=[TrialState.RUNNING])
                running = [t for t in trials if t.intermediate_values]
            except Exception:  # the storage or the study is being created
                continue
    assert running, worker.communicate()[0] if worker.poll() is not None else "no trial ran"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = running[0].number
    killed_run = running[0].user_attrs[tune.RUN_ATTR]
    assert _study(project, "slow").trials[killed].state.name == "RUNNING"  # as SIGKILL left it

    finished_before = sum(t.state.is_finished() for t in _study(project, "slow").trials)
    budget = finished_before + 1
    second = pneumo_process("tune", "slow.yaml", "--trials", str(budget), cwd=project)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output

    trials = _study(project, "slow").trials
    assert not [t for t in trials if not t.state.is_finished()]
    assert trials[killed].state.name == "FAIL"
    assert tune.FAILURE_ATTR not in trials[killed].user_attrs  # lost, not failed
    assert trials[-1].number == len(trials) - 1 and trials[-1].state.name == "COMPLETE"
    assert sum(map(tune._uses_budget, trials)) == budget  # the killed trial was run again
    runs = {r.info.run_id: r for r in _runs(project, "slow")}
    assert runs[killed_run].info.status == "KILLED"
    assert runs[killed_run].data.tags["optuna.state"] == "FAIL"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
