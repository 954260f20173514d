"""Launch helpers shared by all kernels (block sizes, warps, contiguity)."""
from __future__ import annotations

import torch


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Heuristic warps for a 1-D block of ``block`` elements per program."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    return 2


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` (or a copy) whose last dimension has stride 1; other strides are kept."""
    return t if t.stride(-1) == 1 else t.contiguous()
