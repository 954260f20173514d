"""Policy, value and auxiliary losses of PPO / GRPO / VRPO as pure functions over [B, T] tensors.

Every function takes per-token tensors of one shape [B, T] and a ``mask`` of the same shape (bool,
or 0/1 of any dtype) that marks the tokens the loss is taken over (the response tokens). Losses are
masked token means (:func:`vrpo_fast.ops.masked_mean`): an all-masked batch gives a loss of 0 with
zero gradients, never NaN. Arithmetic runs in float32 (float64 if an input is float64) whatever the
input dtype, so bf16 log-probs do not lose the ratio's precision.

Each loss returns ``(loss, stats)``: ``loss`` is a 0-d tensor to call ``backward`` on, ``stats`` a dict
of detached 0-d tensors for logging (call ``.item()`` when you log, so the loss itself never syncs the
device). The trainer owns models and optimisers; nothing here keeps state.

Formulas (see /work/shared/METHOD.md):

* PPO policy loss  ``masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))``, ``r = exp(lp - lp_old)``,
  minus ``entropy_coef * masked_mean(H)``.
* Value loss  ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2))``.
* VRPO value loss  value loss ``+ beta * KL + alpha_ent * L_ent + alpha_ppl * L_ppl``.
* GRPO policy loss  PPO policy loss ``+ kl_coef * masked_mean(k3(lp, lp_ref))``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from vrpo_fast.ops import masked_mean
from vrpo_fast.ops._common import FLOAT_DTYPES, check_same_shape, check_tensor

Stats = Dict[str, torch.Tensor]

__all__ = [
    "policy_loss",
    "value_loss",
    "aux_regression_loss",
    "kl_penalty",
    "explained_variance",
    "vrpo_value_loss",
    "aux_token_weights",
    "grpo_policy_loss",
    "aggregate_loss",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "VALUE_LOSSES",
    "LOSS_AGGREGATIONS",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tokens(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Every named tensor must be a float tensor with the shape of ``mask``."""
    check_tensor("mask", mask)
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        check_same_shape("mask", mask, name, t)


def _mask_as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype)


def _check_clip(name: str, clip) -> None:
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ValueError(f"{name} must be a non-negative number or None, got {clip!r}")


