"""Stage `validate`: params.yaml checked, and every resolved value written for the others.

The first stage: the others declare their params from its output, so DVC runs it before them,
and a bad value stops `dvc repro` / `dvc exp run` before any output is removed.
"""

from __future__ import annotations

from pathlib import Path

from pneumo.config import Params, load_params
from pneumo.files import write_json_atomic


def validate(params_file: Path, resolved_file: Path) -> Params:
    """The validated params (:class:`pneumo.config.ConfigError` names a bad key), also written
    to ``resolved_file`` with every default filled in."""
    params = load_params(params_file)
    write_json_atomic(resolved_file, params.model_dump(mode="json"))
    return params
