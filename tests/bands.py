"""How far results made on another platform may lie from the committed ones.

The bands come from the sample's measured seed-to-seed spread (scripts/seed_spread.py, written
to docs/results/seed-spread-sample.json). Another CPU changes the last bits of training, not
the data, so it moves results less than another seed does.
"""

from __future__ import annotations

import json
from itertools import combinations

from tests.conftest import REPO_ROOT

SEED_SPREAD = REPO_ROOT / "docs/results/seed-spread-sample.json"


def seed_spread_bands() -> dict[str, dict[str, float]]:
    """{metric: {model: band}}, e.g. ``bands["test.roc_auc"]["resnet50"]``."""
    return json.loads(SEED_SPREAD.read_text())["bands"]


def _value(row: dict, key: str) -> float:
    section, metric = key.split(".")
    cell = row[section][metric]
    return cell["value"] if isinstance(cell, dict) else cell


def outside_bands(committed: dict, fresh: dict, bands: dict[str, dict[str, float]]) -> list[str]:
    """What in ``fresh`` (a comparison.json) breaks the promise against ``committed``: a
    model missing, a metric further from its committed value than its band, or two models
    whose committed test AUC intervals do not overlap now in the other order."""
    problems = [f"{name}: missing" for name in committed["rows"] if name not in fresh["rows"]]
    for name, row in committed["rows"].items():
        if name not in fresh["rows"]:
            continue
        for key, per_model in bands.items():
            band = per_model[name]
            was, now = _value(row, key), _value(fresh["rows"][name], key)
            if abs(now - was) > band:
                problems.append(f"{name} {key}: {now:.3f}, committed {was:.3f} ± {band}")
    for a, b in combinations(sorted(committed["rows"]), 2):
        auc_a, auc_b = (committed["rows"][m]["test"]["roc_auc"] for m in (a, b))
        if auc_a["ci_low"] > auc_b["ci_high"] or auc_b["ci_low"] > auc_a["ci_high"]:
            before = auc_a["value"] > auc_b["value"]
            if a in fresh["rows"] and b in fresh["rows"]:
                now_a, now_b = (fresh["rows"][m]["test"]["roc_auc"]["value"] for m in (a, b))
                if (now_a > now_b) != before:
                    problems.append(
                        f"{a} vs {b}: test AUC order swapped although the "
                        "committed intervals separate them"
                    )
    return problems
