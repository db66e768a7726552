"""Training throughput of each backbone: CUDA with AMP + channels_last (or the CPU).

    python scripts/gpu_throughput.py ../shared/data/chest_xray_dev.zip --size 224 --epochs 2

Builds the cache from a Kaggle-layout archive in a temporary folder, then trains every backbone
with the project's own `fit` (the recipe in params.yaml, random init) and prints images/s per
epoch and the validation AUC. `--device cpu` runs the same code on the CPU for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--backbones", nargs="+", default=["densenet121", "resnet50", "efficientnet-b4"]
    )
    args = parser.parse_args()

    import torch

    from pneumo.config import load_params, parse_params
    from pneumo.train import fit

    base = load_params().model_dump(mode="json")
    base["data"] |= {"source": "local", "local_path": str(args.archive.resolve()),
                     "image_size": args.size}  # fmt: skip
    base["train"] |= {"epochs": args.epochs, "batch_size": args.batch_size,
                      "num_workers": args.workers, "device": args.device, "patience": 99}  # fmt: skip
    params = parse_params(base)
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {args.size} px, batch {args.batch_size}, "
          f"amp={params.train.amp and args.device == 'cuda'}, "
          f"channels_last={params.train.channels_last and args.device == 'cuda'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(base))
        for stage in ("fetch", "preprocess"):
            subprocess.run([sys.executable, "-m", "pneumo", stage], cwd=root, check=True)
        results = {}
        for backbone in args.backbones:
            started = time.perf_counter()
            result = fit(params, backbone, root / "data/processed", device)
            results[backbone] = {
                "images_per_second_by_epoch": [round(h["images_per_second"], 1)
                                               for h in result.history],
                "val_auc_by_epoch": [round(h["val_auc"], 4) for h in result.history],
                "seconds": round(time.perf_counter() - started, 1),
            }  # fmt: skip
            print(backbone, json.dumps(results[backbone]), flush=True)


if __name__ == "__main__":
    main()
