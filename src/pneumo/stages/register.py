"""Stage `register`: every backbone's model folder becomes a registered model version (once),
and ``@challenger`` moves to the comparison's best only if it beats the current challenger."""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow import MlflowClient

from pneumo.config import Params
from pneumo.mlops import registry, store
from pneumo.records import Comparison, Registration

log = logging.getLogger(__name__)


def register(
    params: Params,
    reports_dir: Path,
    eval_dirs: dict[str, Path],
    model_dirs: dict[str, Path],
    raw_dir: Path,
) -> Registration:
    """Register each backbone's model folder (:func:`pneumo.mlops.registry.register`) with its
    evaluation (test image paths relative to ``raw_dir``); the record goes to ``reports_dir``
    beside the comparison whose best it follows."""
    store.configure(params.tracking)
    client = MlflowClient()
    name = params.registry.model_name
    best = Comparison.read(reports_dir).best
    current = registry.version_by_alias(client, name, registry.CHALLENGER)
    versions = {
        backbone: registry.register(
            params, backbone, model_dirs[backbone], eval_dirs[backbone], raw_dir
        )
        for backbone in params.backbones
    }
    new = client.get_model_version(name, versions[best])
    challenger, why = registry.challenger_choice(current, new, params.compare.select_by)
    if current is None or str(current.version) != challenger:
        registry.set_alias(name, registry.CHALLENGER, challenger)
    log.info("@%s is version %s: %s", registry.CHALLENGER, challenger, why)
    record = Registration(
        model_name=name,
        store=store.store_label(params.tracking),
        versions=versions,
        challenger=challenger,
        why=why,
    )
    record.write(reports_dir)
    return record
