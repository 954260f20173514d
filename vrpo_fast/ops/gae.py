"""Generalised advantage estimation over [B, T] tensors with a token mask.

STUB (issue [2 of 6] in progress): reference only.
"""
from __future__ import annotations

import torch


def gae_reference(rewards, values, mask, *, gamma=1.0, lam=1.0, whiten=False, shift_mean=True):
    """Python loop over time; masked positions are transparent; after the last unmasked token: terminal."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_v = torch.zeros(B, dtype=rewards.dtype)
    run = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        on = m[:, t] > 0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        new_run = delta + gamma * lam * run
        run = torch.where(on, new_run, run)
        next_v = torch.where(on, values[:, t], next_v)
        adv[:, t] = torch.where(on, new_run, torch.zeros_like(new_run))
    ret = (adv + values) * m
    if whiten:
        n = m.sum().clamp_min(1)
        mean = (adv * m).sum() / n
        var = (((adv - mean) * m) ** 2).sum() / n
        w = (adv - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            w = w + mean
        adv = w * m
    return adv, ret


def gae(rewards, values, mask, *, gamma=1.0, lam=1.0, whiten=False, shift_mean=True):
    return gae_reference(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, shift_mean=shift_mean)
