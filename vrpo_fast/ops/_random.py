"""Counter-based random numbers: each draw is a pure function of ``(seed, key..., counter)``.

A stateful generator hands out numbers in call order, so what a row receives depends on which rows
were batched with it and on which process it landed. Where that must not happen (the rollout
sampler and the VIB noise of a data-parallel run, which has to match a single-process run with the
same global batch), draws are keyed instead: a SplitMix64 hash of the seed and integer keys (global
row, position, vocabulary id, ...), vectorised as int64 tensor arithmetic, so it runs unchanged on
any device. SplitMix64's finaliser is a bijection with full avalanche; hashing a counter through it
is the construction behind SplittableRandom / SplitMix and passes BigCrush.

int64 tensor arithmetic wraps modulo 2**64 on every PyTorch backend; right shifts are arithmetic,
so each shift is masked to make it logical.
"""
from __future__ import annotations

import math
from typing import Union

import torch

__all__ = ["keyed_hash", "keyed_uniform", "keyed_normal", "keyed_gumbel"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` by ``s`` bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser (a bijection of 64-bit patterns)."""
    x = (x ^ _srl(x, 30)) * _signed(_M1)
    x = (x ^ _srl(x, 27)) * _signed(_M2)
    return x ^ _srl(x, 31)


def keyed_hash(seed: int, *keys: Union[torch.Tensor, int]) -> torch.Tensor:
    """int64 hash of ``seed`` and the integer ``keys`` (tensors broadcast together; ints are scalars).

    Distinct key tuples give independent-looking 64-bit patterns; the order of the keys matters.
    """
    if not keys:
        raise ValueError("keyed_hash needs at least one key")
    tensors = [k for k in keys if isinstance(k, torch.Tensor)]
    device = tensors[0].device if tensors else None
    h = torch.tensor(_signed(int(seed) * _GOLDEN + _GOLDEN), dtype=torch.int64, device=device)
    h = _mix(h)
    for k in keys:
        k = k.to(torch.int64) if isinstance(k, torch.Tensor) else torch.tensor(int(k), dtype=torch.int64, device=device)
        h = _mix(h ^ _mix(k + _signed(_GOLDEN)))
    return h


def _unit(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """24 hash bits -> a float in (0, 1), never 0 or 1 (so logs stay finite).

    In fp32, ``bits + 0.5`` needs 25 significant bits once ``bits >= 2**23`` and rounds to even:
    ``bits = 2**24 - 1`` would give exactly 1.0 (an infinite Gumbel), so the top is clamped to the
    largest float below 1 (the fused sampling kernel clamps the same way).
    """
    u = (bits.to(dtype) + 0.5) * (2.0 ** -24)
    return u.clamp_(max=1.0 - torch.finfo(dtype).eps / 2)


def keyed_uniform(seed: int, *keys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(0, 1) (open interval, 24-bit resolution) keyed by ``(seed, *keys)``."""
    return _unit(_srl(keyed_hash(seed, *keys), 40), dtype)


def keyed_normal(seed: int, *keys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) keyed by ``(seed, *keys)``: Box-Muller on two 24-bit uniforms from one hash."""
    h = keyed_hash(seed, *keys)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u1 = _unit(_srl(h, 40), compute)
    u2 = _unit(_srl(h, 16) & 0xFFFFFF, compute)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)


def keyed_gumbel(seed: int, *keys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel keyed by ``(seed, *keys)``: ``argmax(logits + g)`` samples ``softmax(logits)``."""
    return -torch.log(-torch.log(keyed_uniform(seed, *keys, dtype=dtype)))
