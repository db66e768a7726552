"""The platform a result was computed on, and the portable CPU kernels.

Deterministic kernels repeat a run bit for bit on one platform. Another platform may give
other bits: oneDNN (convolutions) and MKL (matrix products) pick kernels by instruction set
(AVX2, AVX-512, AMX) and cache size, ATen vectorises by instruction set, and the number of
threads changes the order of sums. Every model card and evaluation records the platform, so a
result says where it holds bit for bit (see the README, "What reproducible means here").

``train.deterministic: portable`` pins what differs between x86-64 machines, so that an
AVX-512 machine computes what an AVX2 machine does (tests/test_platforms.py trains under both
instruction sets, simulated on one CPU), at several times the CPU time of the native kernels
(docs/benchmarks.md):

* oneDNN off: convolutions fall back to ATen's own im2col + matrix product (oneDNN picks
  kernels by instruction set and cache size);
* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels at AVX2 width everywhere (at
  AVX-512 width a short training gave other weights; a CPU without AVX2 cannot follow);
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility, its AVX2 code path on any
  CPU that has it;
* a fixed number of threads (``PORTABLE_THREADS``): another count gave other weights.

ATen and MKL read their variables once, when torch loads, so the choice must be made before
that: ``pneumo train`` and ``pneumo evaluate`` make it before importing torch.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pneumo.errors import UserError

PORTABLE = "portable"
PORTABLE_ENVIRONMENT = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PORTABLE_THREADS = 2


class PortableKernelsError(UserError):
    """The portable kernels cannot be used in this process or on this machine."""


def _portable_environment_set() -> bool:
    return all(os.environ.get(k) == v for k, v in PORTABLE_ENVIRONMENT.items())


def prepare_kernels(deterministic: bool | str) -> None:
    """Called before torch is imported: for ``portable``, set the variables ATen and MKL read
    when they load. Other settings need nothing before torch loads."""
    if deterministic != PORTABLE:
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise PortableKernelsError(
            f"train.deterministic: portable is defined for x86-64 CPUs with AVX2, not "
            f"{platform.machine()}: use train.deterministic: true (bit for bit on this platform)"
        )
    if "torch" in sys.modules and not _portable_environment_set():
        raise PortableKernelsError(
            "train.deterministic: portable must be chosen before torch loads: run the stage "
            "through `pneumo train` / `pneumo evaluate`, or set "
            + " ".join(f"{k}={v}" for k, v in PORTABLE_ENVIRONMENT.items())
            + " in the environment"
        )
    os.environ.update(PORTABLE_ENVIRONMENT)


def use_kernels(deterministic: bool | str) -> None:
    """After torch loads: the kernel choices that can be made at run time."""
    import torch

    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    # Deterministic mode would also fill every new tensor before use (torch.empty included):
    # a guard against operations that read memory nobody wrote, which none here does; PyTorch
    # documents turning it off as still deterministic for such programs.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic == PORTABLE:
        pin_portable_kernels()


def pin_portable_kernels() -> None:
    """The run-time half of the portable kernels (after :func:`prepare_kernels`): oneDNN off
    and a fixed thread count. Evaluation calls it alone: it chooses no other kernel than the
    model folder's users get from `pneumo predict`."""
    import torch

    if not _portable_environment_set():
        raise PortableKernelsError(
            "train.deterministic: portable needs prepare_kernels() before torch loads"
        )
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(PORTABLE_THREADS)


def _cpu_model() -> tuple[str, str]:
    """Vendor and model name as the OS reports them (``/proc/cpuinfo`` on Linux)."""
    vendor, model = "", ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "CPU implementer") and not vendor:
                vendor = value.strip()
            elif key in ("model name", "Model") and not model:
                model = value.strip()
    return vendor or platform.system(), model or platform.processor() or platform.machine()


def describe(device: Any = None) -> dict[str, Any]:
    """What the bits of a result depend on: CPU, the instruction set torch dispatches to,
    the kernels, threads and library versions; with a CUDA ``device``, the GPU, CUDA and
    cuDNN. Equal descriptions promise equal bits under deterministic kernels."""
    import numpy
    import torch

    vendor, model = _cpu_model()
    portable = _portable_environment_set() and not torch.backends.mkldnn.enabled
    described: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_vendor": vendor,
        "cpu": model,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "kernels": PORTABLE if portable else "native",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": version("pillow"),
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        described |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return described


def summary(described: dict[str, Any]) -> str:
    """One line for people: ``AMD EPYC (x86_64, AVX512, native kernels, 2 threads), torch …``."""
    line = (
        f"{described['cpu']} ({described['machine']}, {described['isa']}, "
        f"{described['kernels']} kernels, {described['threads']} threads)"
    )
    if "gpu" in described:
        line += f", {described['gpu']} (CUDA {described['cuda']}, cuDNN {described['cudnn']})"
    return (
        f"{line}, torch {described['torch']}, numpy {described['numpy']}, "
        f"pillow {described['pillow']}"
    )


def distinct(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The descriptions without repeats (and without empty ones), in first-seen order."""
    unique: list[dict[str, Any]] = []
    for item in described:
        if item and item not in unique:
            unique.append(item)
    return unique
