"""Named approaches as DVC experiments: queue them, run them in parallel, report them.

An approach is a YAML file of params overrides under ``configs/approaches/`` (``base: other``
inherits another approach). Queued with ``dvc exp run --queue -n <name> -S key=value …``, each
experiment records every resolved value in ``dvc exp show``. ``pneumo report`` reads the
finished experiments back from ``dvc exp show --json`` and renders the two tables of the
original write-up from them.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo import paths
from pneumo.config import flatten_mapping, load_yaml, merge_mappings, parse_params
from pneumo.errors import UserError
from pneumo.markdown import TABLE_METRICS, describe_data, format_metric

log = logging.getLogger(__name__)

APPROACHES_DIR = Path("configs/approaches")
APPROACH_ORDER = ("baseline", "balanced", "precision", "final", "final-valthreshold")
FINISHED = ("Success", "Failed")  # states of `dvc queue status` that no longer change


class ExperimentError(UserError):
    """An approach is invalid or an experiment failed."""


def load_approach(name: str, folder: Path = APPROACHES_DIR) -> dict:
    file = folder / f"{name}.yaml"
    if not file.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ExperimentError(f"no approach {name!r} in {folder}; known: {known}")
    overrides = load_yaml(file) or {}
    parent = overrides.pop("base", None)
    return merge_mappings(load_approach(parent, folder), overrides) if parent else overrides


def set_param_args(overrides: dict, params_file: Path = paths.PARAMS) -> list[str]:
    """``-S key=value`` arguments, after checking the merged params are valid."""
    base = load_yaml(params_file)
    parse_params(merge_mappings(base, overrides))  # fail now, not inside a queued experiment
    args: list[str] = []
    for key, value in flatten_mapping(overrides).items():
        args += ["-S", f"{key}={_hydra_value(value)}"]
    return args


def _hydra_value(value: Any) -> str:
    """DVC parses -S values with Hydra's override grammar: quote strings, keep lists."""
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _dvc(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `dvc ARGS` to its exit and return its stdout.

    The output goes through temporary files, not pipes: `dvc queue start` leaves daemonized
    queue workers that inherit its stdout and stderr, and reading a pipe to its end waits until
    the last of them exits, which an idle worker may never do (a hang seen in CI).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(["dvc", *args], stdout=out, stderr=err, text=True, env=env)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if done.returncode != 0:
        raise ExperimentError(f"dvc {' '.join(args)} failed:\n{stdout}{stderr}")
    return stdout


def queue_and_run(
    names: list[str],
    jobs: int,
    prefix: str = "",
    extra: dict | None = None,
    poll_seconds: float = 5.0,
    workerless_seconds: float = 120.0,
) -> list[str]:
    """Queue one experiment per approach, run them ``jobs`` at a time, wait for all.

    ``extra`` overrides apply on top of every approach (e.g. another data source). Fails when
    experiments are still queued or running but no queue worker has answered for
    ``workerless_seconds``: a worker that never started or was killed leaves its tasks in that
    state for ever, and waiting on them would hang the caller.
    """
    queued = []
    for name in names:
        exp_name = f"{prefix}{name}"
        args = set_param_args(merge_mappings(load_approach(name), extra or {}))
        _dvc("exp", "run", "--queue", "-n", exp_name, *args)
        queued.append(exp_name)
        log.info("queued %s", exp_name)
    _dvc("queue", "start", "-j", str(jobs), env=_worker_env(jobs))
    last_worker_seen = time.monotonic()
    while True:
        status = queue_status()
        states = {name: state for name, state in status.states.items() if name in queued}
        if len(states) == len(queued) and all(s in FINISHED for s in states.values()):
            break
        if status.workers:
            last_worker_seen = time.monotonic()
        elif time.monotonic() - last_worker_seen > workerless_seconds:
            waiting = sorted(name for name in queued if states.get(name) not in FINISHED)
            raise ExperimentError(
                f"experiments {waiting} are {sorted(set(states.values()))} but no DVC queue "
                f"worker has answered for {workerless_seconds:.0f} s (did one fail to start, or "
                "was it killed?); see `dvc queue logs <name>`, then `dvc queue remove --all` and "
                "run the approaches again"
            )
        time.sleep(poll_seconds)
    failed = sorted(name for name, state in states.items() if state == "Failed")
    if failed:
        raise ExperimentError(f"experiments {failed} failed; see `dvc queue logs <name>`")
    return queued


def _worker_env(jobs: int) -> dict[str, str]:
    """Share the cores between parallel experiments: with every worker using all of them,
    torch's thread pools oversubscribe the CPU and training slows several-fold."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


@dataclass(frozen=True)
class QueueStatus:
    states: dict[str, str]  # experiment name → Queued / Running / Success / Failed
    workers: int  # active and idle queue workers that answered


def queue_status() -> QueueStatus:
    """The experiments' states and the number of live workers, from `dvc queue status`."""
    return parse_queue_status(_dvc("queue", "status"))


def parse_queue_status(output: str) -> QueueStatus:
    states: dict[str, str] = {}
    workers, in_table = 0, False
    for line in output.splitlines():
        worker_line = re.match(r"Worker status: (\d+) active, (\d+) idle", line)
        if worker_line:
            workers = int(worker_line[1]) + int(worker_line[2])
            continue
        parts = line.split()
        if parts[:1] == ["Task"]:  # the header: task rows follow
            in_table = True
        elif in_table and len(parts) >= 4:
            states[parts[1]] = parts[-1]
    return QueueStatus(states, workers)


def collect(exp_show: list[dict], names: list[str]) -> dict[str, dict]:
    """Params and per-backbone evaluation metrics of the named experiments.

    ``exp_show`` is the parsed output of ``dvc exp show --json``; when an experiment name
    was run more than once, the newest run counts.
    """
    found: dict[str, dict] = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                name = rev.get("name") or experiment.get("name")
                data = rev.get("data") or {}
                if name not in names or name in found or rev.get("error"):
                    continue
                params = data.get("params", {}).get(str(paths.PARAMS), {}).get("data", {})
                evaluations = {
                    path.split("/")[2]: content["data"]
                    for path, content in (data.get("metrics") or {}).items()
                    if path.startswith("reports/eval/") and "data" in content
                }
                found[name] = {"params": params, "evaluations": evaluations}
    missing = [n for n in names if n not in found]
    if missing:
        raise ExperimentError(
            f"experiments {missing} not found in `dvc exp show`; run `pneumo approaches` first"
        )
    return {name: found[name] for name in names}


def build_report(collected: dict[str, dict]) -> dict:
    first = next(iter(collected.values()))
    params = parse_params(first["params"])
    rows = []
    for approach, content in collected.items():
        exp_params = parse_params(content["params"])
        for backbone in exp_params.backbones:
            evaluation = content["evaluations"].get(backbone)
            if evaluation is None:
                raise ExperimentError(f"experiment {approach} has no evaluation of {backbone}")
            rows.append(
                {
                    "approach": approach,
                    "backbone": backbone,
                    "threshold": evaluation["threshold"],
                    "threshold_rule": str(exp_params.evaluate.threshold),
                    "tta_views": exp_params.evaluate.tta,
                    "loss": exp_params.loss.name,
                    "sampler": exp_params.train.weighted_sampler,
                    "test": {k: v for k, v in evaluation["test"].items() if isinstance(v, dict)},
                    "n_test": evaluation["n_test"],
                }
            )
    return {
        "data": describe_data(params),
        "settings": {
            "image_size": params.data.image_size,
            "epochs": params.train.epochs,
            "pretrained": params.model.pretrained,
        },
        "rows": rows,
    }


def render_report(report: dict) -> str:
    settings = report["settings"]
    init = "ImageNet-pretrained" if settings["pretrained"] else "random init"
    header = " | ".join(TABLE_METRICS)
    n_test = report["rows"][0]["n_test"] if report["rows"] else 0

    def table(rows: list[dict], first: str) -> list[str]:
        lines = [f"| {first} | {header} | threshold |", "|---" * (len(TABLE_METRICS) + 2) + "|"]
        for row in rows:
            label = (
                row["approach"] if first == "approach" else f"{row['backbone']} ({row['approach']})"
            )
            cells = " | ".join(format_metric(row["test"][m]) for m in TABLE_METRICS)
            rule = row["threshold_rule"]
            threshold = f"{row['threshold']:.3f}" + (
                "" if rule == str(row["threshold"]) else f" ({rule})"
            )
            lines.append(f"| {label} | {cells} | {threshold} |")
        return lines

    resnet = [r for r in report["rows"] if r["backbone"] == "resnet50"]
    order = {name: i for i, name in enumerate(APPROACH_ORDER)}
    resnet.sort(key=lambda r: order.get(r["approach"], len(order)))
    # `pneumo tune --apply` writes tuned-<study>: a recipe to hold against the final one
    finals = [r for r in report["rows"] if r["approach"].startswith(("final", "tuned-"))]
    finals.sort(key=lambda r: (r["approach"], r["backbone"]))
    lines = [
        f"Data: {report['data']}. Test images: {n_test}. Settings: {settings['image_size']} px, "
        f"{settings['epochs']} epochs, {init}. Test metrics with 95% stratified bootstrap "
        "intervals; thresholds are fixed numbers or chosen on validation only.",
        "",
        "**ResNet50 across the four approaches (and ours)**",
        "",
        *table(resnet, "approach"),
        "",
        "**Backbones with the final recipe**",
        "",
        *table(finals, "model"),
    ]
    return "\n".join(lines) + "\n"
