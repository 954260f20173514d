"""Triton kernels for the VIB reparameterisation ``z = mu + exp(lv / 2) * eps`` and the per-row
KL to N(0, I), ``0.5 * sum_j (mu^2 + exp(lv) - lv - 1)`` with ``lv = clamp(logvar)``.

The noise ``eps`` is Philox ``tl.randn(seed, i)`` where ``i`` is the element's flat (row-major,
logical) index, or, given ``row_ids``, ``i = row_ids[r] * n_cols + j`` (int64) so that a row's noise
depends on its id, not on where it sits in the batch. It never touches memory: the forward draws
it, the backward draws the same numbers again from the seed (and ids). That leaves ``mu`` and
``logvar`` (and the int ``row_ids``) as the only tensors kept for backward.

Inputs are 2-D ``[rows, latent]`` views whose last dimension is contiguous (row strides are free,
so the two halves of an encoder output can be passed without a copy). Arithmetic is in fp32 (fp64
for fp64 inputs); ``z`` / gradients are stored in the input dtype, the KL in the ``kl`` buffer's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2, num_warps_for

# Elements per program: large enough to amortise the per-row KL reduction and launch overhead,
# small enough that the Philox state (four 32-bit words per element) stays in registers.
_TILE = 2048
_INT32_MAX = 2**31 - 1


@triton.jit
def _clamp_keep_nan(x, lo, hi):
    # torch.clamp semantics: NaN stays NaN (tl.minimum / tl.maximum may return the other operand, and
    # do on GPUs and in the interpreter alike for some inputs), so a NaN logvar gives a NaN z and KL.
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit(do_not_specialize=["seed"])
def _vib_fwd_kernel(
    mu_ptr, lv_ptr, z_ptr, kl_ptr, ids_ptr,
    seed, n_rows, n_cols,
    stride_mu, stride_lv, stride_z,
    clamp_lo, clamp_hi,
    TRAINING: tl.constexpr, CLAMP: tl.constexpr, INT64: tl.constexpr, HAS_ROW_IDS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    if INT64:
        rows = rows.to(tl.int64)
    if HAS_ROW_IDS:
        # Philox counter base of each row: its id, in int64 (id * n_cols overflows int32).
        noise_row = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64) * n_cols
    kl = tl.zeros([BLOCK_R], dtype=COMPUTE)
    for start in range(0, n_cols, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        m = row_ok[:, None] & (cols < n_cols)[None, :]
        # Padding loads mu = lv = 0, whose KL term exp(0) - 0 - 1 + 0 is exactly 0: no where() needed.
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=m, other=0.0).to(COMPUTE)
        lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=m, other=0.0).to(COMPUTE)
        if CLAMP:
            lv = _clamp_keep_nan(lv, clamp_lo, clamp_hi)
        std = tl.exp(0.5 * lv)
        kl += tl.sum(mu * mu + std * std - lv - 1.0, axis=1)
        if TRAINING:
            if HAS_ROW_IDS:
                eps = tl.randn(seed, noise_row[:, None] + cols[None, :]).to(COMPUTE)
            else:
                eps = tl.randn(seed, rows[:, None] * n_cols + cols[None, :]).to(COMPUTE)
            z = mu + std * eps
            tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=m)
    tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _vib_bwd_kernel(
    mu_ptr, lv_ptr, gz_ptr, gkl_ptr, dmu_ptr, dlv_ptr, ids_ptr,
    seed, n_rows, n_cols,
    stride_mu, stride_lv, stride_gz,
    clamp_lo, clamp_hi,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, CLAMP: tl.constexpr, INT64: tl.constexpr,
    HAS_ROW_IDS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    if INT64:
        rows = rows.to(tl.int64)
    if HAS_GZ and HAS_ROW_IDS:
        noise_row = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64) * n_cols
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0).to(COMPUTE)[:, None]
    for start in range(0, n_cols, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        m = row_ok[:, None] & (cols < n_cols)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=m, other=0.0).to(COMPUTE)
        lv_in = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=m, other=0.0).to(COMPUTE)
        lv = lv_in
        if CLAMP:
            lv = _clamp_keep_nan(lv_in, clamp_lo, clamp_hi)
        std = tl.exp(0.5 * lv)
        dmu = tl.zeros([BLOCK_R, BLOCK_L], dtype=COMPUTE)
        dlv = tl.zeros([BLOCK_R, BLOCK_L], dtype=COMPUTE)
        if HAS_GKL:
            # d/dmu = mu, d/dlv = (exp(lv) - 1) / 2, times the row's upstream KL gradient.
            dmu += gkl * mu
            dlv += 0.5 * gkl * (std * std - 1.0)
        if HAS_GZ:
            gz = tl.load(gz_ptr + rows[:, None] * stride_gz + cols[None, :], mask=m, other=0.0).to(COMPUTE)
            # Same seed and offsets as the forward: the very same eps, regenerated instead of stored.
            if HAS_ROW_IDS:
                eps = tl.randn(seed, noise_row[:, None] + cols[None, :]).to(COMPUTE)
            else:
                eps = tl.randn(seed, rows[:, None] * n_cols + cols[None, :]).to(COMPUTE)
            dmu += gz
            dlv += 0.5 * gz * eps * std
        if CLAMP:
            # torch.clamp semantics: the gradient passes inside [lo, hi] (bounds included), else 0.
            dlv = tl.where((lv_in >= clamp_lo) & (lv_in <= clamp_hi), dlv, 0.0)
        offs = rows[:, None] * n_cols + cols[None, :]
        tl.store(dmu_ptr + offs, dmu.to(dmu_ptr.dtype.element_ty), mask=m)
        tl.store(dlv_ptr + offs, dlv.to(dlv_ptr.dtype.element_ty), mask=m)


def _blocks(n_rows: int, n_cols: int, fixed_rows: bool = False):
    """Tile shape. ``fixed_rows`` (the row_ids path) makes it independent of ``n_rows``, so each
    row's KL is reduced in the same order however many rows share the call (batch invariance)."""
    block_l = min(next_power_of_2(n_cols), _TILE)
    block_r = max(1, _TILE // block_l if fixed_rows else min(_TILE // block_l, next_power_of_2(n_rows)))
    return block_r, block_l


def _needs_int64(n_rows: int, *row_strides: int) -> bool:
    return any(n_rows * max(s, 1) > _INT32_MAX for s in row_strides)


def _clamp_args(logvar_clamp):
    if logvar_clamp is None:
        return False, 0.0, 0.0
    return True, float(logvar_clamp[0]), float(logvar_clamp[1])


def vib_forward(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int, training: bool, logvar_clamp, kl_dtype: torch.dtype,
    row_ids: Optional[torch.Tensor] = None,
):
    """``mu``, ``logvar``: ``[rows, L]`` with stride(-1) == 1; ``row_ids``: None or contiguous int32/int64
    ``[rows]`` ids keying the noise. Returns ``(z [rows, L] or None, kl [rows])``."""
    n_rows, n_cols = mu.shape
    kl = torch.empty(n_rows, device=mu.device, dtype=kl_dtype)
    z = torch.empty((n_rows, n_cols), device=mu.device, dtype=mu.dtype) if training else None
    if n_rows == 0:
        return z, kl
    clamp, lo, hi = _clamp_args(logvar_clamp)
    has_ids = row_ids is not None
    block_r, block_l = _blocks(n_rows, n_cols, fixed_rows=has_ids)
    _vib_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        mu, logvar, z if training else mu, kl, row_ids if has_ids else kl,
        seed, n_rows, n_cols,
        mu.stride(0), logvar.stride(0), n_cols,
        lo, hi,
        TRAINING=training, CLAMP=clamp,
        INT64=_needs_int64(n_rows, n_cols, mu.stride(0), logvar.stride(0)), HAS_ROW_IDS=has_ids,
        COMPUTE=tl.float64 if mu.dtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps_for(block_r * block_l),
    )
    return z, kl


