"""Benchmark: how preprocess time and memory grow with the number of images.

Not a test. Usage:

    python scripts/benchmark_scale.py --counts 5000 20000 50000 --size 224 --workers 2

For each count it writes that many distinct generated radiograph-like JPEGs in the Kaggle
layout (smooth random fields, 256 px, a few per patient) into a temporary folder, runs
``pneumo fetch`` (source local) and ``pneumo preprocess`` as child processes, and reports the
preprocess wall time and its main process's peak resident memory (VmHWM; decoding runs in
``--workers`` processes that hold one file each). For the largest count it also times one
epoch's read of the memory-mapped training cache through ``CacheLoader`` in row order
(training reads the same way, in the sampler's order), right after preprocess wrote it, so
its pages are likely still in the page cache.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

# VmHWM, not getrusage's ru_maxrss: the latter keeps the forking parent's peak across exec.
PEAK = (
    "import re, sys\n"
    "from pathlib import Path\n"
    "from pneumo.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit as done:\n"
    "    assert not done.code, done.code\n"
    "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
)


def radiograph_like(index: int, size: int = 256) -> bytes:
    rng = np.random.default_rng(index)
    coarse = rng.normal(128, 40, (16, 16)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(coarse, "L").resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, (size, size), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_folder(root: Path, count: int) -> Path:
    for i in range(count):
        patient = i // 8
        split = ("train", "train", "train", "test", "train", "train", "val", "test")[patient % 8]
        if i % 2:
            name = f"{split}/PNEUMONIA/person{patient}_virus_{i}.jpeg"
        else:
            name = f"{split}/NORMAL/IM-{patient:04d}-{i:04d}.jpeg"
        path = root / "chest_xray" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(radiograph_like(i))
    return root


def run_stage(root: Path, *command: str) -> tuple[float, float]:
    """(seconds, peak MiB of the stage's main process)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK, *command], cwd=root, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = int(re.search(r"VmHWM (\d+)", done.stdout)[1]) / 1024
    return time.perf_counter() - started, peak


def epoch_read(cache: Path, batch_size: int) -> tuple[int, float]:
    from pneumo.core.data import CachedSplit, CacheLoader

    loader = CacheLoader(CachedSplit.load(cache, "train"), batch_size=batch_size)
    started = time.perf_counter()
    seen = sum(len(pixels) for pixels, _ in loader)
    return seen, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    rows = []
    for count in args.counts:
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            root = Path(tmp)
            started = time.perf_counter()
            source = write_folder(root / "source", count)
            generated = time.perf_counter() - started
            params = {"data": {"source": "local", "local_path": str(source),
                               "image_size": args.size}}  # fmt: skip
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            run_stage(root, "fetch")
            seconds, peak = run_stage(root, "preprocess", "--workers", str(args.workers))
            report = json.loads((root / "data/processed/report.json").read_text())
            cache_mb = sum(f.stat().st_size for f in (root / "data/processed").glob("*.npy"))
            row = {
                "images": count,
                "cached": report["cached_images"],
                "generate_seconds": round(generated, 1),
                "preprocess_seconds": round(seconds, 1),
                "preprocess_images_per_second": round(count / seconds, 1),
                "preprocess_peak_mib": round(peak, 1),
                "cache_mib": round(cache_mb / 2**20, 1),
            }
            if count == max(args.counts):
                seen, read = epoch_read(root / "data/processed", args.batch_size)
                row |= {"epoch_read_images": seen, "epoch_read_seconds": round(read, 2),
                        "epoch_read_images_per_second": round(seen / read, 1)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
