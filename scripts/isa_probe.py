"""A few AdamW steps of a backbone at 48 px: a hash of the weights and the time per step.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/isa_probe.py resnet50 3
    NO_MKLDNN=1 MKL_CBWR=AVX2 THREADS=2 python scripts/isa_probe.py densenet121 2

Run it under different instruction-set limits (``ATEN_CPU_CAPABILITY`` for torch's own
kernels, ``ONEDNN_MAX_CPU_ISA`` for oneDNN's, ``MKL_CBWR`` for MKL's), with oneDNN off
(``NO_MKLDNN=1``) or on and with ``THREADS`` threads, to see which settings change the bits
(docs/benchmarks.md, "Portable kernels"). Each run is a new process: the variables are read
when torch loads.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import torch

from pneumo.core.models import build_model


def main() -> None:
    if os.environ.get("NO_MKLDNN"):
        torch.backends.mkldnn.enabled = False
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.use_deterministic_algorithms(True, warn_only=True)
    backbone = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.manual_seed(0)
    net = build_model(backbone)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    pixels, targets = torch.rand(32, 1, 48, 48) * 255, (torch.rand(32) > 0.5).float()
    net.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(pixels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    weights = b"".join(t.detach().numpy().tobytes() for t in net.state_dict().values())
    print(
        f"{backbone} isa={torch.backends.cpu.get_cpu_capability()} "
        f"mkldnn={torch.backends.mkldnn.enabled} MKL_CBWR={os.environ.get('MKL_CBWR')} "
        f"threads={torch.get_num_threads()} weights={hashlib.sha256(weights).hexdigest()[:16]} "
        f"{sorted(times)[len(times) // 2] * 1000:.0f} ms/step"
    )


if __name__ == "__main__":
    main()
