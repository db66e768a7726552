"""Platforms: what a result records about where it was made, the portable kernels that give
the same bits under another instruction set, and the bands that hold across platforms."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo import platforms
from tests.bands import outside_bands, seed_spread_bands
from tests.conftest import REPO_ROOT, tool_env, write_params

# Another machine, simulated: the instruction sets torch's own kernels (ATen) and oneDNN's
# may use. A level the CPU lacks falls back to what it has.
AVX512 = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

TRAIN_AND_HASH = """
import hashlib, json
from pathlib import Path
from pneumo.config import load_params
from pneumo.platforms import describe, prepare_kernels
params = load_params("params.yaml")
prepare_kernels(params.train.deterministic)
import torch
from pneumo.core.loop import fit
model = fit(params, "resnet50", Path("data/processed"), torch.device("cpu")).model
weights = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
print(json.dumps({"sha256": hashlib.sha256(weights).hexdigest(), "platform": describe()}))
"""


def _train(project: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_HASH], cwd=project, env=tool_env(**env),
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "avx512f" in cpuinfo.read_text()


@pytest.mark.slow
@pytest.mark.scenario
def test_portable_kernels_give_the_same_bits_under_two_instruction_sets(project_copy):
    """A machine with AVX-512 (and MKL free to use it) and one with AVX2 only: the portable
    kernels pin what differs, so both train the same weights."""
    write_params(project_copy, epochs=1, deterministic="portable")
    wide = _train(project_copy, AVX512 | {"MKL_CBWR": "AUTO"})
    narrow = _train(project_copy, AVX2 | {"MKL_CBWR": "AVX2"})
    assert wide["platform"] == narrow["platform"]
    assert wide["platform"]["kernels"] == "portable" and wide["platform"]["isa"] == "AVX2"
    assert wide["platform"]["threads"] == platforms.PORTABLE_THREADS
    assert wide["sha256"] == narrow["sha256"]


@pytest.mark.slow
@pytest.mark.scenario
def test_native_kernels_repeat_on_one_platform_and_differ_under_another(project_copy):
    """The simulation is real: the default kernels give other bits under the other
    instruction set (on a CPU that has both), and the same bits when nothing changes."""
    if not _has_avx512():
        pytest.skip("this CPU has no AVX-512: both simulated platforms are the same")
    write_params(project_copy, epochs=1)
    first, again, narrow = (_train(project_copy, env) for env in (AVX512, AVX512, AVX2))
    assert first == again
    assert first["sha256"] != narrow["sha256"]
    assert first["platform"] != narrow["platform"]


def test_portable_kernels_must_be_chosen_before_torch_loads(monkeypatch):
    import torch  # noqa: F401  (loaded, as in this test process)

    for name in platforms.PORTABLE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(platforms.PortableKernelsError, match="before torch loads"):
        platforms.prepare_kernels("portable")
    platforms.prepare_kernels(True)  # the native kernels need nothing beforehand


def test_portable_kernels_are_refused_off_x86(monkeypatch):
    monkeypatch.setattr(platforms.platform, "machine", lambda: "aarch64")
    with pytest.raises(platforms.PortableKernelsError, match="x86-64"):
        platforms.prepare_kernels("portable")


def test_a_description_names_what_the_bits_depend_on():
    described = platforms.describe()
    assert {"machine", "cpu_vendor", "cpu", "isa", "kernels", "threads"} <= set(described)
    assert {"torch", "numpy", "pillow"} <= set(described)
    assert "gpu" not in described  # no CUDA device given
    line = platforms.summary(described)
    assert described["cpu"] in line and f"{described['threads']} threads" in line
    assert platforms.distinct([described, {}, dict(described)]) == [described]


# --- the bands a result made elsewhere must stay within ------------------------------------


@pytest.fixture
def committed() -> dict:
    return json.loads((REPO_ROOT / "reports/comparison.json").read_text())


def test_the_committed_results_are_within_their_own_bands(committed):
    assert outside_bands(committed, committed, seed_spread_bands()) == []


def test_a_metric_beyond_its_band_is_named(committed):
    bands = seed_spread_bands()
    fresh = copy.deepcopy(committed)
    name = committed["best"]
    band = bands["test.accuracy"][name]
    cell = fresh["rows"][name]["test"]["accuracy"]
    cell["value"] -= band * 0.9
    assert outside_bands(committed, fresh, bands) == []
    cell["value"] -= band * 0.2
    assert outside_bands(committed, fresh, bands) == [
        f"{name} test.accuracy: {cell['value']:.3f}, committed "
        f"{committed['rows'][name]['test']['accuracy']['value']:.3f} ± {band}"
    ]
    del fresh["rows"][name]
    assert f"{name}: missing" in outside_bands(committed, fresh, bands)


def test_models_that_the_intervals_separate_must_keep_their_order():
    def row(auc: float, low: float, high: float) -> dict:
        return {"test": {"roc_auc": {"value": auc, "ci_low": low, "ci_high": high}}, "val": {}}

    committed = {"rows": {"a": row(0.95, 0.93, 0.97), "b": row(0.85, 0.80, 0.90)}}
    swapped = {"rows": {"a": row(0.85, 0.80, 0.90), "b": row(0.95, 0.93, 0.97)}}
    assert outside_bands(committed, swapped, {}) == [
        "a vs b: test AUC order swapped although the committed intervals separate them"
    ]
    overlapping = {"rows": {"a": row(0.95, 0.85, 0.99), "b": row(0.90, 0.80, 0.96)}}
    swapped_overlapping = {"rows": {"a": row(0.90, 0.8, 0.96), "b": row(0.95, 0.85, 0.99)}}
    assert outside_bands(overlapping, swapped_overlapping, {}) == []


def test_the_kernel_setting_is_validated_with_its_name():
    from pneumo.config import ConfigError, parse_params

    assert parse_params({"train": {"deterministic": "portable"}}).train.deterministic == "portable"
    assert parse_params({"train": {"deterministic": False}}).train.deterministic is False
    with pytest.raises(ConfigError, match="train.deterministic"):
        parse_params({"train": {"deterministic": "portabel"}})
