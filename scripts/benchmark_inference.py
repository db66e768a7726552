"""Inference latency: cold `pneumo predict`, warm per-image latency, and the served model.

    python scripts/benchmark_inference.py --model-dir models/resnet50 \
        --serve models:/pneumo-classifier@champion --requests 100 > latency.json

- cold: `pneumo predict --model MODEL_DIR IMAGE` in a new process, wall time, ``--cold`` runs;
- warm: one image through a loaded :class:`pneumo.core.inference.Classifier`, ``--warm`` runs;
- served (with ``--serve``): `mlflow models serve -m URI --env-manager local` on a free port,
  one warm-up request, then ``--requests`` POSTs of one base64 image, each timed by the client.

The image is the first test image of the model's evaluation (reports/eval/<backbone>), so run it
from the repository root after `dvc repro` (and `pneumo promote` for ``--serve``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import subprocess
import sys
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


def cold(model_dir: Path, image: Path, runs: int) -> dict[str, float]:
    command = [sys.executable, "-m", "pneumo", "predict", "--model", str(model_dir), str(image)]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return summary(times)


def warm(model_dir: Path, image: Path, runs: int) -> dict[str, float]:
    from pneumo.core.inference import Classifier

    classifier = Classifier.load(model_dir)
    data = image.read_bytes()
    times = []
    for _ in range(runs + 1):  # the first call warms up allocators and is not counted
        started = time.perf_counter()
        classifier.assess(classifier.prepare(data)[None])
        times.append(time.perf_counter() - started)
    return summary(times[1:])


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
    parser.add_argument("--serve", help="a models:/ URI to serve and time over HTTP")
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    card = json.loads((args.model_dir / "meta.json").read_text())
    backbone, size = card["backbone"], card["image_size"]
    first = pd.read_csv(f"reports/eval/{backbone}/predictions.csv", nrows=1).image[0]
    image = Path("data/raw") / first
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "backbone": backbone,
        "image_size": size,
        "image": str(image),
        "cold_predict": cold(args.model_dir, image, args.cold),
        "warm_per_image": warm(args.model_dir, image, args.warm),
    }
    if args.serve:
        result["served"] = served(args.serve, image, args.requests) | {"uri": args.serve}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
