"""Value heads over a backbone's hidden states: the VIB head of VRPO and a plain scalar head (PPO).

Both take ``hidden [..., H]`` (usually ``[B, T, H]``) and an optional token ``mask [...]`` and return
:class:`VIBHeadOutput`; the caller adds ``head.beta * out.kl`` to its value loss (``beta`` is 0 for
the scalar head, so one training loop serves both).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from vrpo_fast.ops._common import BACKENDS
from vrpo_fast.ops.vib import _check_clamp, vib_sample_kl


class VIBHeadOutput(NamedTuple):
    values: torch.Tensor  # [B, T] fp32
    z: Optional[torch.Tensor]  # [B, T, L] latent sample (mu in eval); None for ScalarValueHead
    kl_per_token: torch.Tensor  # [B, T] fp32, KL(q(z | h_t) || N(0, I)) summed over latent dims
    kl: torch.Tensor  # scalar fp32: mean of kl_per_token over the mask (0 if nothing is unmasked)
    values_mean: Optional[torch.Tensor] = None  # [B, T] fp32 value at z = mu (equal to values in eval)


def _prepare_inputs(hidden, mask, layer: nn.Linear) -> torch.Tensor:
    """Validate ``hidden``/``mask`` for a head whose first layer is ``layer``; return ``hidden`` in the
    layer's dtype (left as is under autocast, which does the casting itself)."""
    _check_inputs(hidden, mask, layer.in_features)
    if hidden.dtype != layer.weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(layer.weight.dtype)
    return hidden


