"""Shared fixtures: tiny generated data sets in the Kaggle layout, and the CLI runner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from pneumo.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "chest_xray_dev.zip"


def jpeg_bytes(seed: int, size: int = 64, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode in ("L", "RGB") else "PNG")
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def kaggle_files(prefix: str = "chest_xray", patients: int = 12) -> dict[str, bytes]:
    """A small valid Kaggle-layout tree; every third patient has two images."""
    files: dict[str, bytes] = {}
    seed = 0
    for offset, split in enumerate(("train", "val", "test")):
        for p in range(patients if split != "val" else 2):
            patient = 1000 * offset + p
            for image_no in range(1, 3 if p % 3 == 0 else 2):
                seed += 1
                normal = f"{prefix}/{split}/NORMAL/IM-{patient:04d}-{image_no:04d}.jpeg"
                sick = f"{prefix}/{split}/PNEUMONIA/person{patient}_virus_{seed}.jpeg"
                files[normal] = jpeg_bytes(2 * seed)
                files[sick] = jpeg_bytes(2 * seed + 1)
    return files


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, as the stages do in a repository root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, params: dict | None = None) -> Result:
    """Invoke `pneumo` in the current folder, writing params.yaml first when given."""
    if params is not None:
        import yaml

        Path("params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_user_mlflow() -> Iterator[None]:
    """Tests never log into a developer's own tracking server, nor into another test's store.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, which pneumo reads first: left
    set by one test, it would send the next one's `dvc` and `pneumo` processes to that store.
    Removed before and after each test, so module fixtures (set up between tests) see none.
    """
    from pneumo.mlops import store

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    store._configured.clear()  # each test configures its own store
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# How far `pneumo predict` of one image may lie from the probability `evaluate` wrote for it:
# one image alone and the same image in a batch of 64 go through oneDNN convolutions blocked
# differently, which moved probabilities by up to 1e-5 (measured; the last bits of one CPU).
BATCH_TOLERANCE = 1e-4

TINY_PARAMS = {
    "seed": 3,
    "backbones": ["resnet50", "efficientnet-b0"],
    "data": {
        "sample": {
            "train": {"normal": 24, "pneumonia": 40},
            "val": {"normal": 4, "pneumonia": 4},
            "test": {"normal": 16, "pneumonia": 24},
            "image_size": 64,
        },
        "image_size": 32,
        "val_fraction": 0.25,
    },
    "train": {"epochs": 2, "batch_size": 16, "patience": 2},
    "evaluate": {
        "tta": ["identity", "hflip"],
        "refer": "sensitivity>=0.98,specificity>=0.95",
        "bootstrap": {"resamples": 50, "seed": 0},
    },
    "tracking": {"experiment": "tests"},
}


def answers(labels) -> list[str | None]:
    """A label column read from CSV or JSON, with None where there is no label."""
    return [label if isinstance(label, str) else None for label in labels]


def expected_answers(predictions) -> list[str | None]:
    """What predict and the served model answer for the rows of an evaluate predictions.csv:
    no label for an input the gate flags, REFER inside the referral band, else the
    threshold's label."""
    return [
        None if not passed else "REFER" if referred else label
        for passed, referred, label in zip(
            predictions.in_distribution, predictions.referred, predictions.predicted, strict=True
        )
    ]


def assert_calibrated_close(folder: Path, got, expected, tolerance: float) -> None:
    """``got``: another runtime's (or another batch's) calibrated probabilities for the rows of
    evaluate's predictions.csv ``expected``. Each must lie where the folder's calibration map
    sends evaluate's raw TTA mean moved by ``tolerance`` either way. The map is monotone, but a
    steep isotonic step turned a raw difference of 1.8e-5 into 1.8e-4 under AVX2 kernels, so
    calibrated values are not held to the raw tolerance: that held on one CPU's last bits only."""
    from pneumo.core.calibration import apply
    from pneumo.records import InferenceSettings

    calibration = InferenceSettings.read(folder).calibration
    raw = expected.filter(regex="^p_").to_numpy().mean(axis=1)
    ends = np.stack([apply(calibration, np.clip(raw + shift, 0.0, 1.0))
                     for shift in (-tolerance, tolerance)])  # fmt: skip
    got = np.asarray(got, dtype=np.float64)
    slack = 1e-6  # evaluate's raw mean was taken in float32
    outside = (got < ends.min(axis=0) - slack) | (got > ends.max(axis=0) + slack)
    assert not outside.any(), (
        f"{outside.sum()} probabilities off: {got[outside]} not in "
        f"{list(zip(ends.min(axis=0)[outside], ends.max(axis=0)[outside], strict=True))}"
    )


def _run_stages(*commands: tuple[str, ...]) -> None:
    for command in commands:
        result = run_cli(*command)
        assert result.exit_code == 0, (command, result.output)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where fetch → preprocess → train → evaluate ran for two small backbones.

    Shared by many tests (training is the slow part); tests must not modify it.
    """
    import yaml

    root = tmp_path_factory.mktemp("tiny_project")
    previous = Path.cwd()
    os.chdir(root)
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
        _run_stages(("fetch",), ("preprocess", "--workers", "1"))
        for backbone in TINY_PARAMS["backbones"]:
            _run_stages(("train", backbone), ("evaluate", backbone))
    finally:
        os.chdir(previous)
    return root


@pytest.fixture
def project_copy(tiny_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny project, as the working directory."""
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(tiny_project, copy)
    monkeypatch.chdir(copy)
    return copy


