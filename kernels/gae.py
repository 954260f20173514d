"""Triton kernels for generalised advantage estimation (GAE) over ``[B, T]`` with a token mask.

Per row, going back in time, with masked tokens transparent (they carry everything across)::

    nv[t] = value of the first unmasked token after t (0 if none: terminal)
    A[t]  = m[t] * (r[t] + gamma * nv[t] - v[t]) + c[t] * A[t + 1],   c[t] = gamma*lam if m[t] else 1
    adv[t] = m[t] * A[t];   ret[t] = m[t] * (A[t] + v[t])

Both ``nv`` and ``A`` are first-order linear recurrences ``x[t] = b[t] + c[t] * x[t + 1]``
(for ``nv``: ``b = m v``, ``c = 1 - m``, taken one token ahead). A program owns ``ROWS`` rows and walks
their time axis in ``BLOCK_T`` chunks from the end; inside a chunk each recurrence is one
``tl.associative_scan`` over the affine maps ``x -> b + c x`` (composition is associative), and the
value at the chunk's first token is carried into the next chunk. The chunk is loaded in reversed
time order so that the scan runs forward (well-defined operand order for a non-commutative combine).

The whole GAE is one launch with no host synchronisation. Whitening adds one more launch: the first
kernel also writes per-row ``(count, mean, M2)`` of the advantages (chunks merged with Chan's
formula), and :func:`_gae_whiten_kernel` merges the rows in a fixed order (deterministic, no atomics)
and rescales the advantages in place.

Arithmetic is fp32 (fp64 for fp64 inputs); fp16 / bf16 outputs are rounded once (with whitening, the
raw advantages go through an fp32 buffer that the whitening kernel reads). ``gamma`` and
``gamma * lam`` arrive as fp32 hi/lo pairs so the fp64 path keeps ~48 bits of them (Triton passes
Python floats to kernels as fp32).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2, num_warps_for

# Chunk length along T: long enough that the per-chunk carry bookkeeping is negligible, short enough
# that the two scans of (c, b) pairs stay in registers.
_MAX_BLOCK_T = 1024
# Elements per program when several short rows share one program.
_TILE = 1024
# Below this many programs, keep one row per program (an H100 has 132 SMs).
_MIN_PROGRAMS = 256
_INT32_MAX = 2**31 - 1


@triton.jit
def _affine_compose(c_first, b_first, c_then, b_then):
    # (x -> b_first + c_first x) applied first, then (y -> b_then + c_then y).
    return c_then * c_first, b_then + c_then * b_first


@triton.jit
def _gae_fwd_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, stats_ptr,
    B, T,
    s_rb, s_rt, s_vb, s_vt, s_mb, s_mt,
    gamma_hi, gamma_lo, gl_hi, gl_lo,
    WITH_STATS: tl.constexpr, INT64: tl.constexpr, COMPUTE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    gamma = tl.cast(gamma_hi, COMPUTE) + tl.cast(gamma_lo, COMPUTE)
    gl = tl.cast(gl_hi, COMPUTE) + tl.cast(gl_lo, COMPUTE)
    # j-th lane of a chunk holds time start + BLOCK_T - 1 - j (reversed: the scan runs back in time).
    j = tl.arange(0, BLOCK_T)
    is_first_token = (j == BLOCK_T - 1)[None, :]

    zero_rows = tl.zeros([ROWS], dtype=COMPUTE)
    nv_carry = zero_rows  # value of the first unmasked token after the chunk's end (+1)
    adv_carry = zero_rows  # running advantage entering the chunk from the right
    n_acc = zero_rows
    mean_acc = zero_rows
    m2_acc = zero_rows

    n_chunks = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_chunks):
        start = (n_chunks - 1 - k) * BLOCK_T
        t = start + BLOCK_T - 1 - j
        if INT64:
            t = t.to(tl.int64)
        in_t = row_ok[:, None] & (t < T)[None, :]
        in_t1 = row_ok[:, None] & (t + 1 < T)[None, :]
        r = tl.load(r_ptr + rows[:, None] * s_rb + t[None, :] * s_rt, mask=in_t, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + rows[:, None] * s_vb + t[None, :] * s_vt, mask=in_t, other=0.0).to(COMPUTE)
        on = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt, mask=in_t, other=0) != 0
        # One token ahead (these reads hit the lines just loaded, or the neighbouring chunk's).
        v1 = tl.load(v_ptr + rows[:, None] * s_vb + (t + 1)[None, :] * s_vt, mask=in_t1, other=0.0).to(COMPUTE)
        on1 = tl.load(m_ptr + rows[:, None] * s_mb + (t + 1)[None, :] * s_mt, mask=in_t1, other=0) != 0

        # nv[t] = next unmasked value strictly after t: recurrence on the one-ahead sequence.
        one = tl.full([ROWS, BLOCK_T], 1.0, COMPUTE)
        zero = tl.zeros([ROWS, BLOCK_T], dtype=COMPUTE)
        c_nv, b_nv = tl.associative_scan((tl.where(on1, zero, one), tl.where(on1, v1, zero)), 1, _affine_compose)
        nv = b_nv + c_nv * nv_carry[:, None]

        delta = r + gamma * nv - v
        c_a, b_a = tl.associative_scan((tl.where(on, gl, one), tl.where(on, delta, zero)), 1, _affine_compose)
        run = b_a + c_a * adv_carry[:, None]

        adv = tl.where(on, run, zero)
        ret = tl.where(on, run + v, zero)
        out_off = rows[:, None] * T + t[None, :]
        tl.store(adv_ptr + out_off, adv.to(adv_ptr.dtype.element_ty), mask=in_t)
        tl.store(ret_ptr + out_off, ret.to(ret_ptr.dtype.element_ty), mask=in_t)

        # Carries for the chunk to the left: the values at this chunk's first token.
        nv_carry = tl.sum(tl.where(is_first_token, nv, zero), axis=1)
        adv_carry = tl.sum(tl.where(is_first_token, run, zero), axis=1)

        if WITH_STATS:
            # Chunk moments about the chunk mean, merged into the row's (Chan et al.).
            adv_stored = adv.to(adv_ptr.dtype.element_ty).to(COMPUTE)
            n_c = tl.sum(on.to(COMPUTE), axis=1)
            mean_c = tl.sum(adv_stored, axis=1) / tl.maximum(n_c, 1.0)
            dev = tl.where(on, adv_stored - mean_c[:, None], zero)
            m2_c = tl.sum(dev * dev, axis=1)
            n_new = n_acc + n_c
            d = mean_c - mean_acc
            frac = n_c / tl.maximum(n_new, 1.0)
            mean_acc = mean_acc + d * frac
            m2_acc = m2_acc + m2_c + d * d * n_acc * frac
            n_acc = n_new

    if WITH_STATS:
        tl.store(stats_ptr + rows * 3 + 0, n_acc, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, mean_acc, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, m2_acc, mask=row_ok)


@triton.jit
def _gae_whiten_kernel(
    adv_ptr, out_ptr, m_ptr, stats_ptr,
    B, T, s_mb, s_mt, n_elements,
    SHIFT_MEAN: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
):
    # Every program merges the B per-row moments itself (same order in all programs, so all agree
    # bit for bit): mean = sum n_i mu_i / N, M2 = sum M2_i + sum n_i (mu_i - mean)^2.
    rb = tl.arange(0, BLOCK_B)
    n_tot = tl.zeros([BLOCK_B], dtype=COMPUTE)
    s_tot = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for b0 in range(0, B, BLOCK_B):
        ok = b0 + rb < B
        n_i = tl.load(stats_ptr + (b0 + rb) * 3 + 0, mask=ok, other=0.0)
        mu_i = tl.load(stats_ptr + (b0 + rb) * 3 + 1, mask=ok, other=0.0)
        n_tot += n_i
        s_tot += n_i * mu_i
    n = tl.sum(n_tot, axis=0)
    mean = tl.sum(s_tot, axis=0) / tl.maximum(n, 1.0)
    m2_tot = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for b0 in range(0, B, BLOCK_B):
        ok = b0 + rb < B
        n_i = tl.load(stats_ptr + (b0 + rb) * 3 + 0, mask=ok, other=0.0)
        mu_i = tl.load(stats_ptr + (b0 + rb) * 3 + 1, mask=ok, other=0.0)
        m2_i = tl.load(stats_ptr + (b0 + rb) * 3 + 2, mask=ok, other=0.0)
        dm = mu_i - mean
        m2_tot += m2_i + n_i * dm * dm
    var = tl.sum(m2_tot, axis=0) / tl.maximum(n - 1.0, 1.0)  # unbiased (Bessel), as TRL / verl
    inv_std = 1.0 / tl.sqrt(var + 1e-8)

    # Grid-stride over the flat [B, T] advantages (contiguous), rescaled into out (adv itself, or the
    # fp16 / bf16 output when adv is the fp32 staging buffer).
    lane = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(n_elements, BLOCK)
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        idx = tl.cast(blk, tl.int64) * BLOCK + lane
        ok = idx < n_elements
        row = idx // T
        col = idx - row * T
        on = tl.load(m_ptr + row * s_mb + col * s_mt, mask=ok, other=0) != 0
        a = tl.load(adv_ptr + idx, mask=ok, other=0.0).to(COMPUTE)
        w = (a - mean) * inv_std
        if not SHIFT_MEAN:
            w = w + mean
        w = tl.where(on, w, tl.zeros_like(w))
        tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=ok)


def _split_hi_lo(x: float):
    """``x`` as two fp32-representable floats whose sum is ``x`` to ~48 bits (host-side, no sync)."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi))
    return hi, lo


