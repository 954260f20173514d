"""Generalised advantage estimation (GAE) over ``[B, T]`` tensors with a token mask.

``gae(rewards, values, mask, gamma=, lam=)`` returns ``(advantages, returns)``. Per row, going back in
time::

    delta[t] = r[t] + gamma * v[next(t)] - v[t]          (v[next(t)] = 0 after the last unmasked token)
    adv[t]   = delta[t] + gamma * lam * adv[next(t)]
    ret[t]   = adv[t] + v[t]

where ``next(t)`` is the first *unmasked* token after ``t``. Masked tokens are transparent: they get
advantage 0 and return 0 and the recursion carries straight across them, which covers right padding,
left padding and multi-turn responses with tool / observation tokens in between, with one rule.

``whiten=True`` then standardises the advantages over all unmasked tokens of the batch (mean and
*unbiased* variance, as TRL's and verl's ``masked_whiten``; ``(a - mean) / sqrt(var + 1e-8)``);
``shift_mean=False`` adds the mean back. Masked tokens stay 0; returns are never whitened.

Backends (``backend="auto"`` picks by device):

* CUDA -> Triton (:mod:`vrpo_fast.kernels.gae`): one launch, no host synchronisation (whitening adds
  one more launch). With ``validate=True`` (default) the inputs are checked for NaN/inf and the mask
  for 0/1 first, which costs one device sync; pass ``validate=False`` to skip it.
* CPU -> the C++ extension ``vrpo_fast._C``: reads the tensors in place (any strides), threads over
  rows, releases the GIL, validates inside the same pass (free) and fuses the whitening statistics.
  If the extension is missing, a vectorised PyTorch implementation (reverse cumulative sums, no loop
  over T) gives the same results, with a one-time warning explaining how to rebuild.

The outputs are plain tensors (no autograd): GAE targets are constants for the PPO losses.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Tuple

import torch

from ._common import FLOAT_DTYPES, check_backend, check_same_shape, check_tensor, data_checks_possible, resolve_backend

_WHITEN_EPS = 1e-8
# Mask dtypes the C++ pass reads in place (codes shared with csrc/gae.cpp); others are converted.
_MASK_CODES = {
    torch.bool: 7,
    torch.uint8: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.float32: 5,
    torch.float64: 6,
}
_VALUE_CODES = {torch.float32: 0, torch.float64: 1}
# Fallback: the reverse cumulative sums are scaled by (gamma*lam)^-k, k <= chunk length; keep the
# scale below exp(600) so float64 never overflows (whatever gamma*lam > 0 is).
_MAX_LOG_SCALE = 600.0
# Fallback works on blocks of about this many elements (float64 temporaries of ~256 KiB stay in
# cache and in malloc's free lists instead of fresh page-faulting allocations).
_FALLBACK_BLOCK_ELEMENTS = 1 << 15

# Tests set this to exercise the pure-PyTorch fallback even when the extension is built.
_FORCE_TORCH_FALLBACK = False
_warned_missing_extension = False


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def gae_reference(rewards, values, mask, *, gamma=1.0, lam=1.0, whiten=False, shift_mean=True):
    """Loop over time of whole-column torch ops (float64 inside); the semantics the fast paths match."""
    B, T = rewards.shape
    r = rewards.double()
    v = values.double()
    on = mask != 0
    m = on.double()
    adv = torch.zeros_like(r)
    next_v = torch.zeros(B, dtype=torch.float64, device=r.device)
    run = torch.zeros(B, dtype=torch.float64, device=r.device)
    for t in reversed(range(T)):
        candidate = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * run
        run = torch.where(on[:, t], candidate, run)
        next_v = torch.where(on[:, t], v[:, t], next_v)
        adv[:, t] = torch.where(on[:, t], run, torch.zeros_like(run))
    ret = torch.where(on, adv + v, torch.zeros_like(adv))
    if whiten:
        n = m.sum()
        mean = (adv * m).sum() / n.clamp_min(1)
        var = (((adv - mean) * m) ** 2).sum() / (n - 1).clamp_min(1)
        w = (adv - mean) * torch.rsqrt(var + _WHITEN_EPS)
        if not shift_mean:
            w = w + mean
        adv = w * m
    return adv.to(rewards.dtype), ret.to(rewards.dtype)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
    shift_mean: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns for ``[B, T]`` rewards/values; masked tokens are transparent.

    Args:
        rewards, values: ``[B, T]`` float tensors of one dtype (float32/float64; float16/bfloat16 are
            computed in float32). Outputs have this dtype and are contiguous.
        mask: ``[B, T]`` bool, or any numeric dtype holding only 0/1. 0 = not part of the response.
        gamma, lam: discount and GAE lambda, in [0, 1].
        whiten: standardise advantages over all unmasked tokens (unbiased variance, eps 1e-8).
        shift_mean: with ``whiten``, False adds the mean back (TRL / verl ``shift_mean``).
        backend: ``"auto"`` (CUDA -> Triton, CPU -> C++), ``"triton"``, or ``"torch"`` (C++ extension
            on CPU when built, else vectorised PyTorch).
        validate: check for NaN/inf in rewards/values and a 0/1 mask. Free on CPU (done in the C++
            pass); on CUDA it costs one host sync. With ``validate=False`` any nonzero mask entry
            counts as unmasked and non-finite inputs propagate.

    Returns:
        ``(advantages, returns)``; ``returns = advantages + values`` before whitening, 0 where masked.
    """
    _check_inputs(rewards, values, mask)
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)
    check_backend(backend)
    # No autograd: GAE targets are constants for the losses.
    return _gae_op(rewards.detach(), values.detach(), mask.detach(), gamma, lam, bool(whiten), bool(shift_mean),
                   backend, bool(validate))


