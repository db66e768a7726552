"""The promotion gate, on model versions made directly in a temporary registry (no training).

The versions carry the tags that `pneumo register` writes (:func:`version_tags`);
tests/test_compare_registry.py checks that a real registration writes each of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pneumo.config import parse_params
from pneumo.mlops import promotion, registry
from pneumo.stages import register as register_stage
from tests.conftest import run_cli, store_uri

NAME = "pneumo-classifier"
DATA = "a" * 64
OTHER_DATA = "b" * 64


def version_tags(
    *,
    val_auc: float | None = 0.9,
    val_auc_ci: tuple[float, float] | None = None,
    spread: float | None = 0.2,
    recall: float = 0.9,
    data_hash: str = DATA,
    select_by: str = "val_auc",
    **extra: str | None,
) -> dict[str, str]:
    """The tags `pneumo register` writes on a version (a value of None leaves the tag out);
    the AUC interval is ±0.05 around ``val_auc`` unless given."""
    if val_auc_ci is None and val_auc is not None:
        val_auc_ci = (val_auc - 0.05, val_auc + 0.05)
    interval = dict.fromkeys(registry.FLOOR_CI_TAGS) if val_auc_ci is None else {
        tag: f"{value:.6f}" for tag, value in zip(registry.FLOOR_CI_TAGS, val_auc_ci, strict=True)
    }  # fmt: skip
    tags = {
        "backbone": "resnet50",
        "data_hash": data_hash,
        "weights_sha256": "0" * 64,
        "threshold": "0.500000",
        "select_by": select_by,
        registry.FLOOR_METRIC: None if val_auc is None else f"{val_auc:.6f}",
        registry.SPREAD_TAG: None if spread is None else f"{spread:.6g}",
        "val_recall": f"{recall:.6f}",
        **interval,
        **extra,
    }
    return {key: value for key, value in tags.items() if value is not None}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow database, made once (creating the tables takes seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def client(in_tmp: Path, empty_store: Path) -> MlflowClient:
    """A private copy of the empty store in the working folder, where `pneumo` finds it."""
    shutil.copy(empty_store, in_tmp / "mlflow.db")
    return MlflowClient(tracking_uri=_uri(in_tmp), registry_uri=_uri(in_tmp))


def _uri(folder: Path) -> str:
    return store_uri(folder)


def add_version(client: MlflowClient, *aliases: str, **tags) -> str:
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    version = client.create_model_version(
        NAME, source="file:///nowhere/model", tags=version_tags(**tags)
    ).version
    for alias in aliases:
        client.set_registered_model_alias(NAME, alias, version)
    return str(version)


def settings(**sections) -> dict:
    """params.yaml for these tests: the store in the working folder, the default gate."""
    return {"tracking": {"uri": _uri(Path.cwd())}, **sections}


def promote(*args: str, **sections):
    return run_cli("promote", *args, params=settings(**sections))


def champion(client: MlflowClient) -> str | None:
    aliases = client.get_registered_model(NAME).aliases
    return None if "champion" not in aliases else str(aliases["champion"])


def stored_history(client: MlflowClient) -> list[dict]:
    return json.loads(client.get_registered_model(NAME).tags[promotion.HISTORY_TAG])


def assert_one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    for text in expected:
        assert text in line


# --- floors: every candidate, the first champion included ---------------------------------


def test_the_first_promotion_refuses_a_model_below_the_auc_floor(client):
    add_version(client, "challenger", val_auc=0.79)
    result = promote()
    assert_one_line_error(result, "val_auc 0.7900 is below registry.min_val_auc 0.8", "--force")
    assert champion(client) is None


def test_the_auc_floor_is_read_from_params(client):
    add_version(client, "challenger", val_auc=0.79)
    result = promote(registry={"min_val_auc": 0.7})
    assert result.exit_code == 0 and "promoted" in result.output
    assert champion(client) == "1"


def test_a_constant_model_is_refused_whatever_its_recall(client):
    add_version(client, "challenger", spread=4.7e-7, recall=1.0)
    refused = promote()
    assert_one_line_error(refused, "near-constant predictions", "std 4.7e-07")
    assert champion(client) is None
    forced = promote("--force")
    assert forced.exit_code == 0 and "forced despite: near-constant" in forced.output
    assert champion(client) == "1"


def test_a_version_registered_before_the_gate_is_refused_for_lack_of_its_tags(client):
    add_version(client, "challenger", val_auc=None, spread=None)
    assert_one_line_error(promote(), "no val_auc tag", f"no {registry.SPREAD_TAG} tag")


# --- comparison with the champion ----------------------------------------------------------


def test_a_forced_degenerate_champion_does_not_block_a_better_model(client):
    """Everything PNEUMONIA: recall 1.0, specificity 0, AUC 0.5, constant output."""
    add_version(client, "challenger", val_auc=0.5, spread=0.0, recall=1.0)
    assert promote("--force").exit_code == 0
    better = add_version(client, "challenger", val_auc=0.9, recall=0.85)
    result = promote()
    assert result.exit_code == 0, result.output
    assert "promoted" in result.output and "forced" not in result.output
    assert champion(client) == better


def test_a_significantly_better_model_replaces_a_champion_forced_below_the_floor(client):
    """A chance-level model forced to champion must not outlive a clearly better one that
    still misses the floor; one whose interval overlaps the champion's is refused."""
    add_version(client, "challenger", val_auc=0.29, val_auc_ci=(0.15, 0.43))
    assert promote("--force").exit_code == 0
    overlapping = add_version(client, "challenger", val_auc=0.5, val_auc_ci=(0.40, 0.60))
    assert_one_line_error(promote(), "val_auc 0.5000 is below registry.min_val_auc 0.8")
    on_other_data = add_version(
        client, "challenger", val_auc=0.72, val_auc_ci=(0.61, 0.83), data_hash=OTHER_DATA
    )
    assert_one_line_error(promote(), "below registry.min_val_auc", "validated on different data")
    better = add_version(client, "challenger", val_auc=0.72, val_auc_ci=(0.61, 0.83))
    result = promote()
    assert result.exit_code == 0, result.output
    assert f"version {better} promoted" in result.output and "forced" not in result.output
    why = "significantly above champion v1's 0.2900 (also below it): 95% CI 0.610–0.830 vs "
    assert why + "0.150–0.430" in result.output
    assert champion(client) == better
    last = stored_history(client)[-1]
    assert (last["decision"], last["previous"]) == ("promoted", "1")
    assert why in last["reasons"][0]
    assert {overlapping, on_other_data} == {"2", "3"}


