"""Training speed and a real-scale comparison of the backbones on one GPU, in one run.

    python scripts/gpu_benchmark.py ../shared/data/chest_xray_dev.zip --out gpu-results

1. Breakdown of ResNet50's step on batches already on the GPU (no loader): pneumo's
   ``train_step`` (``model(x); loss.backward(); opt.step()`` under autocast) with AdamW
   foreach and fused, fp16 and bf16, with and without the batch augmentation; the
   augmentation alone; the host-synchronising calls of one step
   (``torch.cuda.set_sync_debug_mode``) and a profiler table (``<out>/step_profile.txt``).
2. Throughput: builds the cache of a Kaggle-layout archive at ``--size`` px with the
   pipeline's own fetch and preprocess stages in a temporary folder, then for each backbone
   and precision (ResNet50 also with foreach AdamW, deterministic kernels and torch.compile)
   three epochs of the project's own ``fit`` on the ``final`` recipe (GPU batch
   augmentation, AMP, channels_last); reports training images/s and the share of each epoch
   spent waiting for data over epochs 2-3, with the GPU's utilisation sampled through NVML.
3. Comparison: every backbone trained from random init with the ``final`` recipe, as many
   epochs as fit before ``--deadline`` at the measured epoch time, then evaluated with TTA and
   the threshold chosen on the validation split (the ``evaluate`` stage's own ``assess``).

``--sections`` picks among the three; no new measurement starts after ``--deadline``.
Results go to ``<out>/gpu_benchmark.json`` after every step, so a run cut short keeps what it
measured. ``--device cpu --size 32 --quick`` runs the same code on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _timed_steps(step, steps: int, warmup: int) -> float:
    """Seconds per step, host clock around ``steps`` calls after ``warmup`` untimed ones."""
    import torch

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps


def step_breakdown(raw: dict, device, size: int, batch_size: int, sampler, out: Path,
                   steps: int = 25, deadline: float = float("inf")) -> list[dict]:  # fmt: skip
    """ResNet50 training steps on uint8 batches already on the GPU: where a step's time goes."""
    import warnings

    import torch

    from pneumo.config import parse_params
    from pneumo.core.data import BatchAugmentation
    from pneumo.core.loop import Precision, train_step
    from pneumo.core.losses import build_loss
    from pneumo.core.models import build_model
    from pneumo.platforms import use_kernels

    params = parse_params(raw)
    use_kernels(False)
    net = build_model("resnet50", dropout=params.model.dropout).to(device)
    net = net.to(memory_format=torch.channels_last)
    augment = BatchAugmentation(params.augment).to(device)
    loss_fn = build_loss(params.loss, 1, 3).to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def batch(n: int) -> tuple:
        pixels = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, device=device,
                               generator=generator)  # fmt: skip
        targets = (torch.rand(n, device=device, generator=generator) < 0.75).float()
        return pixels.contiguous(memory_format=torch.channels_last), targets

    def make_step(amp: str, fused: bool, augmented: bool, n: int):
        precision = Precision({"fp16": torch.float16, "bf16": torch.bfloat16}[amp], True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused)
        scaler = precision.grad_scaler()
        pixels, targets = batch(n)
        return lambda: train_step(net, pixels, targets, loss_fn, optimizer, precision, scaler,
                                  augment if augmented else None)  # fmt: skip

    net.train()
    variants = [
        ("bare", "fp16", False, False, batch_size),
        ("bare", "fp16", True, False, batch_size),
        ("bare", "bf16", False, False, batch_size),
        ("bare", "bf16", True, False, batch_size),
        ("augmented", "fp16", True, True, batch_size),
        ("augmented", "bf16", True, True, batch_size),
        ("bare", "bf16", True, False, 2 * batch_size),
        ("augmented", "bf16", True, True, 2 * batch_size),
    ]
    rows = []
    for what, amp, fused, augmented, n in variants:
        if time.perf_counter() > deadline:
            break
        step = make_step(amp, fused, augmented, n)
        window = time.perf_counter()
        seconds = _timed_steps(step, steps, warmup=8)
        rows.append({
            "what": what, "amp": amp, "optimizer": "fused" if fused else "foreach",
            "batch_size": n, "ms_per_step": round(1000 * seconds, 2),
            "images_per_second": round(n / seconds, 1),
            "gpu_utilisation_percent": sampler.mean_between(window, time.perf_counter())
            if sampler else None,
        })  # fmt: skip
        print("breakdown", json.dumps(rows[-1]), flush=True)

    pixels, _ = batch(batch_size)
    seconds = _timed_steps(lambda: augment(pixels), steps, warmup=3)
    rows.append({"what": "augmentation alone", "batch_size": batch_size,
                 "ms_per_step": round(1000 * seconds, 2),
                 "images_per_second": round(batch_size / seconds, 1)})  # fmt: skip
    print("breakdown", json.dumps(rows[-1]), flush=True)

    if device.type != "cuda":  # the CPU smoke test stops here
        return rows
    # Which calls make the host wait for the GPU (each one empties the launch queue).
    for label, step in (
        ("fp16 foreach + GradScaler, augmented", make_step("fp16", False, True, batch_size)),
        ("bf16 fused, augmented", make_step("bf16", True, True, batch_size)),
    ):
        step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sites: dict[str, int] = {}
        for warning in caught:
            site = f"{warning.filename}:{warning.lineno}"
            sites[site] = sites.get(site, 0) + 1
        rows.append({"what": f"synchronising calls in one step: {label}",
                     "count": len(caught), "sites": sites})  # fmt: skip
        print("breakdown", json.dumps(rows[-1]), flush=True)

    step = make_step("bf16", True, True, batch_size)
    step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profile:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = profile.key_averages()
    (out / "step_profile.txt").write_text(
        "3 steps: ResNet50, bf16, fused AdamW, batch augmentation\n\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=40)
        + "\n\n"
        + averages.table(sort_by="self_device_time_total", row_limit=40)
    )
    return rows


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