# ----------------------------------------------------------------------------------------------
# Custom op: torch.compile traces the fake kernel; the data checks (finite inputs, 0/1 mask) run
# inside the op at run time, so they never become a Python branch in a traced graph.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vrpo_fast::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
            whiten: bool, shift_mean: bool, backend: str, validate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    path = resolve_backend(backend, rewards, values, mask)
    B, T = rewards.shape
    if B == 0 or T == 0:
        return torch.zeros((B, T), dtype=rewards.dtype, device=rewards.device), torch.zeros(
            (B, T), dtype=rewards.dtype, device=rewards.device)
    with torch.no_grad():
        if path == "triton":
            if validate:
                _validate_with_torch(rewards, values, mask)
            from vrpo_fast.kernels.gae import gae_triton

            return gae_triton(rewards, values, mask, gamma, lam, whiten, shift_mean)
        ext = None if (rewards.is_cuda or _FORCE_TORCH_FALLBACK) else _extension_or_warn()
        if ext is not None:
            return _gae_cpp(ext, rewards, values, mask, gamma, lam, whiten, shift_mean, validate)
        if validate:
            _validate_with_torch(rewards, values, mask)
        return _gae_torch(rewards, values, mask, gamma, lam, whiten, shift_mean)


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, whiten, shift_mean, backend, validate):
    B, T = rewards.shape
    return (torch.empty((B, T), dtype=rewards.dtype, device=rewards.device),
            torch.empty((B, T), dtype=rewards.dtype, device=rewards.device))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_inputs(rewards, values, mask) -> None:
    check_tensor("rewards", rewards, ndim=(2,))
    check_tensor("values", values, ndim=(2,), device=rewards.device)
    check_tensor("mask", mask, ndim=(2,), device=rewards.device)
    if rewards.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rewards must be a floating tensor (float32/float64/float16/bfloat16), got {rewards.dtype}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be a floating tensor (float32/float64/float16/bfloat16), got {values.dtype}")
    if values.dtype != rewards.dtype:
        raise TypeError(f"values must have the same dtype as rewards ({rewards.dtype}), got {values.dtype}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or a real numeric tensor of 0/1, got {mask.dtype}")
    check_same_shape("rewards", rewards, "values", values)
    check_same_shape("rewards", rewards, "mask", mask)


def _check_unit_interval(name: str, x) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(x).__name__}")
    x = float(x)
    if not 0.0 <= x <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def _validate_with_torch(rewards, values, mask) -> None:
    """All three checks with a single device->host transfer (one sync on CUDA)."""
    if not data_checks_possible(rewards):
        return  # inside CUDA-graph capture: no host read possible (non-finite inputs propagate)
    checks = [~torch.isfinite(rewards).all(), ~torch.isfinite(values).all()]
    if mask.dtype != torch.bool:
        checks.append(((mask != 0) & (mask != 1)).any())
    else:
        checks.append(torch.zeros((), dtype=torch.bool, device=mask.device))
    bad_r, bad_v, bad_m = torch.stack(checks).tolist()
    if bad_r:
        raise ValueError("rewards contains NaN or inf")
    if bad_v:
        raise ValueError("values contains NaN or inf")
    if bad_m:
        raise ValueError("mask must contain only 0 and 1 (or be a bool tensor)")


# ----------------------------------------------------------------------------------------------
# C++ extension
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load_extension():
    """The compiled ``vrpo_fast._C`` with the GAE entry point, or ``(None, reason)``."""
    try:
        from vrpo_fast import _C
    except ImportError as e:  # not built, or built for another Python / ABI
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(_C, "gae_forward"):
        return None, "vrpo_fast._C is an old build without gae_forward"
    return _C, None


def _extension_or_warn():
    global _warned_missing_extension
    ext, reason = _load_extension()
    if ext is None and not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            f"vrpo_fast C++ extension unavailable ({reason}); gae() falls back to a slower vectorised "
            "PyTorch path on CPU. Rebuild it with `pip install -e . --no-build-isolation` (or "
            "`pip install -e .`) from the vrpo-fast checkout.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ext