def aggregate_loss(loss_per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    ``"token-mean"`` (default, PPO / VRPO): mean over all unmasked tokens of the batch, so long
    responses weigh more. ``"seq-mean-token-mean"`` (the GRPO paper): mean over each row's unmasked
    tokens, then mean over the rows that have at least one unmasked token. ``"seq-mean-token-sum"``:
    sum over each row's tokens, mean over rows (Dr. GRPO style, without the constant normaliser).
    """
    if mode == "token-mean":
        return masked_mean(loss_per_token, mask)
    m = _mask_as(mask, loss_per_token.dtype)
    rows_alive = (m.sum(-1) > 0).to(loss_per_token.dtype)
    if mode == "seq-mean-token-mean":
        per_row = masked_mean(loss_per_token, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_row = (loss_per_token * m).sum(-1)
    else:
        raise ValueError(f"loss_agg must be one of {tuple(LOSS_AGGREGATIONS)}, got {mode!r}")
    return (per_row * rows_alive).sum() / rows_alive.sum().clamp_min(1.0)


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ----------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------
def _kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # with d = lp_ref - lp:  exp(d) - d - 1 >= 0, unbiased for KL(pi || pi_ref) under samples of pi
    d = -log_ratio
    return torch.expm1(d) - d


#: name -> estimator of KL(pi || pi_ref) from the per-token log-ratio ``lp - lp_ref`` (Schulman's k1/k2/k3).
KL_ESTIMATORS = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, [B, T] -> [B, T].

    ``"k1"``: ``lp - ref`` (unbiased, high variance, can be negative; the PPO-RLHF reward penalty).
    ``"k2"``: ``0.5 * (lp - ref)^2``. ``"k3"``: ``exp(ref - lp) - (ref - lp) - 1`` (unbiased,
    non-negative, low variance; GRPO's loss term). Works for any matching shapes; no mask is applied
    (multiply by one, or reduce with :func:`vrpo_fast.ops.masked_mean`).
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, dtypes=FLOAT_DTYPES)
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {tuple(KL_ESTIMATORS)}, got {kind!r}")
    dtype = _compute_dtype(logprobs, ref_logprobs)
    return KL_ESTIMATORS[kind](logprobs.to(dtype) - ref_logprobs.to(dtype))


# ----------------------------------------------------------------------------------------------
# policy losses
# ----------------------------------------------------------------------------------------------
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
) -> Tuple[torch.Tensor, Stats]:
    """Clipped PPO surrogate over the unmasked tokens.

    ``loss = agg(max(-A * r, -A * clip(r, 1 - clip, 1 + clip_high))) - entropy_coef * masked_mean(H)``
    with ``r = exp(logprobs - old_logprobs)``; ``clip_high`` defaults to ``clip`` (set it higher for
    DAPO's asymmetric "clip-higher"). ``old_logprobs`` and ``advantages`` are treated as constants
    (detached). ``entropy`` (per-token policy entropy, differentiable) is only needed when
    ``entropy_coef != 0``.

    Stats: ``clipfrac`` (fraction of tokens where the clipped branch is the active max),
    ``approx_kl`` (masked mean of ``(r - 1) - log r``, the non-negative k3 estimate of
    KL(pi_old || pi)), ``ratio_mean``, ``pg_loss`` (the surrogate alone), ``policy_loss`` (the
    returned total) and ``entropy`` when given.
    """
    _check_tokens(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, entropy=entropy)
    _check_clip("clip", clip)
    _check_clip("clip_high", clip_high)
    if clip is None:
        raise ValueError("clip must be a non-negative number for the PPO policy loss, got None")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy must be given when entropy_coef != 0")
    dtype = _compute_dtype(logprobs, old_logprobs, advantages)
    lp = logprobs.to(dtype)
    adv = advantages.detach().to(dtype)
    log_ratio = lp - old_logprobs.detach().to(dtype)
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    surr_unclipped = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + high)
    loss = aggregate_loss(torch.maximum(surr_unclipped, surr_clipped), mask, loss_agg)

    stats: Stats = {"pg_loss": loss.detach()}
    if entropy is not None:
        mean_entropy = masked_mean(entropy.to(dtype), mask)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy.detach()
    with torch.no_grad():
        stats["clipfrac"] = masked_mean((surr_clipped > surr_unclipped).to(dtype), mask)
        stats["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        stats["ratio_mean"] = masked_mean(ratio, mask)
    stats["policy_loss"] = loss.detach()
    return loss, stats


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    clip: float = 0.2,
    clip_high: Optional[float] = None,
    kl_coef: float = 0.04,
    kl_kind: str = "k3",
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
) -> Tuple[torch.Tensor, Stats]:
    """GRPO: the clipped PPO surrogate plus ``kl_coef * masked_mean(k3(logprobs, ref_logprobs))``.

    GRPO has no critic and puts the reference KL into the loss, not the reward (DeepSeekMath; default
    coefficient 0.04, estimator k3). ``kl_coef=0`` skips the KL term (``ref_logprobs`` may then be
    None; with ``ref_logprobs`` given the KL is still reported in the stats). The KL
    term is aggregated with the same ``loss_agg`` as the surrogate. Stats: those of
    :func:`policy_loss` plus ``kl`` (the masked mean of the per-token KL estimate).
    """
    if ref_logprobs is None and kl_coef != 0.0:
        # silently dropping a documented loss term would hide a wiring bug in the trainer
        raise ValueError("ref_logprobs must be given when kl_coef != 0 (pass kl_coef=0.0 to train without the KL term)")
    loss, stats = policy_loss(
        logprobs, old_logprobs, advantages, mask,
        clip=clip, clip_high=clip_high, entropy=entropy, entropy_coef=entropy_coef, loss_agg=loss_agg,
    )
    if ref_logprobs is not None:
        _check_tokens(mask, ref_logprobs=ref_logprobs)
        kl_tok = kl_penalty(logprobs, ref_logprobs.detach(), kl_kind)
        kl = aggregate_loss(kl_tok, mask, loss_agg)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    stats["policy_loss"] = loss.detach()
    return loss, stats


# ----------------------------------------------------------------------------------------------
# value losses
# ----------------------------------------------------------------------------------------------
def _explained_variance_tensor(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(values, returns)
    v, r = values.detach().to(dtype), returns.detach().to(dtype)
    m = _mask_as(mask, dtype)
    n = m.sum()
    # population variances over the unmasked tokens
    mean_r = (r * m).sum() / n.clamp_min(1.0)
    var_r = (((r - mean_r) * m) ** 2).sum() / n.clamp_min(1.0)
    diff = r - v
    mean_d = (diff * m).sum() / n.clamp_min(1.0)
    var_d = (((diff - mean_d) * m) ** 2).sum() / n.clamp_min(1.0)
    ev = 1.0 - var_d / var_r
    return torch.where(var_r > 0, ev, torch.full_like(ev, math.nan))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over the unmasked tokens (population variances).

    1 is a perfect critic, 0 is no better than a constant, negative is worse than a constant.
    When the returns have zero variance over the unmasked tokens (including "no unmasked token")
    the ratio is undefined and the result is ``nan`` (never an exception or ``inf``), as in
    Stable-Baselines3 / CleanRL; loggers should treat ``nan`` as "undefined this batch".
    """
    _check_tokens(mask, values=values, returns=returns)
    return float(_explained_variance_tensor(values, returns, mask))


def _value_loss_terms(values, old_values, returns, mask, clip, values_mean=None, token_weights=None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = _compute_dtype(values, old_values, returns)
    v = values.to(dtype)
    r = returns.detach().to(dtype)
    w = None if token_weights is None else token_weights.detach().to(dtype)

    def mean(x):
        return masked_mean(x if w is None else x * w, mask)

    err_unclipped = (v - r).square()
    if clip is None:
        zero = torch.zeros((), dtype=dtype, device=v.device)
        return 0.5 * mean(err_unclipped), zero, dtype
    v_old = old_values.detach().to(dtype)
    if values_mean is None:
        v_clipped = v_old + (v - v_old).clamp(-clip, clip)
    else:
        # like with like: V_old is the value at z = mu, so clip the mean part of the new value (also at
        # z = mu) and keep this sample's noise offset (v - v_mean) on both branches; without drift the
        # two branches are equal and the sampling noise alone never triggers the clip
        vm = values_mean.to(dtype)
        v_clipped = v_old + (vm - v_old).clamp(-clip, clip) + (v - vm)
    err_clipped = (v_clipped - r).square()
    loss = 0.5 * mean(torch.maximum(err_unclipped, err_clipped))
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).to(dtype), mask)
    return loss, clipfrac, dtype


def value_loss(
    values: torch.Tensor,
    old_values: Optional[torch.Tensor],
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    values_mean: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped value loss ``0.5 * masked_mean(w * max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = clip(V, V_old +- clip)``; with ``values_mean`` (the value at the VIB mean, z = mu, when
    ``values`` come from a sampled z and ``old_values`` from z = mu):
    ``V_clip = V_old + clip(V_mu - V_old, +-clip) + (V - V_mu)``, so the clip compares values of the
    same z mode. ``token_weights`` ``w`` [B, T] (constants, mean 1 over the response tokens; see
    :func:`aux_token_weights`) scale each token's term; None = 1. ``clip=None`` disables clipping
    (``old_values`` may then be None). ``returns`` and ``old_values`` are constants (detached). The
    clip is absolute (in reward units). Stats: ``vf_clipfrac`` (fraction of tokens where the clipped
    error is the active max), ``explained_variance`` (nan when the returns have no variance),
    ``value_loss``, ``values_mean``, ``returns_mean``.
    """
    _check_clip("clip", clip)
    if clip is not None and old_values is None:
        raise ValueError("old_values must be given when clip is not None")
    _check_tokens(mask, values=values, old_values=old_values, returns=returns, values_mean=values_mean,
                  token_weights=token_weights)
    loss, clipfrac, dtype = _value_loss_terms(values, old_values, returns, mask, clip, values_mean, token_weights)
    with torch.no_grad():
        stats: Stats = {
            "value_loss": loss.detach(),
            "vf_clipfrac": clipfrac,
            "explained_variance": _explained_variance_tensor(values, returns, mask),
            "values_mean": masked_mean(values.detach().to(dtype), mask),
            "returns_mean": masked_mean(returns.detach().to(dtype), mask),
        }
    return loss, stats


def aux_token_weights(signal: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """VRPO's *weight* reading of the auxiliary signal: ``w = n * softmax(signal / temperature)`` over
    each sequence's ``n`` masked tokens (mean weight 1 per sequence; 0 off the mask and on rows with no
    masked token). ``signal`` [B, T] is the frozen LM's entropy and/or surprisal in nats: the critic
    spends its capacity where the LM is uncertain. ``temperature`` -> inf gives uniform weights.
    """
    _check_tokens(mask, signal=signal)
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    on = _mask_as(mask, torch.float32) > 0
    logits = torch.where(on, signal.detach().float() / temperature, torch.full_like(signal, -math.inf).float())
    n = on.sum(-1, keepdim=True)
    w = torch.softmax(logits, dim=-1) * n.to(torch.float32)
    return torch.where(on, w, torch.zeros_like(w))  # rows with no token: softmax of all -inf is NaN -> 0


def aux_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE ``masked_mean((pred - target)^2)``; ``target`` is a constant (detached).

    Used for VRPO's auxiliary heads that regress the frozen LM's per-token entropy and NLL.
    """
    _check_tokens(mask, pred=pred, target=target)
    dtype = _compute_dtype(pred, target)
    return masked_mean((pred.to(dtype) - target.detach().to(dtype)).square(), mask)


def vrpo_value_loss(
    values: torch.Tensor,
    old_values: Optional[torch.Tensor],
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: Optional[torch.Tensor] = None,
    ent_pred: Optional[torch.Tensor] = None,
    ent_target: Optional[torch.Tensor] = None,
    nll_pred: Optional[torch.Tensor] = None,
    nll_target: Optional[torch.Tensor] = None,
    clip: Optional[float] = 0.2,
    beta: float = 1e-3,
    alpha_ent: float = 0.1,
    alpha_ppl: float = 0.1,
    values_mean: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    nll_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Stats]:
    """VRPO critic loss ``L_V + beta * KL + alpha_ent * L_ent + alpha_ppl * L_ppl``.

    ``L_V`` is :func:`value_loss` (with ``values_mean`` and ``token_weights``); ``kl`` is the VIB
    head's KL, either already reduced (0-d tensor, e.g. ``ValueOutput.kl``) or per token [B, T] (then
    masked-mean reduced here); ``L_ent`` / ``L_ppl`` are :func:`aux_regression_loss` of the entropy /
    surprisal head predictions against the frozen LM's per-token entropy / surprisal, the latter with
    zero error outside ``nll_mask`` (the states where its target is defined; default ``mask``), both
    means over ``mask``'s tokens. Any of ``kl``,
    ``ent_pred``, ``nll_pred`` may be None: that term is skipped, so the PPO baseline calls this with
    all three None and gets :func:`value_loss`.

    Stats: those of :func:`value_loss` plus ``vib_kl``, ``ent_loss``, ``ppl_loss`` for the terms
    present, and ``critic_loss`` (the total).
    """
    loss, stats = value_loss(values, old_values, returns, mask, clip=clip, values_mean=values_mean,
                             token_weights=token_weights)
    if kl is not None:
        check_tensor("kl", kl, dtypes=FLOAT_DTYPES)
        if kl.dim() == 0:
            kl_mean = kl.to(loss.dtype)
        else:
            check_same_shape("mask", mask, "kl", kl)
            kl_mean = masked_mean(kl.to(loss.dtype), mask)
        loss = loss + beta * kl_mean
        stats["vib_kl"] = kl_mean.detach()
    for stat, pred, target, pred_name, target_name, weight, m in (
        ("ent_loss", ent_pred, ent_target, "ent_pred", "ent_target", alpha_ent, mask),
        ("ppl_loss", nll_pred, nll_target, "nll_pred", "nll_target", alpha_ppl, mask if nll_mask is None else nll_mask),
    ):
        if pred is None:
            continue
        if target is None:
            raise ValueError(f"{target_name} must be given when {pred_name} is given")
        if m is not mask:  # zero error where the target is undefined; still a mean over the response tokens,
            # so the loss is a token mean over the mini-batch however it is split over processes
            check_same_shape("mask", mask, "nll_mask", m)
            pred = torch.where(m.bool(), pred, target.detach().to(pred.dtype))
        aux = aux_regression_loss(pred, target, mask).to(loss.dtype)
        loss = loss + weight * aux
        stats[stat] = aux.detach()
    stats["critic_loss"] = loss.detach()
    return loss, stats


#: name -> policy loss; both take (logprobs, old_logprobs, advantages, mask, ...) and return (loss, stats).
POLICY_LOSSES = {"ppo": policy_loss, "vrpo": policy_loss, "grpo": grpo_policy_loss}

#: name -> critic loss; both take (values, old_values, returns, mask, ...) and return (loss, stats).
VALUE_LOSSES = {"ppo": value_loss, "vrpo": vrpo_value_loss}
