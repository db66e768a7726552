"""Benchmark: one epoch of the training split from the preprocess cache vs decoding JPEGs.

Not a test. Usage (the dev archive lies next to the checkout; any Kaggle-layout zip works):

    python scripts/benchmark_cache.py ../shared/data/chest_xray_dev.zip --size 224

It fetches and preprocesses the archive into a temporary folder (timing the preprocess stage
and its peak memory), then reads the training split once each way:

* cache: ``pneumo.core.data.CacheLoader`` over the memory-mapped uint8 array, as ``fit`` reads it
  (``--workers`` loader threads);
* JPEG: a torch ``DataLoader`` over torchvision's ``ImageFolder`` with ``Grayscale`` +
  ``Resize`` + ``PILToTensor`` (``--workers`` loader processes).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _stage(root: Path, command: str) -> tuple[float, float]:
    """Run a pneumo stage in a child process; returns (seconds, peak RSS in MiB)."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "pneumo", command], cwd=root, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - started, max(peak, before) / 1024


def _epoch(loader, repeats: int) -> tuple[int, float]:
    """Images per epoch and the fastest of ``repeats`` epochs (page cache warm for both)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        seen = sum(len(batch[0]) for batch in loader)
        times.append(time.perf_counter() - started)
    return seen, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="Epochs timed; the best counts.")
    args = parser.parse_args()

    import torch
    from torchvision import datasets, transforms

    from pneumo.core.data import CachedSplit, CacheLoader

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = {
            "data": {"source": "local", "local_path": str(args.archive.resolve()),
                     "image_size": args.size}
        }  # fmt: skip
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        fetch_s, _ = _stage(root, "fetch")
        preprocess_s, preprocess_peak = _stage(root, "preprocess")

        cache = CachedSplit.load(root / "data/processed", "train")
        cached_loader = CacheLoader(cache, batch_size=args.batch_size, threads=args.workers)
        jpeg_tf = transforms.Compose(
            [
                transforms.Grayscale(),
                transforms.Resize((args.size, args.size)),
                transforms.PILToTensor(),
            ]
        )
        # The same files the cache holds for its training split (pooled from the official
        # train and val folders), read the usual way.
        wanted = {str(root / "data/raw" / p) for p in cache.manifest.path}
        folders = []
        for split in ("train", "val"):
            folder = datasets.ImageFolder(root / "data/raw" / split, transform=jpeg_tf)
            folder.samples = [s for s in folder.samples if s[0] in wanted]
            folders.append(folder)
        jpeg_loader = torch.utils.data.DataLoader(
            torch.utils.data.ConcatDataset(folders),
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        n_cache, cache_s = _epoch(cached_loader, args.repeats)
        n_jpeg, jpeg_s = _epoch(jpeg_loader, args.repeats)

    print(
        f"archive: {args.archive} ({args.size} px, batch {args.batch_size}, "
        f"{args.workers} workers, torch threads {torch.get_num_threads()})"
    )
    print(
        f"fetch: {fetch_s:.1f} s; preprocess: {preprocess_s:.1f} s, "
        f"peak RSS of the fetch and preprocess processes {preprocess_peak:.0f} MiB"
    )
    print(f"cache epoch: {n_cache} images in {cache_s:.2f} s = {n_cache / cache_s:,.0f} images/s")
    print(f"JPEG epoch:  {n_jpeg} images in {jpeg_s:.2f} s = {n_jpeg / jpeg_s:,.0f} images/s")
    print(f"speed-up: {(n_cache / cache_s) / (n_jpeg / jpeg_s):.1f}x")


if __name__ == "__main__":
    main()