# Searches for `pneumo tune` on the tiny project, decided by the random sampler's draws alone
# (not by any CPU's arithmetic): every trial that reaches epoch 2 is pruned there (a validation
# loss is never below -1; epoch 1 is the warm-up), every one-epoch trial completes.
TINY_SEARCH = {
    "objective": "val_loss",
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "threshold", "threshold": -1.0, "warmup_epochs": 1},
    "space": {
        "train.epochs": {"choices": [1, 2, 3]},
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "model.dropout": {"low": 0.1, "high": 0.5},
    },
}


def preprocessed_copy(tiny_project: Path, dest: Path, **changes: dict) -> Path:
    """The tiny project's params.yaml (sections overlaid with ``changes``) and preprocessed
    cache in ``dest``: what `pneumo tune` reads, without the models."""
    import shutil

    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_project / "data" / "processed", dest / "data" / "processed")
    (dest / "params.yaml").write_text(yaml.safe_dump(_overlay(TINY_PARAMS, changes)))
    return dest


# --- whole `pneumo` processes on a copy of the tiny project (resume, crashes) ----------------


def write_params(project: Path, **train) -> None:
    """TINY_PARAMS with ``train`` overrides, as the project's params.yaml."""
    import json

    import yaml

    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["train"] |= train
    (project / "params.yaml").write_text(yaml.safe_dump(raw))


def pneumo_process(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs
) -> subprocess.Popen:
    """`python -m pneumo ARGS` in ``cwd`` (``env``: variables added to :func:`tool_env`),
    stdout and stderr together as text."""
    env = tool_env(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "pneumo", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )  # fmt: skip


def state_epoch(project: Path, backbone: str = "resnet50") -> int:
    """The last epoch in the backbone's resume state (0 when there is none yet)."""
    import torch

    states = list((project / ".pneumo/resume").glob(f"{backbone}-*.pt"))
    if not states:
        return 0
    try:
        return torch.load(states[0], weights_only=True)["epoch"]
    except (RuntimeError, EOFError, OSError):  # replaced while we read it
        return 0


def wait_for_epoch(project: Path, process: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until ``process`` has saved the state of an epoch; returns that epoch."""
    deadline = time.monotonic() + timeout
    while state_epoch(project) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return state_epoch(project)


def kill_after_first_epoch(project: Path) -> int:
    """`pneumo train resnet50` in ``project``, SIGKILLed once it has saved an epoch's state
    (as a pre-empted job dies: no handler runs); returns that epoch."""
    import signal

    process = pneumo_process("train", "resnet50", cwd=project)
    epoch = wait_for_epoch(project, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return epoch


def tracked_runs(project: Path) -> list:
    """The runs of the project's tracking store, in the tests' experiment."""
    import mlflow

    mlflow.set_tracking_uri(store_uri(project))
    return mlflow.search_runs(experiment_names=["tests"], output_format="list")


def copy_repository(dest: Path) -> Path:
    """The repository's tracked files (no data, models or tracking store) as a new git repo."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        source = REPO_ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(
            ["git", "-c", "user.name=pneumo-tests", "-c", "user.email=tests@pneumo.invalid", *args],
            cwd=dest, check=True, capture_output=True,
        )  # fmt: skip
    return dest


def _overlay(base: dict, changes: dict) -> dict:
    return base | {
        key: _overlay(base[key], value) if isinstance(value, dict) and key in base else value
        for key, value in changes.items()
    }


def tiny_repository(dest: Path, backbones: tuple[str, ...] = ("resnet50",)) -> Path:
    """:func:`copy_repository` with TINY_PARAMS (one epoch; one backbone unless told) laid over
    its params.yaml and committed: a DVC project whose `dvc repro` takes about 45 s with one
    backbone, and where `dvc exp run -S` finds every key of the full file."""
    import yaml

    copy_repository(dest)
    tiny = _overlay(TINY_PARAMS, {"backbones": list(backbones), "train": {"epochs": 1}})
    raw = _overlay(yaml.safe_load((dest / "params.yaml").read_text()), tiny)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(
        ["git", "-c", "user.name=pneumo-tests", "-c", "user.email=tests@pneumo.invalid",
         "commit", "-qam", "tiny params"],
        cwd=dest, check=True, capture_output=True,
    )  # fmt: skip
    return dest


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the repository after `dvc repro` on the embedded default, and what `dvc repro`
    printed (about four minutes here: run once per session, by tests/test_pipeline.py alone,
    whose tests change its workspace and store in turn)."""
    root = copy_repository(tmp_path_factory.mktemp("clone") / "pneumo")
    return root, run_tool("dvc", "repro", cwd=root)


@pytest.fixture(scope="session")
def tiny_reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A :func:`tiny_repository` with TINY_PARAMS' two backbones after `dvc repro` (about a
    minute): for what DVC and MLflow do across repros, clones and remotes, which does not
    depend on the size of the sample. Tests copy it (``shutil.copytree(…, symlinks=True)``)."""
    root = tiny_repository(tmp_path_factory.mktemp("tiny") / "pneumo", TINY_PARAMS["backbones"])
    run_tool("dvc", "repro", cwd=root)
    return root


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_uri(project: Path) -> str:
    """The URI of a project's embedded tracking store (its mlflow.db)."""
    from pneumo.mlops.store import embedded_uri

    return embedded_uri(project)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for `dvc` and `pneumo` subprocesses: this venv first on PATH, no
    DVC_ROOT of an enclosing run, no tracking server unless given in ``extra``."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env | extra


def run_tool(*args: str, cwd: Path, status: int = 0, env: dict[str, str] | None = None) -> str:
    """Run a command (`dvc`, `pneumo`, `git`) in ``cwd`` with :func:`tool_env` (or ``env``);
    checks its exit status and returns its stdout followed by its stderr."""
    done = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    assert done.returncode == status, (
        f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout + done.stderr