def test_a_champion_above_the_floor_is_never_replaced_by_one_below_it(client):
    add_version(client, "champion", val_auc=0.81, val_auc_ci=(0.70, 0.90))
    # its interval does not matter while the champion passes the floor
    add_version(client, "challenger", val_auc=0.79, val_auc_ci=(0.91, 0.95))
    assert_one_line_error(promote(), "val_auc 0.7900 is below registry.min_val_auc 0.8")


def test_a_candidate_ranked_below_the_champion_is_refused_and_an_equal_one_is_not(client):
    add_version(client, "champion", val_auc=0.9)
    worse = add_version(client, val_auc=0.85, recall=0.99)
    assert_one_line_error(
        promote("--version", worse), "val_auc 0.8500 < champion v1's 0.9000", "not promoted"
    )
    equal = add_version(client, val_auc=0.9, recall=0.5)  # recall is not compared
    assert promote("--version", equal).exit_code == 0
    assert champion(client) == equal


def test_the_champion_is_compared_on_compare_select_by(client):
    sections = {"compare": {"select_by": "val_average_precision"}}
    add_version(
        client, "champion", select_by="val_average_precision", val_average_precision="0.950000"
    )
    lower_ap = add_version(
        client, val_auc=0.99, select_by="val_average_precision", val_average_precision="0.900000"
    )
    assert_one_line_error(
        promote("--version", lower_ap, **sections),
        "val_average_precision 0.9000 < champion v1's 0.9500",
    )


def test_a_version_without_the_select_by_metric_cannot_be_ranked(client):
    """Registered while compare.select_by was val_auc; select_by changed since."""
    add_version(client, "champion", select_by="val_average_precision", val_average_precision="0.9")
    old = add_version(client, "challenger")
    result = promote(compare={"select_by": "val_average_precision"})
    assert_one_line_error(result, f"v{old} has no val_average_precision tag", "cannot be ranked")


def test_models_validated_on_different_data_are_not_compared(client):
    add_version(client, "champion", val_auc=0.95, data_hash=DATA)
    add_version(client, "challenger", val_auc=0.85, data_hash=OTHER_DATA)
    result = promote()
    assert_one_line_error(
        result,
        "validated on different data: champion data_hash aaaaaaaaaaaa, candidate bbbbbbbbbbbb",
    )
    assert "<" not in result.output  # no metric comparison across data sets
    forced = promote("--force")
    assert forced.exit_code == 0 and "forced despite: validated on different data" in forced.output
    assert champion(client) == "2"


def test_promoting_the_champion_again_changes_nothing(client):
    add_version(client, "champion", "challenger")
    result = promote()
    assert result.exit_code == 0 and "already @champion" in result.output
    assert promotion.HISTORY_TAG not in client.get_registered_model(NAME).tags


