"""The registered model: logged from code, a signature, complete requirements, checked
weights, and served over HTTP by `mlflow models serve` as users run it."""

from __future__ import annotations

import ast
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement

from pneumo.core.inference import SHIPPED_MODULES
from pneumo.core.runtime import IntegrityError
from pneumo.files import sha256_of
from pneumo.mlops.registered import MANIFEST_TAG
from tests.conftest import (
    BATCH_TOLERANCE,
    answers,
    expected_answers,
    free_port,
    run_cli,
    store_uri,
    tool_env,
)

NAME = "pneumo-classifier"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def registered(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny project after compare and register, then promote."""
    root = tmp_path_factory.mktemp("registered") / "project"
    shutil.copytree(tiny_project, root)
    previous = Path.cwd()
    os.chdir(root)
    try:
        # --force: the serving tests must not hang on whether the tiny models pass the gate
        for command in (("compare",), ("register",), ("promote", "--force")):
            result = run_cli(*command)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(previous)
    return root


@pytest.fixture
def champion_dir(registered: Path, tmp_path: Path) -> Path:
    """The champion's logged files, downloaded from the artifact store."""
    mlflow.set_tracking_uri(store_uri(registered))
    return Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path)))


def _test_image(project: Path, row: int = 0) -> Path:
    """A test image, in the same order for every backbone's predictions.csv."""
    image = pd.read_csv(project / "reports/eval/resnet50/predictions.csv").image[row]
    return project / "data/raw" / image


def test_the_model_is_code_with_a_signature_and_no_pickle(registered, champion_dir):
    mlmodel = yaml.safe_load((champion_dir / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert not list(champion_dir.rglob("*.pkl"))
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "string", "name": "image", "required": True}
    ]
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == [
        "probability",
        "label",
        "in_distribution",
        "gate_score",
        "reason",
    ]
    package = champion_dir / "code/pneumo"
    shipped = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert shipped == set(SHIPPED_MODULES)
    weights = champion_dir / flavor["artifacts"]["model"]["path"] / "model.pt"
    assert flavor["config"]["weights_sha256"] == sha256_of(weights)


def test_the_input_example_is_a_real_test_image(registered, champion_dir):
    example = json.loads((champion_dir / "serving_input_example.json").read_text())
    [[encoded]] = example["dataframe_split"]["data"]
    assert base64.b64decode(encoded) == _test_image(registered).read_bytes()


# Loads the champion in a new process as `mlflow models serve` does, predicts, and reports
# which pneumo modules it imported and from where.
_IMPORTS_PROBE = """
import json, sys
import mlflow
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.DataFrame({"image": [sys.argv[2]]})).to_json(orient="records"))
print(json.dumps({m: getattr(mod, "__file__", None) for m, mod in sys.modules.items()
                  if m.startswith("pneumo")}))
"""


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names installed by ``requirements``, with their dependencies."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for extra in distribution(name).requires or []:
            dependency = Requirement(extra)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                pending.append(dependency)
    return seen


