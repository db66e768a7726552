"""The few helpers distributed training needs; a single process is a world of one.

``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; this
module joins them into a process group (NCCL between GPUs, gloo on the CPU) and offers the
collective steps the training loop uses. Without those variables nothing is initialised and
every helper is a no-op, so the loop reads the same in both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_environment() -> World:
    """The world torchrun describes, or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> None:
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(world: World, *values: float, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(world: World, rows: torch.Tensor) -> torch.Tensor:
    """Reassemble a tensor sharded as ``full[rank::size]`` across processes, on every process."""
    if not world.distributed:
        return rows
    count = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    shards = [torch.zeros_like(padded) for _ in range(world.size)]
    dist.all_gather(shards, padded)
    total = int(sum(c.item() for c in counts))
    full = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    for rank, (shard, n) in enumerate(zip(shards, counts, strict=True)):
        full[rank :: world.size] = shard[: int(n.item())]
    return full


def agree(world: World, decision: bool, device: torch.device) -> bool:
    """The main process's decision, on every process (early stopping is decided once)."""
    if not world.distributed:
        return decision
    flag = torch.tensor([int(decision)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
