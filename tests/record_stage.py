"""Run one `pneumo` command and record what it read: params keys and pneumo modules.

    python tests/record_stage.py OUT.json train resnet50

Used by tests/test_stage_inputs.py in a subprocess, so ``sys.modules`` holds only what this
command imported. The params object handed to the command records every field it reads, as
a dotted key (``loss.gamma``); sections are recorded through their fields, so reading
``params.data`` alone records nothing until a key under it is read.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pneumo import cli


class Recorder:
    """Stands for a params section; adds the dotted key of every field read to ``seen``."""

    def __init__(self, section: BaseModel, prefix: str, seen: set[str]) -> None:
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str) -> Any:
        section: BaseModel = object.__getattribute__(self, "_section")
        prefix: str = object.__getattribute__(self, "_prefix")
        seen: set[str] = object.__getattribute__(self, "_seen")
        if name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                return Recorder(value, f"{prefix}{name}.", seen)
            seen.add(f"{prefix}{name}")
            return value
        attribute = inspect.getattr_static(section, name)
        if isinstance(attribute, property):  # derived from fields: read them through us
            return attribute.fget(self)
        # Whole-section copies (model_dump) go to MLflow and the model card for people to
        # read; the stages compute from the fields above.
        return getattr(section, name)


def main() -> None:
    out, *command = sys.argv[1:]
    seen: set[str] = set()
    load = cli._params
    cli._params = lambda ctx: Recorder(load(ctx), "", seen)
    try:
        cli.main(command, standalone_mode=False)
    finally:
        # Source files relative to the repository (src/pneumo/core/models.py), packages'
        # __init__.py left out: they hold docstrings and the version, nothing a stage computes.
        repository = Path(cli.__file__).parents[2]
        modules = sorted(
            Path(module.__file__).relative_to(repository).as_posix()
            for name, module in list(sys.modules.items())
            if name.startswith("pneumo.") and not module.__file__.endswith("__init__.py")
        )
        Path(out).write_text(json.dumps({"params": sorted(seen), "modules": modules}))


if __name__ == "__main__":
    main()