def vib_backward(mu, logvar, grad_z, grad_kl, seed: int, logvar_clamp, row_ids: Optional[torch.Tensor] = None):
    """Gradients w.r.t. ``mu`` and ``logvar`` (contiguous ``[rows, L]``, input dtypes).

    ``grad_z`` (``[rows, L]``, stride(-1) == 1) or ``grad_kl`` (``[rows]``, contiguous) may be None.
    ``grad_z`` must be None in eval mode, where ``z`` is ``mu`` itself and takes no part here.
    ``row_ids`` must be the forward's (contiguous ``[rows]``), so that the same eps is regenerated.
    """
    n_rows, n_cols = mu.shape
    dmu = torch.empty((n_rows, n_cols), device=mu.device, dtype=mu.dtype)
    dlv = torch.empty((n_rows, n_cols), device=mu.device, dtype=logvar.dtype)
    if n_rows == 0:
        return dmu, dlv
    clamp, lo, hi = _clamp_args(logvar_clamp)
    has_ids = row_ids is not None
    block_r, block_l = _blocks(n_rows, n_cols, fixed_rows=has_ids)
    stride_gz = grad_z.stride(0) if grad_z is not None else n_cols
    _vib_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        mu, logvar, grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu, dmu, dlv,
        row_ids if has_ids else dmu,
        seed, n_rows, n_cols,
        mu.stride(0), logvar.stride(0), stride_gz,
        lo, hi,
        HAS_GZ=grad_z is not None, HAS_GKL=grad_kl is not None, CLAMP=clamp,
        INT64=_needs_int64(n_rows, n_cols, mu.stride(0), logvar.stride(0), stride_gz), HAS_ROW_IDS=has_ids,
        COMPUTE=tl.float64 if mu.dtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps_for(block_r * block_l),
    )
    return dmu, dlv
