"""Choosing the torch device from a setting such as ``train.device`` or ``--device``, and
copying to it."""

from __future__ import annotations

import torch

from pneumo.errors import UserError
from pneumo.specs import DeviceChoice


def resolve_device(
    choice: str, *, local_rank: int = 0, setting: str = "train.device"
) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.

    ``cuda`` without an index is the process's own GPU under torchrun (``local_rank``);
    ``setting`` names the option in errors.
    """
    try:
        parsed = DeviceChoice.parse(choice)
    except ValueError as error:
        raise UserError(f"{setting}: {error}") from None
    if parsed.kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{setting} is {choice!r} but no CUDA device is visible")
        index = local_rank if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise UserError(
                f"{setting} {choice!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device("cuda", index)
    if parsed.kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting} is 'mps' but this torch build or machine has no MPS")
    if parsed.kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(parsed.kind)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Asynchronous only from page-locked memory: from pageable memory the host may reuse the
    source before the copy has read it (reported on mps)."""
    return tensor.to(device, non_blocking=tensor.is_pinned())