def _gae_cpp(ext, rewards, values, mask, gamma, lam, whiten, shift_mean, validate):
    out_dtype = rewards.dtype
    if out_dtype not in _VALUE_CODES:  # float16 / bfloat16: computed in float32
        rewards, values = rewards.float(), values.float()
    if mask.dtype not in _MASK_CODES:  # e.g. float16, uint16..64: a float32 copy keeps 0/1 (and non-0/1) exact
        mask = mask.double() if mask.dtype in (torch.uint32, torch.uint64) else mask.float()
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=rewards.dtype)
    returns = torch.empty((B, T), dtype=rewards.dtype)
    ext.gae_forward(
        rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), advantages.data_ptr(), returns.data_ptr(),
        B, T,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), mask.stride(0), mask.stride(1),
        _VALUE_CODES[rewards.dtype], _MASK_CODES[mask.dtype],
        gamma, lam, whiten, shift_mean, bool(validate), torch.get_num_threads(),
    )
    if out_dtype != rewards.dtype:
        advantages, returns = advantages.to(out_dtype), returns.to(out_dtype)
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# Vectorised PyTorch fallback (CPU without the extension; also CUDA with backend="torch")
# ----------------------------------------------------------------------------------------------
def _gae_torch(rewards, values, mask, gamma, lam, whiten, shift_mean):
    """Vectorised PyTorch GAE: blocks of rows through :func:`_gae_torch_rows`, then whitening."""
    B, T = rewards.shape
    on = mask != 0
    advantages = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    returns = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    rows = max(1, _FALLBACK_BLOCK_ELEMENTS // T)
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        adv, ret = _gae_torch_rows(rewards[b0:b1], values[b0:b1], on[b0:b1], gamma, lam)
        advantages[b0:b1] = adv
        returns[b0:b1] = ret
    if whiten:
        a = advantages.double()
        zero = torch.zeros((), dtype=torch.float64, device=a.device)
        n = on.sum()
        mean = a.sum() / n.clamp_min(1)  # masked entries are exactly 0
        var = torch.where(on, a - mean, zero).square().sum() / (n - 1).clamp_min(1)
        w = (a - mean) * torch.rsqrt(var + _WHITEN_EPS)
        if not shift_mean:
            w = w + mean
        advantages = torch.where(on, w, zero).to(rewards.dtype)
    return advantages, returns


def _gae_torch_rows(rewards, values, on, gamma, lam):
    """Closed form of the recursion with cumulative sums, in float64, for a block of rows.

    Time is reversed once on entry (index ``s = T-1-t``), so every "reverse" scan is a forward one.
    With ``k[s]`` = number of unmasked tokens in ``[0, s]`` (reversed), the advantage at an unmasked
    ``s`` is ``sum_{u <= s, unmasked} (gamma*lam)^(k[s] - k[u]) * delta[u]``
    ``= (gamma*lam)^k[s] * cumsum((gamma*lam)^-k[u] * delta[u])``. The ``(gamma*lam)^-k`` scale is
    bounded by cutting T into chunks (a single chunk for the usual ``gamma*lam >= ~0.9``), with the
    advantage at a chunk's last token carried into the next chunk.
    """
    B, T = rewards.shape
    device = rewards.device
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=device)
    r = rewards.to(f64).flip(1)
    v = values.to(f64).flip(1)
    on = on.flip(1)

    # Value of the nearest unmasked token before s (reversed time; none -> 0: terminal).
    idx = torch.arange(T, device=device).expand(B, T)
    last_at_or_before = torch.where(on, idx, torch.full_like(idx, -1)).cummax(1).values
    prev = torch.cat([torch.full((B, 1), -1, device=device, dtype=idx.dtype), last_at_or_before[:, :-1]], 1)
    next_v = torch.where(prev >= 0, v.gather(1, prev.clamp_min(0)), zero)
    # where(), not * mask: whatever sits at masked positions (even NaN with validate=False) never leaks.
    delta = torch.where(on, r + gamma * next_v - v, zero)

    gl = gamma * lam
    if gl == 0.0:
        run = delta
    elif gl == 1.0:
        run = delta.cumsum(1)
    else:
        chunk = max(1, min(T, int(_MAX_LOG_SCALE / -math.log(gl))))
        n_chunks = -(-T // chunk)
        pad = n_chunks * chunk - T  # padded tokens are masked: transparent, so harmless
        d = torch.nn.functional.pad(delta, (0, pad)).view(B, n_chunks, chunk)
        k = torch.nn.functional.pad(on.to(f64), (0, pad)).view(B, n_chunks, chunk).cumsum(2)
        # gl^k[s] (the weight of the carry entering the chunk), as exp(k log gl): pow(scalar, tensor)
        # is an order of magnitude slower; relative error ~ k * eps, k <= chunk.
        decay = torch.exp(k * math.log(gl))
        run = decay * (d / decay).cumsum(2)
        carry = torch.zeros(B, 1, dtype=f64, device=device)
        for c in range(n_chunks):
            if c:
                run[:, c] += decay[:, c] * carry
            carry = run[:, c, -1:]
        run = run.view(B, n_chunks * chunk)[:, :T]

    adv = torch.where(on, run, zero)
    ret = torch.where(on, run + v, zero)
    return adv.flip(1), ret.flip(1)
