"""A registered version's files, pinned at registration and checked before anything loads.

Loading a registered model runs code from the artifact store: MLflow executes its
``serving.py`` and imports the pneumo modules shipped in ``code/``. The weights' hashes are
checked by that code itself, which a changed ``.py`` file would skip. So `pneumo register`
records the SHA-256 of every file of the logged model in a version tag (the tracking database,
not the artifact store), and `pneumo predict` and `pneumo app` compare the downloaded files
with it before MLflow reads any of them. `mlflow models serve` loads the model itself and
checks only the weights and the graph (README, "Trusting a registered model").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pneumo.core.runtime import IntegrityError
from pneumo.errors import UserError
from pneumo.files import sha256_of

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

MANIFEST_TAG = "artifact_sha256"
# Written by MLflow into every download of a models:/ URI (the model's name and version): data
# it adds on the way, read by no loader
DOWNLOAD_NOTE = "registered_model_meta"
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag's value


def manifest(folder: Path) -> dict[str, str]:
    """Every file of a logged model folder, by its path in the folder, to its SHA-256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    named = {p.relative_to(folder).as_posix(): p for p in files}
    return {name: sha256_of(path) for name, path in named.items() if name != DOWNLOAD_NOTE}


def manifest_tag(folder: Path) -> str:
    """The manifest as the version tag's value."""
    value = json.dumps(manifest(folder), sort_keys=True, separators=(",", ":"))
    if len(value) > MAX_TAG_LENGTH:
        raise ValueError(
            f"the manifest of {folder} takes {len(value)} characters, more than a tag holds "
            f"({MAX_TAG_LENGTH}): ship fewer files with the model"
        )
    return value


def verify(folder: Path, version: ModelVersion) -> None:
    """Refuse a downloaded version whose files differ from its registration's manifest: a
    changed, missing or added file, named in one line."""
    where = f"{version.name} version {version.version}"
    recorded = version.tags.get(MANIFEST_TAG)
    if recorded is None:
        raise IntegrityError(
            f"{where} has no {MANIFEST_TAG} tag (registered before pneumo recorded one): run "
            "`pneumo register` on a trusted machine to record its files, then load it"
        )
    expected, found = json.loads(recorded), manifest(folder)
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            problem = "is missing from the artifact store"
        elif name not in expected:
            problem = "is in the artifact store but was not registered"
        elif found[name] != expected[name]:
            problem = (
                f"has SHA-256 {found[name][:16]}… but the registration recorded "
                f"{expected[name][:16]}…"
            )
        else:
            continue
        raise IntegrityError(f"{where}: {name} {problem}: refusing to load it")


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
    """The registered model at ``uri``, downloaded, verified against its manifest, then
    loaded by MLflow from the verified files."""
    import mlflow

    version = resolve(uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    verify(folder, version)
    return mlflow.pyfunc.load_model(str(folder), model_config=model_config)
