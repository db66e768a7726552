"""Training speed and a real-scale comparison of the backbones on one GPU, in one run.

    python scripts/gpu_benchmark.py ../shared/data/chest_xray_dev.zip --out gpu-results

1. Builds the cache of a Kaggle-layout archive at ``--size`` px with the pipeline's own
   fetch and preprocess stages, in a temporary folder.
2. Throughput: for each backbone and precision (fp16, bf16; ResNet50 also bf16 with torch.compile
   and with deterministic kernels), three epochs of the project's own ``fit`` on the
   ``final`` recipe (GPU batch augmentation, AMP, channels_last); reports training images/s
   and the share of each epoch spent waiting for data over epochs 2-3, with the GPU's
   utilisation sampled through NVML meanwhile.
3. Comparison: every backbone trained from random init with the ``final`` recipe, as many
   epochs as ``--budget`` seconds allow at the measured speed, then evaluated with TTA and
   the threshold chosen on the validation split (the ``evaluate`` stage's own ``assess``).

Results go to ``<out>/gpu_benchmark.json`` after every step, so a run cut short keeps what it
measured. ``--device cpu --size 32 --quick`` runs the same code on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import yaml

BACKBONES = ("densenet121", "resnet50", "efficientnet-b4")
APPROACH = Path(__file__).resolve().parents[1] / "configs/approaches/final.yaml"


class UtilisationSampler:
    """Mean GPU utilisation (NVML, every 50 ms) between ``mark`` calls."""

    def __init__(self, device_index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.perf_counter(), rates.gpu))

    def mean_between(self, start: float, end: float) -> float | None:
        window = [gpu for t, gpu in self.samples if start <= t <= end]
        return round(sum(window) / len(window), 1) if window else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def recipe(archive: Path, size: int, device: str) -> dict:
    """params.yaml of the `final` recipe with the validation-chosen threshold, on the archive."""
    from pneumo.config import Params

    raw = Params().model_dump(mode="json")
    for section, values in yaml.safe_load(APPROACH.read_text()).items():
        raw[section] = raw[section] | values if isinstance(values, dict) else values
    raw["evaluate"]["threshold"] = "youden"
    raw["data"] |= {"source": "local", "local_path": str(archive.resolve()), "image_size": size}
    raw["train"] |= {"device": device, "deterministic": False, "amp": "bf16"}
    return raw


def build_cache(raw: dict, root: Path, workers: int) -> float:
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    for stage in (["fetch"], ["preprocess", "--workers", str(workers)]):
        subprocess.run([sys.executable, "-m", "pneumo", *stage], cwd=root, check=True)
    return time.perf_counter() - started


def with_train(raw: dict, **train) -> dict:
    return raw | {"train": raw["train"] | train}


def throughput(raw, root, device, backbone, sampler, **train) -> dict:
    """Epochs 2-3 of a 3-epoch fit: images/s, data-wait share, GPU utilisation."""
    from pneumo.config import parse_params
    from pneumo.train import fit

    params = parse_params(with_train(raw, epochs=3, patience=99, **train))
    ends: list[float] = []
    started = time.perf_counter()
    result = fit(params, backbone, root / "data/processed", device,
                 on_epoch=lambda _: ends.append(time.perf_counter()))  # fmt: skip
    measured = result.history[1:]
    return {
        "backbone": backbone,
        **train,
        "batch_size": params.train.batch_size,
        "images_per_second": round(sum(h["images_per_second"] for h in measured) / 2, 1),
        "data_wait_fraction": round(sum(h["data_wait_fraction"] for h in measured) / 2, 4),
        "first_epoch_images_per_second": round(result.history[0]["images_per_second"], 1),
        "gpu_utilisation_percent": sampler.mean_between(ends[0], ends[-1]) if sampler else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def comparison(raw, root, device, backbone, epochs: int) -> dict:
    """Train from random init, then evaluate with TTA and a validation-chosen threshold."""
    from pneumo.config import parse_params
    from pneumo.data import CachedSplit
    from pneumo.evaluate import assess
    from pneumo.train import fit

    params = parse_params(with_train(raw, epochs=epochs))
    started = time.perf_counter()
    result = fit(params, backbone, root / "data/processed", device)
    trained = time.perf_counter() - started
    splits = {name: CachedSplit.load(root / "data/processed", name) for name in ("val", "test")}
    metrics, _, threshold = assess(result.model, splits, params.evaluate, device)
    return {
        "backbone": backbone,
        "epochs": epochs,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "train_seconds": round(trained, 1),
        "images_per_second": round(
            sum(h["images_per_second"] for h in result.history) / len(result.history), 1
        ),
        "val_auc_by_epoch": [round(h["val_auc"], 4) for h in result.history],
        "threshold": round(threshold, 4),
        "test": metrics["test"],
        "val": metrics["val"],
        "n_test": metrics["n_test"],
        "n_val": metrics["n_val"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="throughput runs")
    parser.add_argument("--compare-batch-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for step 3")
    parser.add_argument("--workers", type=int, default=8, help="preprocess processes")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--epochs", type=int, help="fixed epochs for step 3 (else by budget)")
    args = parser.parse_args()

    import torch

    from pneumo.train import resolve_device

    device = resolve_device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": __import__("os").cpu_count(),
        "size": args.size,
        "throughput": [],
        "comparison": [],
        "errors": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_benchmark.json"

    def save() -> None:
        out_file.write_text(json.dumps(results, indent=2) + "\n")

    def attempt(label: str, call):
        try:
            return call()
        except Exception:  # keep measuring the other configurations
            results["errors"].append({"what": label, "traceback": traceback.format_exc()})
            print(f"FAILED {label}\n{traceback.format_exc()}", flush=True)
            return None
        finally:
            save()

    sampler = UtilisationSampler(device.index or 0) if device.type == "cuda" else None
    raw = recipe(args.archive, args.size, str(device))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["preprocess_seconds"] = round(build_cache(raw, root, args.workers), 1)
        report = json.loads((root / "data/processed/report.json").read_text())
        results["counts"] = report["counts"]
        print("cache:", report["counts"], flush=True)

        configs = [(b, {"amp": amp}) for b in BACKBONES for amp in ("fp16", "bf16")]
        configs += [
            ("resnet50", {"amp": "bf16", "compile": True}),
            ("resnet50", {"amp": "bf16", "deterministic": True}),
        ]
        if args.quick:
            configs = configs[2:4]
        if args.skip_throughput:
            configs = []
        for backbone, train in configs:
            row = attempt(
                f"throughput {backbone} {train}",
                lambda b=backbone, t=train: throughput(
                    raw, root, device, b, sampler, batch_size=args.batch_size, **t
                ),
            )
            if row:
                results["throughput"].append(row)
                print("throughput", json.dumps(row), flush=True)

        n_train = sum(report["counts"]["train"].values())
        speed = {
            r["backbone"]: r["images_per_second"]
            for r in results["throughput"]
            if r["amp"] == "bf16" and not r.get("compile") and not r.get("deterministic")
        }
        compare_raw = with_train(raw, batch_size=args.compare_batch_size, deterministic=True)
        for backbone in BACKBONES:
            # Smaller batches than the throughput runs, validation every epoch: assume half
            # the measured speed when sizing the epochs to the remaining budget.
            share = args.budget / len(BACKBONES)
            epoch_seconds = n_train / (0.5 * speed.get(backbone, 100.0)) + 1.0
            epochs = args.epochs or int(max(2, min(40, share // epoch_seconds)))
            row = attempt(
                f"comparison {backbone}",
                lambda b=backbone, e=epochs: comparison(compare_raw, root, device, b, e),
            )
            if row:
                results["comparison"].append(row)
                test = row["test"]
                print(
                    f"comparison {backbone}: {row['epochs_run']} epochs in "
                    f"{row['train_seconds']} s, test AUC {test['roc_auc']['value']:.4f} "
                    f"acc {test['accuracy']['value']:.4f} at threshold {row['threshold']}",
                    flush=True,
                )
    if sampler:
        sampler.close()
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "comparison"}, indent=1))


if __name__ == "__main__":
    main()
