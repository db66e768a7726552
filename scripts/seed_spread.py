"""Seed-to-seed spread of the sample's results, and the tolerance bands derived from it.

    python scripts/seed_spread.py --seeds 1 2 3 4 5 [--out docs/results/seed-spread-sample.json]

For each seed, the repository's committed files are copied to a temporary folder, ``seed`` is
set in its params.yaml and `dvc repro compare` runs there (fetch to compare; no registry). The
seed draws the phantoms, the patient split, the initial weights, the sampler and the
augmentation, so the spread is wider than what another CPU changes (the same data, other last
bits of training): bands drawn from it are generous on purpose. The band of each model's
metric is three of its standard deviations over the seeds, and at least ``FLOOR``.
tests/test_pipeline.py checks a fresh `dvc repro` against the committed tables with these bands
when it runs on another platform than the one that made them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# (record section, metric): the numbers the README's table shows and the ranking reads.
CHECKED = [("test", m) for m in ("roc_auc", "accuracy", "recall", "specificity")]
CHECKED += [("val", "roc_auc")]
FLOOR = 0.02  # three test images in 160, two validation images in 76


def copy_repository(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO_ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((REPO_ROOT / rel).read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def value(row: dict, section: str, metric: str) -> float:
    cell = row[section][metric]
    return float(cell["value"] if isinstance(cell, dict) else cell)


def run_seed(seed: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix=f"pneumo-seed{seed}-") as folder:
        root = copy_repository(Path(folder))
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["seed"] = seed
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        bin_dir = str(Path(sys.executable).parent)
        subprocess.run(
            [f"{bin_dir}/dvc", "repro", "compare"], cwd=root, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        comparison = json.loads((root / "reports/comparison.json").read_text())
    return {
        name: {f"{s}.{m}": value(row, s, m) for s, m in CHECKED}
        for name, row in comparison["rows"].items()
    }


def summarise(runs: dict[str, dict[str, dict[str, float]]], command: str) -> dict:
    """Mean, standard deviation and band of every checked metric of every model over the
    seeds' ``runs`` ({seed: {model: {metric: value}}})."""
    seeds = list(runs)
    models = sorted(runs[seeds[0]])
    keys = [f"{s}.{m}" for s, m in CHECKED]
    values = {key: {m: [runs[s][m][key] for s in seeds] for m in models} for key in keys}
    sd = {key: {m: float(np.std(v, ddof=1)) for m, v in values[key].items()} for key in keys}
    mean = {key: {m: float(np.mean(v)) for m, v in values[key].items()} for key in keys}
    bands = {key: {m: round(max(FLOOR, 3 * sd[key][m]), 3) for m in models} for key in keys}
    return {
        "command": command,
        "what": "dvc repro compare on the generated sample with each seed; the band of a "
        f"model's metric is max({FLOOR}, 3 x its standard deviation over the seeds)",
        "runs": runs,
        "mean": mean,
        "sd": sd,
        "bands": bands,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs/results/seed-spread-sample.json"
    )
    args = parser.parse_args()
    runs = {}
    for seed in args.seeds:
        runs[str(seed)] = run_seed(seed)
        print(f"seed {seed}: {json.dumps(runs[str(seed)])}", flush=True)
    command = "python scripts/seed_spread.py --seeds " + " ".join(map(str, args.seeds))
    result = summarise(runs, command)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["bands"]))


if __name__ == "__main__":
    main()
