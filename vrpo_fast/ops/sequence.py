"""Masked reductions over [B, T] token tensors: masked mean and sequence perplexity."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import FLOAT_DTYPES, check_same_shape, check_tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (non-zero).

    ``dim=None`` reduces over everything (a scalar); otherwise over ``dim``. Rows with no unmasked
    position give 0 (not NaN), so all-masked rows never poison a loss. Masked-out positions are
    never read arithmetically, so NaN/inf there (e.g. -inf log-probs of padding) do not leak.
    fp16/bf16 values are summed and counted in fp32; the result has the dtype of ``values``.
    """
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, device=values.device)
    check_same_shape("values", values, "mask", mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    acc = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    # where, not values * mask: 0 * nan = nan would let a masked-out NaN through.
    total = torch.where(keep, acc, torch.zeros((), dtype=acc.dtype, device=acc.device))
    count = keep.to(acc.dtype)
    if dim is None:
        out = total.sum() / count.sum().clamp_min(1.0)
    else:
        out = total.sum(dim) / count.sum(dim).clamp_min(1.0)
    return out.to(values.dtype)


def sequence_perplexity(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence perplexity ``exp(masked mean NLL)`` from per-token log-probs [B, T] -> [B].

    Feed it the ``logprobs`` returned by :func:`vrpo_fast.ops.token_logprobs_entropy`. A 1-D [T]
    input (one sequence) gives a 0-D result. A row with no unmasked token has perplexity 1 (mean NLL
    0). fp16/bf16 log-probs give an fp32 result (exp of a mean NLL overflows fp16 quickly).
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=(1, 2))
    check_tensor("mask", mask, ndim=(1, 2), device=logprobs.device)
    check_same_shape("logprobs", logprobs, "mask", mask)
    lp = logprobs.float() if logprobs.dtype in (torch.float16, torch.bfloat16) else logprobs
    if lp.dim() == 1:
        lp, mask = lp.unsqueeze(0), mask.unsqueeze(0)
        return torch.exp(masked_mean(-lp, mask, dim=-1)).squeeze(0)
    return torch.exp(masked_mean(-lp, mask, dim=-1))
