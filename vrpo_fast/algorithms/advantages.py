"""Token rewards and advantage estimators (GAE for PPO / VRPO, group-normalised for GRPO).

Pure functions over [B, T] tensors with a ``mask`` of the same shape marking the response tokens
(bool or 0/1). Outputs are float32 (float64 when an input is float64), zero at masked positions,
and carry no gradient: advantages and returns are targets, so inputs are detached.

Rows are independent sequences; padding may be on either side (or inside, e.g. masked tool output
in a multi-turn rollout): every function only looks at where ``mask`` is set.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vrpo_fast.ops import gae as _gae
from vrpo_fast.ops._common import FLOAT_DTYPES, check_same_shape, check_tensor

from .losses import KL_ESTIMATORS, kl_penalty

__all__ = [
    "token_level_rewards",
    "gae_advantages",
    "grpo_advantages",
    "whiten",
    "ADVANTAGE_ESTIMATORS",
]

#: added to the variance before the inverse square root in :func:`whiten`
WHITEN_EPS = 1e-8


def _out_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_mask_2d(mask: torch.Tensor) -> None:
    check_tensor("mask", mask, ndim=(2,))


def _check_rewards(seq_rewards: torch.Tensor, mask: torch.Tensor) -> None:
    check_tensor("seq_rewards", seq_rewards, ndim=(1,))
    if seq_rewards.is_complex():
        raise TypeError("seq_rewards must be a real tensor")
    if seq_rewards.shape[0] != mask.shape[0]:
        raise ValueError(
            f"seq_rewards must have one entry per row of mask ({mask.shape[0]}), got shape {tuple(seq_rewards.shape)}"
        )


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean, unit variance over its unmasked entries; masked entries -> 0.

    Mean and *unbiased* (``1/(N-1)``) variance over all unmasked entries of the batch, then
    ``(x - mean) / sqrt(var + 1e-8)``: the convention of TRL's / verl's ``masked_whiten`` and of
    ``vrpo_fast.ops.gae(whiten=True)``. ``shift_mean=False`` adds the mean back (scale only).
    A single unmasked entry whitens to 0 (``shift_mean=True``); no unmasked entry gives all zeros.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask)
    check_same_shape("x", x, "mask", mask)
    dtype = _out_dtype(x)
    xf = x.detach().to(dtype)
    m = mask.to(dtype)
    n = m.sum().clamp_min(1.0)
    mean = (xf * m).sum() / n
    var = (((xf - mean) * m) ** 2).sum() / (n - 1.0).clamp_min(1.0)
    out = (xf - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * m


def token_level_rewards(
    seq_rewards: torch.Tensor,
    mask: torch.Tensor,
    logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
) -> torch.Tensor:
    """Spread a per-sequence reward [B] over the tokens [B, T] for GAE.

    ``r[b, t] = seq_rewards[b] * [t == last unmasked position of row b] - kl_coef * kl[b, t]`` at the
    unmasked positions, 0 elsewhere, with ``kl = kl_penalty(logprobs, ref_logprobs, kl_kind)`` (the
    per-token KL to the reference policy, as in PPO-RLHF; k1 = ``lp - ref`` by default). A row with no
    unmasked token gets no reward at all. ``logprobs`` / ``ref_logprobs`` are only needed when
    ``kl_coef != 0``; they must be aligned with ``mask`` (entry t = log-prob of token t).
    """
    _check_mask_2d(mask)
    _check_rewards(seq_rewards, mask)
    if kl_kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_kind must be one of {tuple(KL_ESTIMATORS)}, got {kl_kind!r}")
    if kl_coef != 0.0 and (logprobs is None or ref_logprobs is None):
        raise ValueError("logprobs and ref_logprobs must be given when kl_coef != 0")
    dtype = _out_dtype(seq_rewards if seq_rewards.is_floating_point() else None, logprobs, ref_logprobs)
    B, T = mask.shape
    m = mask != 0

    rewards = torch.zeros(B, T, dtype=dtype, device=mask.device)
    if T > 0:
        # last unmasked index per row = max of (position + 1) * mask, minus 1 (-1: the row has none).
        # A scatter with a where (no boolean indexing) keeps this free of host syncs on CUDA.
        positions = torch.arange(1, T + 1, device=mask.device).expand(B, T)
        last = (positions * m).amax(dim=-1) - 1
        has_token = last >= 0
        seq = seq_rewards.detach().to(device=mask.device, dtype=dtype)
        seq = torch.where(has_token, seq, torch.zeros_like(seq))
        rewards.scatter_(1, last.clamp_min(0)[:, None], seq[:, None])

    if logprobs is not None and ref_logprobs is not None and kl_coef != 0.0:
        check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
        check_same_shape("mask", mask, "logprobs", logprobs)
        check_same_shape("mask", mask, "ref_logprobs", ref_logprobs)
        kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), kl_kind).to(dtype)
        rewards = rewards - kl_coef * kl * m.to(dtype)
    return rewards


def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns over the unmasked tokens, via :func:`vrpo_fast.ops.gae`.

    ``delta_t = r_t + gamma * V_{t'} - V_t`` with ``t'`` the next unmasked position (0 after the
    last one: the episode ends there), ``A_t = delta_t + gamma * lam * A_{t'}``, ``R_t = A_t + V_t``.
    ``values[b, t]`` must be the critic's value of the state in which response token t is generated
    (aligned with the token's log-prob). Returns ``(advantages, returns)``, both [B, T] and 0 at
    masked positions; the returns (the critic's target) are never whitened; the advantages are
    whitened over all unmasked tokens of the batch when ``whiten=True`` (see :func:`whiten`).
    Raises ``ValueError`` if rewards or values hold NaN / inf, even at masked positions.
    """
    check_tensor("token_rewards", token_rewards, dtypes=FLOAT_DTYPES, ndim=(2,))
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=(2,))
    _check_mask_2d(mask)
    check_same_shape("token_rewards", token_rewards, "values", values)
    check_same_shape("token_rewards", token_rewards, "mask", mask)
    dtype = _out_dtype(token_rewards, values)
    rewards = token_rewards.detach().to(dtype)
    vals = values.detach().to(dtype)
    # ops.gae whitens in the same pass (fused statistics), with the convention of whiten() below
    advantages, returns = _gae(rewards, vals, mask != 0, gamma=gamma, lam=lam, whiten=bool(whiten))
    return advantages.to(dtype), returns.to(dtype)


