"""Does the critic absorb reward noise? Mechanism diagnostics as pure functions of [B, T] / [B] tensors.

The learner never sees the clean reward; these use it only to measure (METHOD.md, "How to see whether
the critic absorbs noise"). Every statistic is ``nan`` where it is undefined (a constant input, no
token), never an exception; ``metrics.jsonl`` records ``nan`` as ``null``.

* :func:`masked_corr` -- Pearson correlation over the masked entries.
* :func:`advantage_diagnostics` -- ``adv_clean_corr``: corr(advantages, the advantages recomputed
  from the *clean* reward with the same values and KL terms); ``adv_noise_frac``: ``1 - corr^2``, the
  share of the advantages' variance that the clean-reward advantages do not explain (linear fit),
  i.e. what reward noise put there.
* :func:`value_reward_corr` -- corr over the batch of a per-sequence value with a per-sequence reward.
* :func:`regression_slope` -- least-squares slope of y on x (``value_noise_slope``: the change of the
  last-state value over a step's critic updates regressed on the injected noise; > 0 means the critic
  moves towards the noise, i.e. memorises it).
* :func:`first_state`, :func:`last_state` -- per-row values at the first / last masked position.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

__all__ = ["masked_corr", "advantage_diagnostics", "value_reward_corr", "regression_slope", "first_state",
           "last_state"]


def masked_corr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Pearson correlation of ``a`` and ``b`` over the entries where ``mask`` is set (all if None)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if mask is not None:
        if mask.shape != tuple(a.shape) and mask.numel() != a.numel():
            raise ValueError(f"mask must have the shape of a, got {tuple(mask.shape)}")
        keep = mask.detach().flatten().bool()
        a, b = a[keep], b[keep]
    if a.numel() < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = (da.square().sum() * db.square().sum()).sqrt()
    if not denom > 0:
        return math.nan
    return float((da * db).sum() / denom)


def advantage_diagnostics(advantages: torch.Tensor, clean_advantages: torch.Tensor,
                          mask: torch.Tensor) -> Dict[str, float]:
    """``adv_clean_corr`` and ``adv_noise_frac`` (= 1 - corr^2) over the response tokens."""
    corr = masked_corr(advantages, clean_advantages, mask)
    return {"adv_clean_corr": corr, "adv_noise_frac": 1.0 - corr * corr if math.isfinite(corr) else math.nan}


def value_reward_corr(values: torch.Tensor, reward: torch.Tensor) -> float:
    """Correlation over the batch between a per-sequence value [B] and a per-sequence reward [B]."""
    return masked_corr(values.reshape(-1), reward.reshape(-1).to(values.device))


def regression_slope(y: torch.Tensor, x: torch.Tensor) -> float:
    """Least-squares slope of ``y`` on ``x`` (both [B]); nan when ``x`` is constant."""
    y, x = y.detach().double().reshape(-1), x.detach().double().reshape(-1).to(y.device)
    if x.numel() < 2:
        return math.nan
    dx = x - x.mean()
    var = dx.square().sum()
    if not var > 0:
        return math.nan
    return float((dx * (y - y.mean())).sum() / var)


def _first_last_index(mask: torch.Tensor, last: bool) -> torch.Tensor:
    on = mask.bool()
    pos = torch.arange(on.shape[1], device=on.device).expand_as(on)
    if last:
        return torch.where(on, pos, torch.full_like(pos, -1)).amax(1)
    return torch.where(on, pos, torch.full_like(pos, on.shape[1])).amin(1)


def first_state(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[i, t_i]`` at each row's first masked position (nan for rows with none)."""
    idx = _first_last_index(mask, last=False)
    return _take(x, idx, mask.shape[1])


def last_state(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[i, t_i]`` at each row's last masked position (nan for rows with none)."""
    idx = _first_last_index(mask, last=True)
    return _take(x, idx, mask.shape[1])


def _take(x: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    valid = (idx >= 0) & (idx < width)
    got = x.detach().double().gather(1, idx.clamp(0, width - 1)[:, None]).squeeze(1)
    return torch.where(valid, got, torch.full_like(got, math.nan))