def _check_inputs(hidden, mask, hidden_size: int):
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise TypeError(f"hidden must be a floating-point torch.Tensor, got {got}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden must have shape [..., {hidden_size}], got {tuple(hidden.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != hidden.shape[:-1]:
            raise ValueError(
                f"mask must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != hidden.device:
            raise ValueError(f"mask must be on device {hidden.device} (like hidden), got {mask.device}")


def _masked_token_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (all positions if None); 0 if none are."""
    if mask is None:
        return x.mean() if x.numel() > 0 else x.new_zeros(())
    keep = mask != 0
    # where(), not x * mask: padded positions may hold inf/NaN KL from garbage hidden states.
    return torch.where(keep, x, 0.0).sum() / keep.sum().clamp_min(1).to(x.dtype)


def _zero_init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _small_init_linear(layer: nn.Linear, scale: float = 0.1) -> nn.Linear:
    """A standard Linear init scaled down, bias 0: the output starts near 0 but the layer passes
    gradient to what feeds it from the first step (a zero weight would block the encoder's gradient)."""
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _build_decoder(decoder: Union[str, nn.Module], latent_dim: int) -> nn.Module:
    if isinstance(decoder, nn.Module):
        return decoder
    if decoder == "linear":
        return _small_init_linear(nn.Linear(latent_dim, 1))
    if decoder == "mlp":
        return nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU(), _small_init_linear(nn.Linear(latent_dim, 1)))
    raise ValueError(
        f"decoder must be 'linear', 'mlp' or an nn.Module mapping [..., latent_dim] -> [..., 1], got {decoder!r}"
    )


class VIBValueHead(nn.Module):
    """Variational-information-bottleneck value head.

    ``(mu, logvar) = encoder(h)``; ``z = mu + exp(logvar / 2) * eps`` (``z = mu`` in eval mode);
    ``value = decoder(z)``; ``kl_t = KL(N(mu, exp(logvar)) || N(0, I))``. Sampling and KL run in one
    fused op (:func:`vrpo_fast.ops.vib_sample_kl`) that keeps only ``mu`` and ``logvar`` for backward.

    Args:
        hidden_size: width H of the backbone's hidden states.
        latent_dim: L, the bottleneck width (default 64).
        beta: recommended KL weight, stored as ``head.beta``: ``loss = value_loss + head.beta * out.kl``.
        decoder: ``"linear"`` (L -> 1), ``"mlp"`` (L -> L -> GELU -> 1) or any module mapping
            ``[..., L] -> [..., 1]``. The built-in decoders start their output layer at a tenth of a
            standard Linear init (values start near 0, gradients reach the encoder at once).
        logvar_clamp: ``(low, high)`` for logvar, or None (see :func:`vib_sample_kl`).
        logvar_init: initial logvar bias (default -5: sigma ~ 0.08), so the latent starts informative.
        backend: backend of the fused op (``"auto"``, ``"triton"``, ``"torch"``).

    At initialisation the encoder is a standard ``nn.Linear`` (``mu`` of order 1 for a normed hidden
    state) with its logvar biases at ``logvar_init``: z starts as a nearly noise-free projection of h
    (an informative latent), and the KL term then decides how much of it the critic keeps. (A prior-
    like start, mu ~ 0 and sigma = 1, is a saddle: z is pure noise, so the value cannot learn.)
    """

    def __init__(
        self,
        hidden_size: int,
        latent_dim: int = 64,
        beta: float = 1e-3,
        decoder: Union[str, nn.Module] = "linear",
        logvar_clamp: Optional[Tuple[float, float]] = (-20.0, 10.0),
        backend: str = "auto",
        logvar_init: float = -5.0,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta >= 0.0 or math.isinf(beta):
            raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
        self.hidden_size = hidden_size
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.logvar_clamp = _check_clamp(logvar_clamp)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if isinstance(logvar_init, bool) or not isinstance(logvar_init, (int, float)) or not math.isfinite(logvar_init):
            raise ValueError(f"logvar_init must be a finite float, got {logvar_init!r}")
        self.logvar_init = float(logvar_init)
        self.encoder = nn.Linear(hidden_size, 2 * latent_dim)  # standard init for the weights
        with torch.no_grad():
            self.encoder.bias[:latent_dim].zero_()
            self.encoder.bias[latent_dim:].fill_(self.logvar_init)
        self.decoder = _build_decoder(decoder, latent_dim)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        row_ids: Optional[torch.Tensor] = None,
    ) -> VIBHeadOutput:
        """``hidden [..., H]``, ``mask [...]`` (bool/int/float; None = all tokens), ``seed`` for eps.

        ``row_ids [...]`` (int32/int64, shape ``hidden.shape[:-1]``, non-negative): an id per token
        keying its noise, so the same id gets the same eps however tokens are batched (see
        :func:`vrpo_fast.ops.vib_sample_kl`); None keys the noise by position in the batch.
        """
        hidden = _prepare_inputs(hidden, mask, self.encoder)
        stats = self.encoder(hidden)
        mu, logvar = stats[..., : self.latent_dim], stats[..., self.latent_dim :]
        z, kl_per_token = vib_sample_kl(
            mu, logvar, seed=seed, training=self.training, logvar_clamp=self.logvar_clamp, backend=self.backend,
            row_ids=row_ids,
        )
        values = self._decode(z, hidden)
        values_mean = self._decode(mu, hidden) if self.training else values
        kl_per_token = kl_per_token.float()
        return VIBHeadOutput(values, z, kl_per_token, _masked_token_mean(kl_per_token, mask), values_mean)

    def _decode(self, z: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        values = self.decoder(z)
        if values.dim() == z.dim() and values.shape[-1] == 1:
            values = values.squeeze(-1)
        if values.shape != hidden.shape[:-1]:
            raise ValueError(
                f"decoder must map [..., {self.latent_dim}] -> [..., 1], got output shape {tuple(values.shape)}"
            )
        return values.float()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, latent_dim={self.latent_dim}, beta={self.beta}, "
            f"logvar_clamp={self.logvar_clamp}, logvar_init={self.logvar_init}"
        )


class ScalarValueHead(nn.Module):
    """Plain PPO value head: ``value = Linear(H, 1)(h)``, zero-initialised; same call and output as
    :class:`VIBValueHead` with ``z=None``, zero KL and ``beta = 0``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.beta = 0.0
        self.value = _zero_init_linear(nn.Linear(hidden_size, 1))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        row_ids: Optional[torch.Tensor] = None,
    ) -> VIBHeadOutput:
        """``seed`` and ``row_ids`` are accepted for interface parity and ignored (nothing is sampled)."""
        hidden = _prepare_inputs(hidden, mask, self.value)
        values = self.value(hidden).squeeze(-1).float()
        zeros = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        return VIBHeadOutput(values, None, zeros, zeros.new_zeros(()), values)