def grpo_advantages(
    seq_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages of GRPO, broadcast to every unmasked token.

    Rows are grouped contiguously: rows ``g*G .. g*G + G - 1`` are the G samples of prompt g.
    ``A = (r - mean_group) / (std_group + eps)`` with the *unbiased* (``1/(G-1)``) standard deviation,
    as ``torch.std`` computes by default and DeepSeekMath's GRPO uses. ``group_size=1`` has no
    spread: its advantage is 0. A group whose rewards are all equal gets 0 for every sample.
    Raises ``ValueError`` unless ``B`` is a multiple of ``group_size``.
    """
    _check_mask_2d(mask)
    _check_rewards(seq_rewards, mask)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    B = mask.shape[0]
    if B % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the batch size {B} (rows are grouped contiguously)")
    dtype = _out_dtype(seq_rewards if seq_rewards.is_floating_point() else None)
    r = seq_rewards.detach().to(device=mask.device, dtype=dtype).view(-1, group_size)
    mean = r.mean(dim=-1, keepdim=True)
    if group_size > 1:
        std = r.std(dim=-1, keepdim=True)  # unbiased
    else:
        std = torch.zeros_like(mean)
    adv = ((r - mean) / (std + eps)).reshape(B)
    return adv[:, None] * mask.to(dtype)


#: name -> advantage estimator. ``"gae"``: (token_rewards, values, mask) -> (advantages, returns);
#: ``"grpo"``: (seq_rewards, mask, group_size) -> advantages.
ADVANTAGE_ESTIMATORS = {"gae": gae_advantages, "grpo": grpo_advantages}
