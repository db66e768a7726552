"""Resumable training state: one file per (backbone, everything that determines the run).

DVC deletes a stage's outputs before running it, so the state lives outside them, in
``<repository>/.pneumo/resume/``. Its name carries a hash of the params that determine the
training, the data hash, the backbone, the kind of device, the number of processes, the code
of the package and the torch version: a state written under anything else is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

import pneumo
from pneumo.config import Params

log = logging.getLogger(__name__)

RESUME_DIR = Path(".pneumo/resume")


def code_version() -> str:
    """Hash of the installed package's source and torch's version."""
    digest = hashlib.sha256(torch.__version__.encode())
    package = Path(pneumo.__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def run_key(
    params: Params, backbone: str, data_hash: str, device_type: str, world_size: int
) -> str:
    # What a training run depends on: the recipe, the cache's content (data_hash, so not the
    # data section's paths and limits), the kind of device and the number of processes. Not
    # the study's other sections, whether to resume, the device as written (`auto` may be
    # `cuda`) nor the loader threads, which change no batch.
    determining = params.model_dump(
        mode="json",
        include={
            "seed": True, "model": True, "loss": True, "augment": True, "train": True,
            "evaluate": {"batch_size"},
        },
        exclude={"train": {"resume", "num_workers", "device", "nproc"}},
    )  # fmt: skip
    blob = json.dumps(
        [determining, backbone, data_hash, device_type, world_size, code_version()],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def state_file(root: Path, backbone: str, key: str) -> Path:
    return root / RESUME_DIR / f"{backbone}-{key}.pt"


def load(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none to resume."""
    if not path.is_file():
        return None
    # Our own file, but still no pickle: tensors, numbers, strings, lists and dicts only.
    return torch.load(path, map_location="cpu", weights_only=True)


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a kill during the write leaves the previous epoch's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def discard_others(path: Path) -> None:
    """Remove this backbone's states written under other settings (never resumable here)."""
    backbone = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{backbone}-*.pt"):
        if stale != path and stale.name.rsplit("-", 1)[0] == backbone:
            log.info("removing resume state of other settings: %s", stale.name)
            stale.unlink()