@functools.lru_cache(maxsize=None)
def _whiten_programs(device_index) -> int:
    if device_index is None:  # interpreter (CPU tensors)
        return 4
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_offset(t: torch.Tensor) -> int:
    B, T = t.shape
    return (B - 1) * abs(t.stride(0)) + T * abs(t.stride(1))


def gae_triton(rewards, values, mask, gamma: float, lam: float, whiten: bool, shift_mean: bool, block_t=None):
    """Launch the GAE kernel (and, when ``whiten``, the whitening kernel). No validation, no sync.

    ``rewards``/``values``: [B, T] floating tensors of one dtype (any strides); ``mask``: [B, T] bool or
    numeric (nonzero = unmasked). Returns contiguous ``(advantages, returns)`` in the input dtype.
    ``block_t`` overrides the chunk length (tests use it to exercise several chunks on tiny T).
    """
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    returns = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    if B == 0 or T == 0:
        return advantages, returns
    compute = tl.float64 if rewards.dtype == torch.float64 else tl.float32
    stats_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32

    block_t = int(block_t) if block_t else min(next_power_of_2(T), _MAX_BLOCK_T)
    rows = max(1, _TILE // block_t)
    while rows > 1 and triton.cdiv(B, rows) < _MIN_PROGRAMS:
        rows //= 2
    rows = min(rows, next_power_of_2(B))
    int64 = max(_max_offset(rewards), _max_offset(values), _max_offset(mask), B * T) > _INT32_MAX

    stats = torch.empty((B, 3) if whiten else (1,), dtype=stats_dtype, device=rewards.device)
    # fp16 / bf16 with whitening: the raw advantages (and their statistics) stay fp32 until the
    # whitened value is rounded, once; otherwise they would be rounded before and after whitening.
    staged = whiten and rewards.dtype in (torch.float16, torch.bfloat16)
    raw_adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device) if staged else advantages
    g_hi, g_lo = _split_hi_lo(gamma)
    gl_hi, gl_lo = _split_hi_lo(gamma * lam)
    _gae_fwd_kernel[(triton.cdiv(B, rows),)](
        rewards, values, mask, raw_adv, returns, stats,
        B, T,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), mask.stride(0), mask.stride(1),
        g_hi, g_lo, gl_hi, gl_lo,
        WITH_STATS=whiten, INT64=int64, COMPUTE=compute, ROWS=rows, BLOCK_T=block_t,
        num_warps=num_warps_for(rows * block_t),
    )
    if whiten:
        block = 1024
        n_elements = B * T
        dev_index = rewards.device.index if rewards.is_cuda else None
        if rewards.is_cuda and dev_index is None:
            dev_index = torch.cuda.current_device()
        programs = max(1, min(_whiten_programs(dev_index), triton.cdiv(n_elements, block)))
        _gae_whiten_kernel[(programs,)](
            raw_adv, advantages, mask, stats,
            B, T, mask.stride(0), mask.stride(1), n_elements,
            SHIFT_MEAN=shift_mean, COMPUTE=compute, BLOCK_B=min(1024, next_power_of_2(B)), BLOCK=block,
            num_warps=4,
        )
    return advantages, returns
