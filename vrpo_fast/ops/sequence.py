"""Masked reductions over [B, T] token tensors: masked mean and sequence perplexity."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import FLOAT_DTYPES, check_same_shape, check_tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true.

    ``dim=None`` reduces over everything (a scalar); otherwise over ``dim``. Rows with no unmasked
    position give 0 (not NaN), so all-masked rows never poison a loss.
    """
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask)
    check_same_shape("values", values, "mask", mask)
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return (values * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def sequence_perplexity(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence perplexity ``exp(masked mean NLL)`` from per-token log-probs [B, T] -> [B].

    Feed it the ``logprobs`` returned by :func:`vrpo_fast.ops.token_logprobs_entropy`. A row with no
    unmasked token has perplexity 1 (mean NLL 0).
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=(1, 2))
    check_tensor("mask", mask, ndim=(1, 2))
    check_same_shape("logprobs", logprobs, "mask", mask)
    lp = logprobs.float() if logprobs.dtype in (torch.float16, torch.bfloat16) else logprobs
    if lp.dim() == 1:
        lp, mask = lp.unsqueeze(0), mask.unsqueeze(0)
        return torch.exp(masked_mean(-lp, mask, dim=-1)).squeeze(0)
    return torch.exp(masked_mean(-lp, mask, dim=-1))
