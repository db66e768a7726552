"""Pointing game on the generated sample: does Grad-CAM's peak land on the lesion?

    python scripts/pointing_game.py [--params reports/params.json]

Run in the repository after `dvc repro` on the generated sample (``data.source: sample``). For
every PNEUMONIA image of the test split and every model folder of the comparison, the Grad-CAM
map (the layer `pneumo predict --explain` uses) is compared with the lesion mask the phantom
generator drew, brought to the cache's size as preprocess brings the image (a pixel counts as
lesion when at least half of it is). A hit is a peak within the pointing game's tolerance of the
mask (15 px at 224 px, Zhang et al. 2016: 3.2 px at 48 px); ``strict`` counts peaks on the mask
itself. ``chance`` is the hit rate of a peak placed uniformly at random (the share of the image
within the tolerance of the lesion). Prints JSON; ``champion`` is the comparison's best, the
model `register` offers as @challenger.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumo import paths
from pneumo.config import CLASS_NAMES, parse_params
from pneumo.core.data import CachedSplit
from pneumo.core.explain import (
    POINTING_TOLERANCE,
    grad_cam,
    pointing_game,
    target_layer,
    within_reach,
)
from pneumo.core.images import fit_square
from pneumo.core.inference import load_network
from pneumo.core.sources import sample_lesion_masks
from pneumo.records import Comparison


def lesion_hits(params_file: Path) -> dict:
    params = parse_params(json.loads(params_file.read_text()))
    if params.data.source != "sample":
        raise SystemExit("the pointing game needs the generated sample (data.source: sample)")
    data = params.data
    test = CachedSplit.load(paths.PROCESSED_DIR, "test")
    sick = test.manifest.index[test.manifest.label == CLASS_NAMES[1]].to_numpy()
    drawn = sample_lesion_masks(data.sample, params.seed, "test")
    masks = np.stack([
        fit_square(drawn[path].astype(np.uint8) * 255, data.image_size, data.resize) >= 128
        for path in test.manifest.path[sick]
    ])  # fmt: skip
    tolerance = POINTING_TOLERANCE * data.image_size
    comparison = Comparison.read(paths.REPORTS_DIR)
    models = {}
    for backbone in comparison.rows:
        if not paths.model_dir(backbone).is_dir():
            continue  # the ensemble has no folder of its own
        model, card = load_network(paths.model_dir(backbone))
        name, layer = target_layer(model, card.image_size)
        cams = grad_cam(model, np.asarray(test.images)[sick], layer)
        models[backbone] = {
            "layer": name,
            "hit_rate": round(float(pointing_game(cams, masks, tolerance).mean()), 3),
            "strict": round(float(pointing_game(cams, masks).mean()), 3),
        }
    return {
        "images": int(len(sick)),
        "tolerance_px": round(tolerance, 2),
        "chance": round(float(within_reach(masks, tolerance).mean()), 3),
        "champion": comparison.best,
        "models": models,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=paths.RESOLVED_PARAMS)
    print(json.dumps(lesion_hits(parser.parse_args().params), indent=1))


if __name__ == "__main__":
    main()
