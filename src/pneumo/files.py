"""Writing stage outputs so that an interrupted stage never leaves a half-written one, and
hashing files by content."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """An empty sibling folder to fill; it replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def feed(digest: hashlib._Hash, path: Path) -> None:
    """Add a file's bytes to ``digest`` a MiB at a time (weights and caches reach GBs)."""
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    feed(digest, path)
    return digest.hexdigest()
