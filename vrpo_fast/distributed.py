"""Moving a step's rollouts between data-parallel processes (through ``accelerate``).

Each process generates and scores its shard of the step's rollouts (the expensive part); the shards
are then gathered, so every process holds the whole global batch and computes the same advantages
(whitened over the global batch), the same mini-batch partition and the same loss normalisation.
That is what makes an N-process run equal a single-process run with the same global batch, up to
floating-point rounding. The gathered tensors are small next to the models ([B, T] token ids and a
few [B, T] floats).

Shards are padded to the widest prompt and completion across processes first: prompts are
left-padded and completions right-padded (see :mod:`vrpo_fast.rollout`), so a shard gets extra
columns on both sides. Positions count real tokens only, so the extra padding changes no output.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .rollout import Rollout

__all__ = ["gather_rollout", "gather_objects", "pad_columns"]


def pad_columns(x: torch.Tensor, left: int, right: int, value=0) -> torch.Tensor:
    """``x`` [B, T] with ``left`` columns of ``value`` before and ``right`` after."""
    if left == 0 and right == 0:
        return x
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), (left, right), value=int(value)).bool()
    return F.pad(x, (left, right), value=value)


def gather_objects(accelerator, items: Sequence) -> List:
    """The concatenation, in process order, of every process's list ``items``."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def gather_rollout(accelerator, rollout: Rollout, tensors: Dict[str, torch.Tensor], *, pad_token_id: int
                   ) -> Tuple[Rollout, Dict[str, torch.Tensor]]:
    """Every process's rows, in process order: the rollout and the named per-row tensors.

    ``tensors`` holds [B] tensors (one value per row) and [B, T] tensors aligned with
    ``rollout.input_ids`` (token- or state-aligned alike; padded with 0; token ids with
    ``pad_token_id``). Row ``i`` of process ``r``
    becomes global row ``r * B + i``: shards must be equal-sized and contiguous (as
    :func:`vrpo_fast.trainer.shard` makes them).
    """
    if accelerator.num_processes == 1:
        return rollout, dict(tensors)
    B, L = rollout.input_ids.shape
    P = rollout.prompt_length
    for name, t in tensors.items():
        if t.shape[0] != B or (t.dim() == 2 and t.shape[1] != L) or t.dim() > 2:
            raise ValueError(f"{name} must be [B] or [B, T] = [{B}], [{B}, {L}], got {tuple(t.shape)}")
    widths = accelerator.gather(torch.tensor([[P, L - P]], device=rollout.input_ids.device)).view(-1, 2)
    P_max, C_max = (int(w) for w in widths.max(0).values)
    left, right = P_max - P, C_max - (L - P)

    def gather(t: torch.Tensor, value=0) -> torch.Tensor:
        if t.dim() == 2:
            t = pad_columns(t, left, right, value)
        dtype = t.dtype
        out = accelerator.gather(t.to(torch.uint8) if dtype == torch.bool else t.contiguous())
        return out.bool() if dtype == torch.bool else out

    merged = Rollout(gather(rollout.input_ids, pad_token_id), gather(rollout.attention_mask), gather(rollout.response_mask),
                     P_max, gather_objects(accelerator, rollout.completions))
    return merged, {name: gather(t) for name, t in tensors.items()}