def _imported_names(source: Path) -> set[str]:
    """Top-level modules a file imports anywhere, lazy imports inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_model_loads_only_its_shipped_code(registered, champion_dir):
    encoded = base64.b64encode(_test_image(registered).read_bytes()).decode()
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, str(champion_dir), encoded],
        capture_output=True, text=True, cwd=champion_dir, env=tool_env(),
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    prediction, pneumo_modules = (json.loads(x) for x in probe.stdout.strip().splitlines()[-2:])
    assert 0 <= prediction[0]["probability"] <= 1
    code_dir = str((champion_dir / "code").resolve())
    for module, file in pneumo_modules.items():
        assert file and file.startswith(code_dir), (module, file)
        assert Path(file).relative_to(Path(code_dir) / "pneumo").as_posix() in SHIPPED_MODULES


def test_everything_the_model_code_imports_is_in_its_requirements(champion_dir):
    """Every import in the logged code (serving.py and the shipped modules, lazy branches
    such as DICOM and EfficientNet included) resolves to a distribution that
    requirements.txt installs. (Optional imports that torch or MLflow make when a package
    happens to be installed are those libraries' own business.)"""
    sources = [champion_dir / "serving.py", *(champion_dir / "code/pneumo").rglob("*.py")]
    imported = set().union(*map(_imported_names, sources)) - {"pneumo", "__future__"}
    covered = _closure((champion_dir / "requirements.txt").read_text().split())
    owners = packages_distributions()
    missing = {
        module: owners.get(module, ["not installed"])
        for module in sorted(imported - set(sys.stdlib_module_names))
        if not {d.lower().replace("_", "-") for d in owners.get(module, [])} & covered
    }
    assert not missing, f"imported but not installed by requirements.txt: {missing}"


def test_tampered_weights_in_the_artifact_store_are_refused(champion_dir):
    folder = next(champion_dir.glob("artifacts/*"))
    weights = bytearray((folder / "model.pt").read_bytes())
    weights[-100] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(weights))
    with pytest.raises(IntegrityError, match="inference.json recorded"):
        mlflow.pyfunc.load_model(str(champion_dir))
    # Rewriting the folder's own record too is caught by the one made at registration.
    settings = json.loads((folder / "inference.json").read_text())
    settings["weights_sha256"] = sha256_of(folder / "model.pt")
    (folder / "inference.json").write_text(json.dumps(settings))
    with pytest.raises(IntegrityError, match="the registration recorded"):
        mlflow.pyfunc.load_model(str(champion_dir))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _append_a_line(path: Path) -> None:
    path.write_text(path.read_text() + "\nraise SystemExit('changed code ran')\n")


@pytest.mark.parametrize(
    ("file", "change", "problem"),
    [
        ("code/pneumo/core/runtime.py", _append_a_line, "has SHA-256"),
        ("serving.py", _append_a_line, "has SHA-256"),
        ("MLmodel", _append_a_line, "has SHA-256"),
        ("artifacts/*/model.pt", _flip_a_byte, "has SHA-256"),
        ("artifacts/*/model.onnx", _flip_a_byte, "has SHA-256"),
        ("code/pneumo/core/models.py", Path.unlink, "is missing from the artifact store"),
        (
            "code/pneumo/sitecustomize.py",
            lambda p: p.write_text("import os"),
            "is in the artifact store but was not registered",
        ),
    ],
    ids=["shipped-module", "serving", "mlmodel", "weights", "onnx", "deleted", "added"],
)
def test_a_changed_file_in_the_artifact_store_is_refused_before_it_loads(
    registered, monkeypatch, file, change, problem
):
    """Every file of the registered version is pinned by the tag recorded at registration;
    `pneumo predict` refuses, naming the file, before MLflow reads any of them."""
    monkeypatch.chdir(registered)
    mlflow.set_tracking_uri(store_uri(registered))
    store = Path(mlflow.artifacts.download_artifacts(CHAMPION))  # the local store itself
    target = next(store.glob(file), store / file)
    original = target.read_bytes() if target.exists() else None
    change(target)
    try:
        result = run_cli("predict", str(_test_image(registered)))
    finally:
        if original is None:
            target.unlink()
        else:
            target.write_bytes(original)
    assert result.exit_code == 1
    name = target.relative_to(store).as_posix()
    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version
    assert f"Error: {NAME} version {version}: {name} {problem}" in result.output
    assert result.output.rstrip().endswith("refusing to load it")
    assert "changed code ran" not in result.output
    assert run_cli("predict", str(_test_image(registered))).exit_code == 0  # restored


def test_bytecode_beside_the_shipped_modules_is_left_behind(registered, monkeypatch):
    """Python writes __pycache__ into the store when `mlflow models serve` imports the shipped
    modules from it. Not registered, it is not copied out, so it neither loads nor blocks."""
    monkeypatch.chdir(registered)
    mlflow.set_tracking_uri(store_uri(registered))
    store = Path(mlflow.artifacts.download_artifacts(CHAMPION))
    planted = store / "code/pneumo/core/__pycache__/runtime.cpython-311.pyc"
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(b"not bytecode: importing it would fail")
    try:
        result = run_cli("predict", str(_test_image(registered)))
    finally:
        shutil.rmtree(planted.parent)
    assert result.exit_code == 0, result.output


