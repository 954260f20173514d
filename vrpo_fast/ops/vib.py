"""VIB reparameterisation + per-row KL to N(0, I).

STUB (issue [3 of 6] in progress): reference only.
"""
from __future__ import annotations

import torch


def vib_sample_kl_reference(mu, logvar, eps=None, *, training=True, logvar_clamp=(-20.0, 10.0)):
    lv = logvar.clamp(*logvar_clamp) if logvar_clamp is not None else logvar
    kl = 0.5 * (mu.float() ** 2 + lv.float().exp() - lv.float() - 1.0).sum(-1)
    if not training:
        return mu, kl
    if eps is None:
        eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * lv) * eps
    return z, kl


def vib_sample_kl(mu, logvar, *, seed=None, training=True, logvar_clamp=(-20.0, 10.0), backend="auto"):
    return vib_sample_kl_reference(mu, logvar, training=training, logvar_clamp=logvar_clamp)
