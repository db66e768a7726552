"""`pneumo tune`: a hyperparameter search that any number of workers share, through Optuna.

A study lives in an Optuna storage: ``sqlite:///<repo>/optuna.db`` by default, or the team's
PostgreSQL (``postgresql://…/optuna``, created by scripts/team-server), where workers on
several machines draw their trials from one sampler. Every `pneumo tune` process is a worker:
it trains one trial at a time on the preprocessed cache with :func:`pneumo.core.loop.fit`, and
the per-epoch validation metric feeds the pruner.

In MLflow the study is a parent run and every trial a nested run (tag ``mlflow.parentRunId``)
with its params, per-epoch metrics, its Optuna state (``optuna.state``: COMPLETE, PRUNED or
FAIL) and the study and trial as tags. A trial run ends FINISHED (complete or pruned), FAILED
or, when its worker is stopped, KILLED.

Budget: ``--trials N`` is the study's, not the worker's. A worker adds a trial only while the
study holds fewer than N, counted under a lock (a file lock beside SQLite, an advisory lock in
PostgreSQL), so two workers never start more than N between them. A trial whose worker was
killed does not use the budget: the next worker to start marks it FAIL (its process is gone
from this host, or its heartbeat stopped on another) and closes its MLflow run as KILLED.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo import paths
from pneumo.config import Params, flatten
from pneumo.errors import UserError
from pneumo.mlops import store, tracking
from pneumo.mlops.search import (
    SearchConfig,
    backbone_of,
    suggest,
    trial_params,
)

if TYPE_CHECKING:
    import optuna
    import torch

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # it names files and runs
# Trials on another host are judged by their heartbeat; on this one by their process.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 300
PARENT_WAIT_SECONDS = 60.0

# Study and trial attributes pneumo keeps in the Optuna storage
SEARCH_ATTR = "pneumo.search"  # the search's fingerprint: a study runs one search only
PARENT_ATTR = "pneumo.mlflow_parent_run"
WORKER_ATTR = "pneumo.worker"  # host and pid of the process running the trial
RUN_ATTR = "pneumo.mlflow_run"
BACKBONE_ATTR = "pneumo.backbone"  # searched or not, the network the trial trained
FAILURE_ATTR = "pneumo.failure"  # set when the trial itself failed (not its worker)
# MLflow tags
STUDY_TAG, TRIAL_TAG, STATE_TAG = "optuna.study", "optuna.trial", "optuna.state"


class TuneError(UserError):
    """A study cannot run or has no result to use."""


def default_storage() -> str:
    return f"sqlite:///{store.repo_root() / STORAGE_FILE}"


def check_study_name(name: str) -> str:
    if not STUDY_NAME.match(name):
        raise TuneError(
            f"study name {name!r}: letters, digits, '.', '_' and '-' only (it names "
            "reports/tune/<study> and configs/approaches/tuned-<study>.yaml)"
        )
    return name


def _storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):  # workers of one machine wait for each other's writes
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        # Optuna creates its tables on first use and two workers doing it at once collide
        # (optuna/optuna#1092): one creates them, the others find them
        with storage_lock(url, "optuna tables"):
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS, **kwargs
            )
    except Exception as exc:  # a wrong URL, a server that does not answer, a missing driver
        raise TuneError(f"cannot open the Optuna storage {_redacted(url)}: {exc}") from exc


def _redacted(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    import optuna

    if search.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=search.sampler.seed)
    return optuna.samplers.TPESampler(seed=search.sampler.seed)


def _pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    import optuna

    config = search.pruner
    # Optuna's steps are pneumo's epochs (1, 2, …); a step below n_warmup_steps is never pruned
    warmup = config.warmup_epochs + 1
    if config.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.startup_trials, n_warmup_steps=warmup
        )
    if config.name == "hyperband":
        # max_resource "auto": the epochs of the first trial that runs them all
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if config.name == "threshold":
        bound = "lower" if search.direction == "maximize" else "upper"
        return optuna.pruners.ThresholdPruner(**{bound: config.threshold}, n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage_url: str, search: SearchConfig) -> tuple[optuna.Study, bool]:
    """The study, created when it does not exist yet; returns it and whether this call created
    it. Creation is atomic in the storage, so of workers starting together one creates it."""
    import optuna

    optuna.logging.disable_default_handler()  # its messages go through pneumo's logging
    optuna.logging.enable_propagation()
    # Heartbeats and the matplotlib figures are "experimental"; said once in the docs is enough
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = _storage(storage_url)
    options = {"sampler": _sampler(search), "pruner": _pruner(search)}
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction=search.direction, **options
        )
        study.set_user_attr(SEARCH_ATTR, search.fingerprint())
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **options)
    if study.user_attrs.get(SEARCH_ATTR) != search.fingerprint():
        raise TuneError(
            f"study {name!r} in {_redacted(storage_url)} was started with another search "
            "space, objective, sampler or pruner: name a new study (--study)"
        )
    return study, False


@dataclass
class Worker:
    """One `pneumo tune` process: trains trials of ``study`` on the cache until the budget is
    spent or its time is up."""

    study: optuna.Study
    search: SearchConfig
    base: dict[str, Any]  # params.yaml as read
    params: Params  # params.yaml validated: tracking, and the default backbone
    cache_dir: Path
    device: torch.device
    data_hash: str
    parent_run: str = ""

    def start(self, created: bool, search_file: Path, storage_url: str) -> None:
        """Join the study's parent MLflow run (creating it with the study) and close what
        killed workers left behind."""
        self.parent_run = self._parent_run(created, search_file, storage_url)
        tracking.set_status(self.parent_run, "RUNNING")
        self.fail_lost_trials()

    def _parent_run(self, created: bool, search_file: Path, storage_url: str) -> str:
        deadline = time.monotonic() + (0 if created else PARENT_WAIT_SECONDS)
        while (run := self.study.user_attrs.get(PARENT_ATTR)) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(1)  # the worker that created the study is creating the run
        if run is not None:
            return run
        name = self.study.study_name
        run = tracking.create_run(
            self.params.tracking,
            run_name=f"tune-{name}",
            tags=tracking.context_tags("tune-study", self.data_hash)
            | {STUDY_TAG: name, "optuna.storage": _redacted(storage_url)},
        )
        tracking.log_params(
            {"objective": self.search.objective, "direction": self.search.direction}
            | {f"space.{k}": json.dumps(v.model_dump()) for k, v in self.search.space.items()}
            | {f"fixed.{k}": v for k, v in self.search.params.items()},
            run_id=run,
        )
        tracking.log_artifacts([search_file], run_id=run)
        self.study.set_user_attr(PARENT_ATTR, run)
        return run

    def fail_lost_trials(self) -> list[int]:
        """Trials left RUNNING by a worker that is gone end FAIL and their runs KILLED."""
        import optuna

        optuna.storages.fail_stale_trials(self.study)  # heartbeats stopped (any host)
        for trial in self.study.get_trials(deepcopy=False, states=[state("RUNNING")]):
            if tracking.process_alive(trial.user_attrs.get(WORKER_ATTR, {})) is False:
                log.info("trial %d: its worker is gone, marked FAIL", trial.number)
                self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        lost = []
        for trial in self.study.get_trials(deepcopy=False, states=[state("FAIL")]):
            run = trial.user_attrs.get(RUN_ATTR)
            if FAILURE_ATTR in trial.user_attrs or not run:
                continue
            if tracking.run_status(run) == "RUNNING":
                tracking.set_tags({STATE_TAG: "FAIL"}, run_id=run)
                tracking.close_run(run, status="KILLED", closed_by=self.parent_run)
                lost.append(trial.number)
        return lost

    def run(self, trials: int | None, timeout: float | None, storage_url: str) -> int:
        """Train trials until the study holds ``trials`` or ``timeout`` seconds have passed;
        returns how many this worker ran."""
        started, ran = time.monotonic(), 0
        while timeout is None or time.monotonic() - started < timeout:
            if trials is not None:
                with storage_lock(storage_url, self.study.study_name):
                    if not self._reserve(trials):
                        break
            self.study.optimize(self.objective, n_trials=1, catch=(UserError,))
            ran += 1
        return ran

    def _reserve(self, budget: int) -> bool:
        """Under the budget lock: add a waiting trial while the study has fewer than
        ``budget``; True when there is a trial for this worker to take."""
        trials = self.study.get_trials(deepcopy=False)
        waiting = any(t.state == state("WAITING") for t in trials)
        if sum(map(_uses_budget, trials)) < budget:
            self.study.enqueue_trial({})
            return True
        return waiting  # left by a worker killed between adding and taking it

    def objective(self, trial: optuna.Trial) -> float:
        try:
            return self._train_trial(trial)
        except Exception as exc:
            import optuna

            if not isinstance(exc, optuna.TrialPruned):
                trial.set_user_attr(FAILURE_ATTR, f"{type(exc).__name__}: {exc}")
            raise

    def _train_trial(self, trial: optuna.Trial) -> float:
        import optuna

        from pneumo.core.loop import fit

        trial.set_user_attr(WORKER_ATTR, tracking.process_tags())
        drawn = suggest(trial, self.search)
        params = trial_params(self.base, self.search, drawn)
        backbone = backbone_of(params, drawn)
        trial.set_user_attr(BACKBONE_ATTR, backbone)
        name, objective = self.study.study_name, self.search.objective
        tags = tracking.context_tags("tune", self.data_hash) | {
            "mlflow.parentRunId": self.parent_run,
            STUDY_TAG: name,
            TRIAL_TAG: str(trial.number),
            "backbone": backbone,
        }

        def report(stats: dict[str, float]) -> None:
            epoch = int(stats["epoch"])
            tracking.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
            trial.report(stats[objective], epoch)
            # Pruning after the last epoch would save nothing and lose a finished trial's value
            if epoch < params.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {objective} {stats[objective]:.4f}")

        pruned: optuna.TrialPruned | None = None
        with tracking.start_run(params.tracking, run_name=f"{name}-{trial.number:03d}", tags=tags):
            import mlflow

            trial.set_user_attr(RUN_ATTR, mlflow.active_run().info.run_id)
            tracking.log_params(flatten(params) | {"backbone": backbone})
            try:
                result = fit(params, backbone, self.cache_dir, self.device, on_epoch=report)
            except optuna.TrialPruned as exc:
                pruned = exc
            except BaseException:
                tracking.set_tags({STATE_TAG: "FAIL"})
                raise
            tracking.set_tags({STATE_TAG: "PRUNED" if pruned else "COMPLETE"})
            if pruned is None:
                # The kept checkpoint's epoch, as the pipeline would keep it
                value = result.best[objective]
                tracking.log_metrics({f"best_{objective}": value, "best_epoch": result.best_epoch})
        if pruned is not None:
            raise pruned
        return value

    def finish(self) -> None:
        """Record the best trial so far on the parent run; end it when no trial runs."""
        finished = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        counts = {
            kind: sum(t.state.name == kind for t in finished)
            for kind in ("COMPLETE", "PRUNED", "FAIL")
        }
        tracking.log_metrics(
            {f"trials_{k.lower()}": v for k, v in counts.items()}, run_id=self.parent_run
        )
        if counts["COMPLETE"]:
            best = self.study.best_trial
            tracking.set_tags(
                {"best_trial": str(best.number), "best_params": json.dumps(best.params)},
                run_id=self.parent_run,
            )
            tracking.log_metrics(
                {f"best_{self.search.objective}": best.value}, run_id=self.parent_run
            )
        if not self.study.get_trials(deepcopy=False, states=[state("RUNNING")]):
            tracking.set_status(self.parent_run, "FINISHED")


def check_can_train(params: Params) -> Path:
    """Before a study is opened: what trials need is there. Returns the cache they read."""
    if params.train.nproc > 1:
        raise TuneError(
            "a trial trains in the tuning process, on one device: set train.nproc: 1 and start "
            "one `pneumo tune` worker per GPU (CUDA_VISIBLE_DEVICES=N), all on one --storage"
        )
    cache_dir = paths.PROCESSED_DIR
    if not (cache_dir / paths.MANIFEST).is_file():
        raise TuneError(f"no preprocessed data in {cache_dir}: run `dvc repro preprocess` first")
    return cache_dir


def run_trials(
    study: optuna.Study,
    created: bool,
    search: SearchConfig,
    files: tuple[Path, str],
    base: dict[str, Any],
    params: Params,
    budget: tuple[int | None, float | None],
) -> Worker:
    """Be a worker of ``study`` until ``budget`` (the study's trials, this worker's seconds)
    is spent. ``files``: the search file and the storage URL. Returns the worker, finished:
    the study's run holds the best trial so far."""
    from pneumo.core.data import cache_fingerprint
    from pneumo.core.devices import resolve_device

    cache_dir = check_can_train(params)
    search_file, storage_url = files
    worker = Worker(
        study, search, base, params, cache_dir, resolve_device(params.train.device),
        cache_fingerprint(cache_dir),
    )  # fmt: skip
    worker.start(created, search_file, storage_url)
    try:
        worker.run(*budget, storage_url)
    finally:
        worker.finish()
    return worker


def state(name: str) -> optuna.trial.TrialState:
    import optuna

    return optuna.trial.TrialState[name]


def _uses_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial but those whose worker was lost: they are run again."""
    return trial.state.name != "FAIL" or FAILURE_ATTR in trial.user_attrs


@contextmanager
def storage_lock(storage_url: str, name: str) -> Iterator[None]:
    """A lock named ``name`` shared by the workers of one storage: a study's name while a
    worker counts its trials and adds one."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(storage_url)
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        with open(f"{url.database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        return
    if backend != "postgresql":
        log.warning("no lock for %s storage: workers may run a few trials over --trials", backend)
        yield
        return
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("select pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()
