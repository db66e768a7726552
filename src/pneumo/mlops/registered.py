"""A registered version's files, pinned at registration and checked before anything loads.

Loading a registered model runs code from the artifact store: MLflow executes its
``serving.py`` and imports the pneumo modules shipped in ``code/``. The weights' hashes are
checked by that code itself, which a changed ``.py`` file would skip. So `pneumo register`
records the SHA-256 of every file of the logged model in a version tag (the tracking database,
not the artifact store). `pneumo predict`, `pneumo app` and `pneumo evaluate-external` copy the
registered files out of the store into a private folder, check each copy against the tag and
let MLflow load that folder: what loads is what was registered, and a file that is not (a
``.pyc`` beside the shipped modules, say) stays behind. `mlflow models serve` loads the model
itself and checks only the weights and the graph (README, "Trusting a registered model").
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pneumo.core.runtime import IntegrityError
from pneumo.errors import UserError
from pneumo.files import sha256_of

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

MANIFEST_TAG = "artifact_sha256"
# Written by MLflow into every download of a models:/ URI (the model's name and version), and
# by Python beside modules imported from the store (`mlflow models serve` does): neither is
# pinned, and neither is copied out, so neither loads
DOWNLOAD_NOTE = "registered_model_meta"
BYTECODE = "__pycache__"
MAX_TAG_LENGTH = 8000  # a run tag's limit in MLflow (registry tags take more): room for 60 files


def manifest(folder: Path) -> dict[str, str]:
    """Every file of a logged model folder, by its path in the folder, to its SHA-256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    named = {p.relative_to(folder): p for p in files}
    return {
        name.as_posix(): sha256_of(path)
        for name, path in named.items()
        if name.as_posix() != DOWNLOAD_NOTE and BYTECODE not in name.parts
    }


def manifest_tag(folder: Path) -> str:
    """The manifest as the version tag's value."""
    value = json.dumps(manifest(folder), sort_keys=True, separators=(",", ":"))
    if len(value) > MAX_TAG_LENGTH:
        raise ValueError(
            f"the manifest of {folder} takes {len(value)} characters, more than a tag holds "
            f"({MAX_TAG_LENGTH}): ship fewer files with the model"
        )
    return value


def copy_verified(source: Path, destination: Path, version: ModelVersion) -> None:
    """Copy the registered files of a downloaded version into ``destination``, each checked
    after copying against the registration's manifest; refuse, naming the file in one line,
    a changed or missing file, or one in the store that was never registered."""
    where = f"{version.name} version {version.version}"
    recorded = version.tags.get(MANIFEST_TAG)
    if recorded is None:
        raise IntegrityError(
            f"{where} has no {MANIFEST_TAG} tag (registered before pneumo recorded one): run "
            "`pneumo register` on a trusted machine to record its files, then load it"
        )
    expected = json.loads(recorded)
    if unregistered := sorted(manifest(source).keys() - expected.keys()):
        raise IntegrityError(
            f"{where}: {unregistered[0]} is in the artifact store but was not registered: "
            "refusing to load it"
        )
    for name, sha256 in sorted(expected.items()):
        if not (source / name).is_file():
            raise IntegrityError(
                f"{where}: {name} is missing from the artifact store: refusing to load it"
            )
        copy = destination / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, copy)
        if (found := sha256_of(copy)) != sha256:  # the bytes that will load
            raise IntegrityError(
                f"{where}: {name} has SHA-256 {found[:16]}… but the registration recorded "
                f"{sha256[:16]}…: refusing to load it"
            )


def resolve(uri: str) -> ModelVersion:
    """The version a ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` URI names."""
    from mlflow import MlflowClient

    reference = uri.removeprefix("models:/")
    name, alias = reference.split("@", 1) if "@" in reference else (reference, None)
    if alias is not None:
        return MlflowClient().get_model_version_by_alias(name, alias)
    name, _, number = reference.partition("/")
    if not number:
        raise UserError(f"{uri}: name a version (models:/<name>/<version>) or an alias (@alias)")
    return MlflowClient().get_model_version(name, number)


def load(uri: str, model_config: dict) -> PyFuncModel:
    """The registered model at ``uri``: its registered files copied out of the store and
    checked (:func:`copy_verified`), then loaded by MLflow from that copy. The copy lives
    until the process ends: a loaded model may read its folder again."""
    import mlflow

    version = resolve(uri)
    source = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    folder = Path(tempfile.mkdtemp(prefix="pneumo-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copy_verified(source, folder, version)
    return mlflow.pyfunc.load_model(str(folder), model_config=model_config)