def test_a_version_registered_without_a_manifest_is_refused_until_register_records_one(
    registered, monkeypatch
):
    monkeypatch.chdir(registered)
    client = mlflow.MlflowClient(store_uri(registered))
    version = client.get_model_version_by_alias(NAME, "champion").version
    recorded = client.get_model_version(NAME, version).tags[MANIFEST_TAG]
    client.delete_model_version_tag(NAME, version, MANIFEST_TAG)
    refused = run_cli("predict", str(_test_image(registered)))
    assert refused.exit_code == 1 and "has no artifact_sha256 tag" in refused.output
    assert run_cli("register").exit_code == 0
    assert client.get_model_version(NAME, version).tags[MANIFEST_TAG] == recorded
    assert run_cli("predict", str(_test_image(registered))).exit_code == 0


def test_predict_from_the_registry_matches_the_model_folder(registered, monkeypatch):
    monkeypatch.chdir(registered)
    champion = mlflow.MlflowClient(store_uri(registered))
    backbone = champion.get_model_version_by_alias(NAME, "champion").tags["backbone"]
    images = [str(_test_image(registered, row)) for row in range(3)]
    from_registry = run_cli("predict", *images, "--output", "json")
    from_folder = run_cli("predict", *images, "--model", f"models/{backbone}", "--output", "json")
    assert from_registry.exit_code == 0, from_registry.output
    assert json.loads(from_registry.stdout) == json.loads(from_folder.stdout)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _records(records: list[dict]) -> bytes:
    return json.dumps({"dataframe_records": records}).encode()


@pytest.fixture(scope="module")
def served(registered: Path):
    """`mlflow models serve -m models:/…@champion --env-manager local` on a free port."""
    port = free_port()
    env = tool_env() | {
        "MLFLOW_TRACKING_URI": store_uri(registered),
        # mlflow runs `uvicorn` from PATH: this interpreter's scripts, as in an active venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    log = (registered / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=registered, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail((registered / "serve.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.mark.slow
def test_the_served_champion_answers_its_input_example_and_a_real_image(
    registered, served, champion_dir
):
    example = (champion_dir / "serving_input_example.json").read_bytes()
    status, answer = _post(f"{served}/invocations", example)
    assert status == 200, answer
    [row] = answer["predictions"]
    assert set(row) == {"probability", "label", "in_distribution", "gate_score", "reason"}

    # Eight test images, REFER among the answers wherever the champion's band holds one.
    images = [_test_image(registered, row) for row in range(8)]
    records = [{"image": base64.b64encode(image.read_bytes()).decode()} for image in images]
    status, answer = _post(
        f"{served}/invocations", json.dumps({"dataframe_records": records}).encode()
    )
    assert status == 200, answer
    client = mlflow.MlflowClient(store_uri(registered))
    backbone = client.get_model_version_by_alias(NAME, "champion").tags["backbone"]
    expected = pd.read_csv(registered / f"reports/eval/{backbone}/predictions.csv").head(8)
    served_rows = pd.DataFrame(answer["predictions"])
    np.testing.assert_allclose(served_rows.probability, expected.probability, atol=BATCH_TOLERANCE)
    assert answers(served_rows.label) == expected_answers(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([{"picture": "aGVsbG8="}], "missing inputs ['image']"),
        ([{"image": "not base64!"}], "row 0: 'image' must be a base64-encoded image file"),
        ([{"image": "aGVsbG8="}], "row 0: 'image' must be a base64-encoded image file"),
    ],
)
def test_a_wrong_payload_gets_a_4xx_with_a_one_line_reason(served, records, reason):
    status, answer = _post(
        f"{served}/invocations", json.dumps({"dataframe_records": records}).encode()
    )
    assert 400 <= status < 500
    last_line = answer["message"].strip().splitlines()[-1]
    assert reason in last_line
    assert "Traceback" not in json.dumps(answer)
