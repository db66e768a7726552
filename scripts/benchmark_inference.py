"""Inference latency per runtime (ONNX Runtime, torch): cold `pneumo predict`, warm per-image
latency, and the served model.

    python scripts/benchmark_inference.py --model-dir models/resnet50 [--image-size 224] \
        [--serve] --requests 100 > latency.json

- ``import torch`` alone in a new process, the yardstick for cold starts, ``--cold`` runs;
- cold: `pneumo predict --model MODEL_DIR --runtime R IMAGE` in a new process, wall time and
  peak RSS (the process's own ``VmHWM`` at exit), ``--cold`` runs per runtime;
- warm: one image through a loaded classifier of each runtime, ``--warm`` runs;
- served (with ``--serve``): the folder saved as the registered pyfunc model is (same code,
  same shipped modules), once per runtime (``model_config.runtime``), run by
  `mlflow models serve --env-manager local` on a free port; one warm-up request, then
  ``--requests`` POSTs of one base64 image, each timed by the client.

``--image-size`` copies the folder with its card set to that size and exports the copy's ONNX
graph again: a network's cost depends on the image size, not on what its weights learned, so
the sample's 48 px ResNet50 times what a 224 px one costs. The image is the first test image of
the model's evaluation (reports/eval/<backbone>): run it from the repository root after
`dvc repro`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd


def summary(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "runs": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


# Run in the measured process: its own peak RSS (VmHWM) at exit. A child's ru_maxrss would
# count the benchmark's own memory, which the fork copied before the exec.
PEAK = (
    "import atexit, re, sys\n"
    "from pathlib import Path\n"
    "def peak():\n"
    "    hwm = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]\n"
    "    print('VmHWM', hwm, file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "if sys.argv[0] == 'import':\n"
    "    __import__(sys.argv[1])\n"
    "else:\n"
    "    from pneumo.cli import main\n"
    "    main(sys.argv)\n"
)


def timed_process(args: list[str], runs: int) -> dict[str, float]:
    """Wall time and peak RSS (MiB) of a new Python process running ``args`` (``import
    MODULE``, or pneumo's command line), ``runs`` times."""
    times, peaks = [], []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PEAK, *args], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{args} failed: {done.stderr[-2000:]}")
        peaks.append(int(re.search(r"VmHWM (\d+)", done.stderr)[1]) / 1024)
    return summary(times) | {"peak_rss_mib_median": float(np.median(peaks))}


def cold(model_dir: Path, image: Path, runs: int, runtime: str) -> dict[str, float]:
    command = ["predict", "--model", str(model_dir), "--runtime", runtime, str(image)]
    return timed_process(command, runs)


def at_size(model_dir: Path, size: int, dest: Path) -> Path:
    """A copy of the model folder whose card says ``size``, with its ONNX graph re-exported."""
    from pneumo.core.export import export_folder, parity_images

    copy = dest / model_dir.name
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps(card | {"image_size": size}, indent=2))
    export_folder(copy, parity_images(size, count=8), ["onnx"])
    return copy


def warm(model_dir: Path, image: Path, runs: int, runtime: str) -> dict[str, float]:
    from pneumo.core.runtime import load_classifier

    classifier = load_classifier(model_dir, runtime)
    data = image.read_bytes()
    times = []
    for _ in range(runs + 1):  # the first call warms up allocators and is not counted
        started = time.perf_counter()
        classifier.assess(classifier.prepare(data)[None])
        times.append(time.perf_counter() - started)
    return summary(times[1:])


def pyfunc_model(model_dir: Path, runtime: str, dest: Path) -> Path:
    """The folder saved as `pneumo register` logs it, with ``runtime`` in its model config."""
    import mlflow

    import pneumo
    from pneumo.core.runtime import verified_settings
    from pneumo.mlops.registry import SIGNATURE, requirements, shipped_code

    settings = verified_settings(model_dir)
    path = dest / f"pyfunc-{runtime}"
    mlflow.pyfunc.save_model(
        path,
        python_model=str(Path(pneumo.__file__).parent / "mlops/serving.py"),
        artifacts={"model": str(model_dir)},
        code_paths=[str(shipped_code(dest / f"code-{runtime}"))],
        model_config={
            "weights_sha256": settings.weights_sha256,
            "onnx_sha256": settings.exports["onnx"].sha256,
            "inference_device": "cpu",
            "runtime": runtime,
        },
        signature=SIGNATURE,
        pip_requirements=requirements(),
    )
    return path


def served(uri: str, image: Path, requests: int) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = json.dumps(
        {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
    ).encode()
    try:
        started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("mlflow models serve exited: run it by hand") from None
                time.sleep(0.2)
        ready_s = time.perf_counter() - started
        times = []
        for _ in range(requests + 1):  # the first request is a warm-up
            request = urllib.request.Request(
                f"{url}/invocations", body, {"Content-Type": "application/json"}
            )
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            times.append(time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return summary(times[1:]) | {"server_ready_s": ready_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--image-size", type=int, help="time the network at this size")
    parser.add_argument("--serve", action="store_true", help="also time the served model")
    parser.add_argument("--runtimes", nargs="+", default=["onnx", "torch"])
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    card = json.loads((args.model_dir / "meta.json").read_text())
    backbone = card["backbone"]
    first = pd.read_csv(f"reports/eval/{backbone}/predictions.csv", nrows=1).image[0]
    image = Path("data/raw") / first
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if args.image_size:
            model_dir = at_size(model_dir, args.image_size, Path(tmp))
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "backbone": backbone,
            "image_size": args.image_size or card["image_size"],
            "image": str(image),
            "import_torch": timed_process(["import", "torch"], args.cold),
        }
        for runtime in args.runtimes:
            result[runtime] = {
                "cold_predict": cold(model_dir, image, args.cold, runtime),
                "warm_per_image": warm(model_dir, image, args.warm, runtime),
            }
            if args.serve:
                uri = str(pyfunc_model(model_dir, runtime, Path(tmp)))
                result[runtime]["served"] = served(uri, image, args.requests)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
