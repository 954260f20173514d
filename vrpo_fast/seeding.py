"""Deterministic seeds and data order: every random choice of a run is a function of (seed, step, ...)."""
from __future__ import annotations

import random
from typing import List, Sequence

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...): the same on every run, distinct per tuple."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


def prompts_for_step(num_examples: int, step: int, prompts_per_step: int, seed: int) -> List[int]:
    """Indices of the global batch of prompts of an RL step: epochs of seeded permutations, in order.

    Stateless: the data-order position after step s is (s + 1) * prompts_per_step, so resuming at a
    step reproduces the order exactly.
    """
    out: List[int] = []
    pos = step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(pos, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(derived_seed(seed, 7, epoch)))
        take = min(prompts_per_step - len(out), num_examples - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def shard(items: Sequence, rank: int, world: int) -> list:
    """Contiguous slice ``rank`` of ``world`` (groups of consecutive items stay together)."""
    n = len(items) // world
    return list(items[rank * n:(rank + 1) * n])


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