# --- @challenger at registration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "best", "moves"),
    [
        pytest.param(None, {"val_auc": 0.85}, True, id="no challenger yet"),
        pytest.param({"val_auc": 0.9}, {"val_auc": 0.85}, False, id="worse on the same data"),
        pytest.param({"val_auc": 0.9}, {"val_auc": 0.9}, False, id="equal on the same data"),
        pytest.param({"val_auc": 0.85}, {"val_auc": 0.9}, True, id="better on the same data"),
        pytest.param(
            {"val_auc": 0.95, "data_hash": OTHER_DATA}, {"val_auc": 0.85}, True, id="other data"
        ),
    ],
)
def test_the_challenger_moves_only_to_a_better_model_on_the_same_data(
    client, monkeypatch, tmp_path, current, best, moves
):
    """The new best is registered first, a worse model after it: finish order never decides."""
    before = add_version(client, "challenger", **current) if current is not None else None
    planned = {"resnet50": best, "efficientnet-b0": {"val_auc": 0.6}}
    monkeypatch.setattr(
        register_stage.Comparison, "read", lambda folder: SimpleNamespace(best="resnet50")
    )
    monkeypatch.setattr(
        registry, "register", lambda params, backbone, *_: add_version(client, **planned[backbone])
    )
    backbones = ["resnet50", "efficientnet-b0"]
    params = parse_params(settings(backbones=backbones))
    folders = {backbone: tmp_path / backbone for backbone in backbones}
    done = register_stage.register(params, tmp_path, folders, folders, tmp_path)
    expected = done.versions["resnet50"] if moves else before
    assert done.challenger == expected
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == expected
    assert ("kept" in done.why) is not moves


# --- history -------------------------------------------------------------------------------


def test_every_decision_is_recorded_and_printed_newest_last(client):
    add_version(client, "challenger", val_auc=0.7)
    promote()  # refused: below the floor
    promote("--force")
    add_version(client, "challenger", val_auc=0.9)
    promote()
    entries = stored_history(client)
    assert [(e["decision"], e["version"], e["previous"]) for e in entries] == [
        ("refused", "1", None),
        ("forced", "1", None),
        ("promoted", "2", "1"),
    ]
    assert entries[0]["reasons"] == ["val_auc 0.7000 is below registry.min_val_auc 0.8"]
    assert all(e["at"].endswith("Z") and e["by"] for e in entries)
    assert client.get_model_version(NAME, "2").tags["promotion"].startswith("promoted at ")

    shown = promote("--history")
    assert shown.exit_code == 0
    header, *rows = shown.stdout.strip().splitlines()
    assert header.split()[:4] == ["time", "(UTC)", "decision", "version"]
    assert [row.split()[2:5] for row in rows] == [
        ["refused", "v1", "none"],
        ["forced", "v1", "none"],
        ["promoted", "v2", "v1"],
    ]
    assert rows[0].endswith("val_auc 0.7000 is below registry.min_val_auc 0.8")


def test_the_history_keeps_the_newest_decisions_within_the_tag_size_limit(client):
    add_version(client, "challenger")
    old = [
        {"at": f"2026-01-01T00:00:{i:02d}Z", "decision": "refused", "version": "1",
         "previous": None, "by": "someone", "reasons": ["x" * promotion.REASON_MAX_CHARS] * 3}
        for i in range(60)
    ]  # fmt: skip
    client.set_registered_model_tag(NAME, promotion.HISTORY_TAG, json.dumps(old))
    assert promote("--force", registry={"min_val_auc": 0.95}).exit_code == 0
    text = client.get_registered_model(NAME).tags[promotion.HISTORY_TAG]
    entries = json.loads(text)
    assert len(text) <= promotion.HISTORY_MAX_CHARS
    assert entries[-1]["decision"] == "forced"
    assert entries[:-1] == old[-(len(entries) - 1) :]  # the oldest went first
    assert len(entries[-1]["reasons"][0]) <= promotion.REASON_MAX_CHARS


def test_a_damaged_history_stops_promotion_before_anything_changes(client):
    add_version(client, "challenger")
    client.set_registered_model_tag(NAME, promotion.HISTORY_TAG, "not json")
    assert_one_line_error(promote(), "is not a JSON list of decisions")
    assert champion(client) is None


def test_an_empty_history_says_so(client):
    add_version(client)
    result = promote("--history")
    assert result.exit_code == 0 and "no promotion decisions recorded yet" in result.output


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--version", "99"], "pneumo-classifier has no version 99 (versions 1 to 2)"),
        (["--version", "abc"], "--version takes a version number such as 3, not 'abc'"),
        (["--version", "0"], "not '0'"),
        (["--history", "--force"], "--history only prints the record"),
    ],
)
def test_a_bad_version_is_a_one_line_error(client, args, expected):
    add_version(client, "challenger")
    add_version(client)
    assert_one_line_error(promote(*args), expected)


@pytest.mark.parametrize("args", [[], ["--version", "1"], ["--history"]])
def test_without_a_registered_model_promote_says_what_to_run(client, args):
    assert_one_line_error(
        promote(*args), "no registered model 'pneumo-classifier'", "pneumo register"
    )


def test_a_registered_model_without_versions_says_what_to_run(client):
    client.create_registered_model(NAME)
    assert_one_line_error(promote(), "pneumo-classifier has no versions", "pneumo register")


def test_versions_without_a_challenger_ask_for_one(client):
    add_version(client)
    assert_one_line_error(promote(), "no 'challenger' alias", "--version")
