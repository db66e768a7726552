"""The package's layers (docs/architecture.md): imports only go down.

shared base (config, specs, paths, records, files, errors, interrupts, platforms, markdown,
figures)
  < core (the ML, no MLOps tool) < mlops (MLflow, DVC experiments) < stages < cli.
Every import counts, including the ones inside functions that keep start-up fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pneumo

PACKAGE = Path(pneumo.__file__).parent
LAYERS = ("base", "core", "mlops", "stages", "cli")
# What a layer may not import, beyond the layers above it.
FORBIDDEN_LIBRARIES = {"core": ("mlflow", "dvc"), "base": ("mlflow", "dvc")}


def layer_of(module: str) -> str:
    """``pneumo.core.models`` → core; ``pneumo.config`` → base; ``pneumo.cli`` → cli."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("core", "mlops", "stages"):
        return parts[1]
    return "cli" if parts[1:2] in (["cli"], ["__main__"]) else "base"


def imported_modules(source: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (``from pneumo.core import
    models`` counts as ``pneumo.core.models``)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(source: Path) -> str:
    parts = source.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def upward_imports(source: Path) -> list[str]:
    own = LAYERS.index(layer_of(module_name(source)))
    bad = []
    for module in sorted(imported_modules(source)):
        if module.split(".")[0] == "pneumo" and module != "pneumo":
            if LAYERS.index(layer_of(module)) > own:
                bad.append(module)
        elif module.split(".")[0] in FORBIDDEN_LIBRARIES.get(layer_of(module_name(source)), ()):
            bad.append(module)
    return bad


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_go_down_the_layers(source):
    assert upward_imports(source) == []


def test_stages_do_not_import_each_other():
    for source in (PACKAGE / "stages").glob("*.py"):
        stages = {m for m in imported_modules(source) if m.startswith("pneumo.stages.")}
        assert stages <= {module_name(source)}, source.name


def test_the_rule_sees_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """The check is only as good as its import reading: a core module importing MLflow or a
    stage lazily must be caught."""
    fake_package = tmp_path / "pneumo"
    (fake_package / "core").mkdir(parents=True)
    source = fake_package / "core" / "models.py"
    source.write_text(
        "def f():\n    import mlflow\n    from pneumo.stages import train\n"
        "    from pneumo import paths\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake_package)
    assert upward_imports(source) == ["mlflow", "pneumo.stages", "pneumo.stages.train"]


def test_package_init_files_hold_only_a_docstring():
    """dvc.yaml leaves them out of the stages' deps (tests/record_stage.py), which is right
    only while they define nothing a stage could compute with."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        statements = body[1:] if body and isinstance(body[0], ast.Expr) else body
        allowed = ["__version__"] if init.parent == PACKAGE else []
        names = [target.id for node in statements for target in getattr(node, "targets", [])]
        assert len(statements) == len(names) and names == allowed, init