@contextlib.contextmanager
def adamw_fused(fused: bool):
    """Make ``fit``'s AdamW fused or not, to measure the loop before and after fusing."""
    import torch

    original, chosen = torch.optim.AdamW, fused
    torch.optim.AdamW = lambda *args, fused=None, **kwargs: original(*args, fused=chosen, **kwargs)
    try:
        yield
    finally:
        torch.optim.AdamW = original


def throughput(raw, root, device, backbone, sampler, optimizer="fused", **train) -> dict:
    """Epochs 2-3 of a 3-epoch fit: images/s, data-wait share, GPU utilisation."""
    from pneumo.config import parse_params
    from pneumo.core.loop import fit

    params = parse_params(with_train(raw, epochs=3, patience=99, **train))
    ends: list[float] = []
    started = time.perf_counter()
    with adamw_fused(optimizer == "fused"):
        result = fit(params, backbone, root / "data/processed", device,
                     on_epoch=lambda _: ends.append(time.perf_counter()))  # fmt: skip
    measured = result.history[1:]
    return {
        "backbone": backbone,
        **train,
        "optimizer": optimizer,
        "batch_size": params.train.batch_size,
        "images_per_second": round(sum(h["images_per_second"] for h in measured) / 2, 1),
        "data_wait_fraction": round(sum(h["data_wait_fraction"] for h in measured) / 2, 4),
        "first_epoch_images_per_second": round(result.history[0]["images_per_second"], 1),
        "gpu_utilisation_percent": sampler.mean_between(ends[0], ends[-1]) if sampler else None,
        # a whole epoch, validation included: what sizes the comparison's epochs
        "epoch_seconds": round((ends[-1] - ends[0]) / 2, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def comparison(raw, root, device, backbone, epochs: int) -> dict:
    """Train from random init, then evaluate with TTA and a validation-chosen threshold."""
    from pneumo.config import parse_params
    from pneumo.core.data import CachedSplit
    from pneumo.core.loop import fit
    from pneumo.stages.evaluate import assess

    params = parse_params(with_train(raw, epochs=epochs))
    started = time.perf_counter()
    result = fit(params, backbone, root / "data/processed", device)
    trained = time.perf_counter() - started
    splits = {name: CachedSplit.load(root / "data/processed", name) for name in ("val", "test")}
    metrics, _, _, threshold = assess(result.model, splits, params.evaluate, device)
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
    parser.add_argument("archive", type=Path, nargs="?", help="not needed for breakdown only")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="throughput runs")
    parser.add_argument("--compare-batch-size", type=int, default=256)
    parser.add_argument(
        "--deadline",
        type=float,
        default=540.0,
        help="seconds from the start: no new measurement begins after it",
    )
    parser.add_argument("--workers", type=int, default=8, help="preprocess processes")
    parser.add_argument("--sections", nargs="+", default=["breakdown", "throughput", "comparison"],
                        choices=["breakdown", "throughput", "comparison"])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer configurations, smoke test")
    parser.add_argument("--epochs", type=int, help="fixed epochs for the comparison")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.deadline

    import torch

    from pneumo.core.devices import resolve_device

    device = resolve_device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": __import__("os").cpu_count(),
        "size": args.size,
        "breakdown": [],
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
    raw = recipe(args.archive or Path("unused.zip"), args.size, str(device))
    if "breakdown" in args.sections:
        rows = attempt("breakdown", lambda: step_breakdown(
            raw, device, args.size, args.batch_size, sampler, args.out,
            steps=3 if args.quick else 25, deadline=deadline,
        ))  # fmt: skip
        results["breakdown"] = rows or []
    if {"throughput", "comparison"} & set(args.sections):
        with tempfile.TemporaryDirectory() as tmp:
            measure_training(args, raw, Path(tmp), device, sampler, results, attempt, deadline)
    if sampler:
        sampler.close()
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "comparison"}, indent=1))


