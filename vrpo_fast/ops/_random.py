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


# keyed_normal's Box-Muller uses only +, -, *, / and exact bit operations (frexp, integer quadrant),
# in float32 and in a fixed order: libm, SLEEF, vendor and CUDA log / cos / sqrt differ in the last
# bit (torch's own CPU kernels even round differently in vectorised bodies and scalar tails), so a
# stream built on them could not be reproduced bit for bit by the C++ extension (csrc/common.h,
# keyed_normal_f32), which evaluates exactly these operations. Constants are float32 values (exact
# in both); series: log f = 2 atanh(s) = 2 sum s^(2k+1) / (2k+1), cos / sin on [-pi/4, pi/4].
_F = float.fromhex
_LN2 = _F("0x1.62e430p-1")
_TWO_PI = _F("0x1.921fb6p+2")
_SQRT_HALF = _F("0x1.6a09e6p-1")
_ATANH_COEFS = tuple(map(_F, ("0x1p0", "0x1.555556p-2", "0x1.99999ap-3", "0x1.24924ap-3", "0x1.c71c72p-4",
                              "0x1.745d18p-4")))
_COS_COEFS = tuple(map(_F, ("0x1p0", "-0x1p-1", "0x1.555556p-5", "-0x1.6c16c2p-10", "0x1.a01a02p-16",
                            "-0x1.27e4fcp-22")))
_SIN_COEFS = tuple(map(_F, ("0x1p0", "-0x1.555556p-3", "0x1.111112p-7", "-0x1.a01a02p-13", "0x1.71de3ap-19",
                            "-0x1.ae6456p-26")))


def _horner(x: torch.Tensor, coefs) -> torch.Tensor:
    p = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        p = p * x + c
    return p


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt of positive float32 from basic operations: 1/sqrt by an exponent-halving bit estimate
    and 3 Newton steps ``y (1.5 - x/2 y^2)``, times ``x``. Not torch.sqrt: large CPU tensors may go
    through a vendor math library, so its last bit is not the C++ twin's."""
    half = 0.5 * x
    y = (0x5F3759DF - (x.contiguous().view(torch.int32) >> 1)).view(torch.float32)
    for _ in range(3):
        y = y * (1.5 - half * y * y)
    return x * y


def keyed_normal(seed: int, *keys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) keyed by ``(seed, *keys)``: Box-Muller on two 23-bit uniforms from one hash.

    The last key ``c`` is a counter whose consecutive pairs share a draw: the hash is of
    ``(seed, ..., c >> 1)`` and the value is the draw's cosine output for even ``c``, its sine output
    (an independent normal) for odd ``c``, so a row of noise costs one hash per two values.
    ``u = (b + 1/2) 2^-23`` (b: hash bits 41..63 and 17..39), ``sqrt(-2 log u1) cos(2 pi u2)``
    evaluated in float32 from basic IEEE operations only (series for log and cos, exact range
    reduction, Newton steps for 1/sqrt; ~1e-7 relative to the exact formula), then converted to
    ``dtype`` (float64 gets the float32 value). The result is the same bits on every device and in
    the C++ extension, which draws this stream for the VIB noise on CPU. Tails reach 5.8 sigma.
    """
    if not keys:
        raise ValueError("keyed_normal needs at least one key")
    last = keys[-1]
    odd = (last & 1) == 1 if isinstance(last, torch.Tensor) else bool(int(last) & 1)
    h = keyed_hash(seed, *keys[:-1], last >> 1 if isinstance(last, torch.Tensor) else int(last) >> 1)
    f32 = torch.float32
    b1, b2 = _srl(h, 41), _srl(h, 17) & 0x7FFFFF
    u1 = (2 * b1 + 1).to(f32) * (2.0 ** -24)  # exact: 2 b + 1 < 2^24
    u2 = (2 * b2 + 1).to(f32) * (2.0 ** -24)
    # log u1 = log f + e log 2, f in [sqrt(1/2), sqrt(2)), log f = 2 atanh((f - 1) / (f + 1)).
    f, e = torch.frexp(u1)  # f in [0.5, 1)
    low = f < _SQRT_HALF
    f = torch.where(low, f * 2.0, f)
    e = torch.where(low, e - 1, e).to(f32)
    s = (f - 1.0) / (f + 1.0)
    log_u1 = (2.0 * s) * _horner(s * s, _ATANH_COEFS) + e * _LN2
    radius = _sqrt(-2.0 * log_u1)
    # cos(2 pi u2) = cos(q pi / 2 + theta), q = round(4 u2) (never a tie), |theta| <= pi / 4.
    q = (b2 + (1 << 20)) >> 21
    theta = (u2 - q.to(f32) * 0.25) * _TWO_PI
    t2 = theta * theta
    c = _horner(t2, _COS_COEFS)
    sn = _horner(t2, _SIN_COEFS) * theta
    quadrant = q & 3
    cs = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -sn, torch.where(quadrant == 2, -c, sn)))
    ss = torch.where(quadrant == 0, sn, torch.where(quadrant == 1, c, torch.where(quadrant == 2, -sn, -c)))
    return (radius * torch.where(torch.as_tensor(odd, device=radius.device), ss, cs)).to(dtype)


def keyed_gumbel(seed: int, *keys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel keyed by ``(seed, *keys)``: ``argmax(logits + g)`` samples ``softmax(logits)``."""
    return -torch.log(-torch.log(keyed_uniform(seed, *keys, dtype=dtype)))
