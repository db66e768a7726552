"""params.yaml validation: every bad value fails early with its dotted key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pneumo.config import ConfigError, Params, flatten, load_params, parse_params
from tests.conftest import (
    REPO_ROOT,
    TINY_PARAMS,
    run_cli,
)


def test_repository_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "sample"
    assert params.backbones == ["densenet121", "resnet50", "efficientnet-b4"]


def _dotted_keys(raw: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in raw.items():
        name = f"{prefix}{key}"
        keys |= _dotted_keys(value, f"{name}.") if isinstance(value, dict) else {name}
    return keys


def test_repository_params_spell_out_every_key():
    """params.yaml documents every knob: no setting hides behind a code default."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert _dotted_keys(raw) == set(flatten(Params()))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"loss": {"gama": 2.0}}, "loss.gama: unknown key"),
        ({"loss": {"name": "hinge"}}, "'focal' or 'bce'"),
        ({"loss": {"gamma": -1}}, "loss.gamma"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"backbones": ["resnet18"]}, "backbones.0"),
        ({"backbones": []}, "backbones"),
        ({"data": {"source": "local"}}, "data.local_path"),
        ({"data": {"val_fraction": 0.9}}, "data.val_fraction"),
        ({"evaluate": {"tta": ["spin"]}}, "evaluate.tta"),
        ({"evaluate": {"threshold": 1.5}}, "evaluate.threshold"),
        ({"evaluate": {"threshold": "recall>=2"}}, "evaluate.threshold"),
        ({"unknown_section": 1}, "unknown_section: unknown key"),
        ({"evaluate": {"external": [{"name": "x"}]}}, "evaluate.external.0: external set 'x'"),
        (
            {"evaluate": {"external": [{"name": "x", "path": "a", "sample": {}}]}},
            "either path or sample, not both",
        ),
        ({"evaluate": {"external": [{"name": "a b", "path": "a"}]}}, "evaluate.external.0.name"),
        (
            {"evaluate": {"external": [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]}},
            "evaluate.external: external set names must differ",
        ),
        (
            {"evaluate": {"external": [{"name": "x", "sample": {"acquisition": {"exposure": 0}}}]}},
            "evaluate.external.0.sample.acquisition.exposure",
        ),
    ],
)
def test_invalid_values_name_the_key(raw, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        parse_params(raw)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"evaluate": {"tta": ["scale:0"]}}, "evaluate.tta"),
        ({"evaluate": {"tta": ["identity", "rotate:400"]}}, "evaluate.tta"),
        ({"evaluate": {"tta": ["hflip", "hflip"]}}, "evaluate.tta"),
        ({"evaluate": {"threshold": True}}, "evaluate.threshold"),
        ({"evaluate": {"threshold": float("nan")}}, "evaluate.threshold"),
        ({"evaluate": {"bootstrap": {"seed": -3}}}, "evaluate.bootstrap.seed"),
        ({"registry": {"model_name": ""}}, "registry.model_name"),
        ({"registry": {"model_name": "team/model"}}, "registry.model_name"),
        ({"tracking": {"experiment": ""}}, "tracking.experiment"),
        ({"tracking": {"uri": " "}}, "tracking.uri"),
        ({"loss": {"gamma": float("inf")}}, "loss.gamma"),
        ({"loss": {"pos_weight": float("inf")}}, "loss.pos_weight"),
        ({"loss": {"pos_weight": True}}, "loss.pos_weight"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),
        ({"augment": {"rotation": True}}, "augment.rotation"),
        ({"model": {"pretrained": 1}}, "model.pretrained"),
        ({"data": {"image_size": "64"}}, "data.image_size"),
        ({"data": {"image_size": 16}}, "data.image_size"),
        ({"data": {"kaggle_dataset": "chest-xray"}}, "data.kaggle_dataset"),
        (
            {"data": {"sample": {"train": {"normal": 2, "pneumonia": 9}}}},
            "data.sample.train.normal",
        ),
    ],
)
def test_check_refuses_what_a_later_stage_would_reject(in_tmp, raw, key):
    result = run_cli("check", params=raw)
    assert result.exit_code == 1
    header, *problems = result.output.strip().splitlines()
    assert header == "Error: invalid params:"
    assert len(problems) == 1 and key in problems[0], result.output


def test_duplicate_yaml_keys_are_refused_with_key_and_line(in_tmp):
    (in_tmp / "params.yaml").write_text("train:\n  epochs: 2\n  lr: 0.01\n  epochs: 5\n")
    result = run_cli("check")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: params.yaml is not valid YAML: line 4, column 3: "
        "key 'epochs' appears twice (lines 2 and 4)"
    )


def test_valid_threshold_rules():
    assert parse_params({"evaluate": {"threshold": 0.8}}).evaluate.threshold == 0.8
    assert parse_params({"evaluate": {"threshold": "recall>=0.95"}}).evaluate.threshold
    assert parse_params({"loss": {"pos_weight": "auto"}}).loss.pos_weight == "auto"
    assert parse_params({"loss": {"pos_weight": 2.5}}).loss.pos_weight == 2.5


def test_cli_reports_invalid_params_without_traceback(in_tmp):
    result = run_cli("check", params={"train": {"lr": -1, "scheduler": "step"}})
    assert result.exit_code == 1
    assert "train.lr" in result.output and "train.scheduler" in result.output
    assert "'cosine', 'plateau' or 'none'" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_missing_and_malformed_params(in_tmp):
    assert "params.yaml not found" in run_cli("check").output
    (in_tmp / "params.yaml").write_text("train: [unclosed\n")
    assert "not valid YAML" in run_cli("check").output


def test_help_does_not_import_heavy_libraries():
    """`pneumo --help` must answer at once: torch, mlflow and dvc load only when needed."""
    code = (
        "import sys; from click.testing import CliRunner; from pneumo.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0;"
        "print(sorted(m for m in ('torch', 'mlflow', 'dvc', 'sklearn', 'pandas') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_schema_lists_every_section(in_tmp):
    result = run_cli("schema")
    assert result.exit_code == 0
    for section in ("data", "model", "loss", "augment", "train", "evaluate", "tracking"):
        assert f'"{section}"' in result.output


# --- device settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"device": "gpu"}, "train.device"),
        ({"device": "cuda:x"}, "train.device"),
        ({"amp": True}, "train.amp"),
        ({"amp": "fp8"}, "train.amp"),
        ({"compile": "yes"}, "train.compile"),
        ({"num_workers": "many"}, "train.num_workers"),
        ({"nproc": 0}, "train.nproc"),
        ({"nproc": 3, "batch_size": 32}, "train"),
        ({"nproc": 2, "device": "cuda:1"}, "train"),
    ],
)
def test_invalid_device_settings_are_named(train, key):
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["train"] |= train
    with pytest.raises(ConfigError, match=rf"(?s){key}"):
        parse_params(raw)


def test_device_settings_are_in_the_schema():
    from pneumo.config import TrainConfig

    fields = TrainConfig.model_json_schema()["properties"]
    assert {"device", "amp", "compile", "num_workers", "resume", "nproc"} <= fields.keys()
    for device in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert parse_params({"train": {"device": device}}).train.device == device