def measure_training(args, raw, root, device, sampler, results, attempt, deadline) -> None:
    """Throughput rows (ResNet50 first, then the other backbones in bf16), the comparison on
    what time is left, and the remaining throughput rows if time still allows."""
    results["preprocess_seconds"] = round(build_cache(raw, root, args.workers), 1)
    report = json.loads((root / "data/processed/report.json").read_text())
    results["counts"] = report["counts"]
    print("cache:", report["counts"], flush=True)

    def measure(backbone: str, train: dict) -> None:
        if time.perf_counter() > deadline:
            return
        row = attempt(
            f"throughput {backbone} {train}",
            lambda: throughput(
                raw, root, device, backbone, sampler, batch_size=args.batch_size, **train
            ),
        )
        if row:
            results["throughput"].append(row)
            print("throughput", json.dumps(row), flush=True)

    first = [
        ("resnet50", {"amp": "fp16"}),
        ("resnet50", {"amp": "bf16"}),
        ("resnet50", {"amp": "bf16", "deterministic": True}),
        ("densenet121", {"amp": "bf16"}),
        ("efficientnet-b4", {"amp": "bf16"}),
    ]
    later = [
        ("resnet50", {"amp": "bf16", "compile": True}),
        ("densenet121", {"amp": "fp16"}),
        ("efficientnet-b4", {"amp": "fp16"}),
        ("resnet50", {"amp": "fp16", "optimizer": "foreach"}),  # the loop before fusing
    ]
    if args.quick:
        first, later = first[:1], []
    if "throughput" in args.sections:
        for backbone, train in first:
            measure(backbone, train)

    if "comparison" in args.sections:
        # Same batch and kernels as the bf16 throughput rows, so cuDNN's autotuning of their
        # shapes is reused; epochs sized from their measured epoch time (validation included).
        epoch_seconds = {
            r["backbone"]: r["epoch_seconds"]
            for r in results["throughput"]
            if r["amp"] == "bf16"
            and r["optimizer"] == "fused"
            and not r.get("deterministic")
            and not r.get("compile")
        }
        compare_raw = with_train(raw, batch_size=args.compare_batch_size)
        for done, backbone in enumerate(BACKBONES):
            share = (deadline - time.perf_counter() - 20.0) / (len(BACKBONES) - done)
            # cosine schedule: the epoch count must be known before the first epoch
            epochs = args.epochs or int(max(2, min(40, share // epoch_seconds.get(backbone, 30))))
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
    if "throughput" in args.sections:
        for backbone, train in later:
            measure(backbone, train)


if __name__ == "__main__":
    main()
