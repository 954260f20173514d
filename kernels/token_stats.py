"""Triton kernels for per-token label log-prob and entropy of softmax(logits / temperature).

One program per row of logits; the row is streamed in ``BLOCK_V`` chunks so any vocabulary size
works with a bounded register footprint.

* Forward reads every logit exactly once and keeps three fp32 running scalars relative to the running
  max ``m``: ``s = sum exp(x - m)`` and ``w = sum exp(x - m) * (x - m)``. Then
  ``lse = m + log s`` and ``H = log s - w / s``; keeping ``w`` relative to ``m`` avoids the
  cancellation of ``lse - E[x]`` when logits are large (|x| ~ 1e4). The label logit is loaded once.
* Backward reads the row once more and writes ``d/dlogits`` once (possibly over the logits):
  ``(g_lp * (onehot - p) - g_H * p * (log p + H)) / temperature``.

Rows are addressed as ``(row // inner) * stride_outer + (row % inner) * stride_inner`` so a
[B, T, V] tensor with arbitrary leading strides (e.g. ``logits[:, :-1]``) needs no copy; the last
dimension must be contiguous. Offsets are int64 (N * V exceeds 2**31 at RL shapes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2, num_warps_for

# Largest block of one row held in registers per loop iteration (elements).
MAX_BLOCK_V = 8192
# exp(-1e3) == 0 in fp32: clamping log-space values to it changes no term whose weight exp() is non-zero.
NEG_CLAMP = tl.constexpr(-1.0e3)


@triton.jit
def _row_offset(row, inner, stride_outer, stride_inner):
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    inner, stride_outer, stride_inner, V, inv_temperature, ignore_index,
    COMPUTE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, inner, stride_outer, stride_inner)
    cols = tl.arange(0, BLOCK_V)

    # Running max starts at the lowest finite fp32 so the first rescale is exp(-huge) = 0, never
    # exp(-inf - -inf) = nan.
    m = tl.full((), -3.4028234663852886e38, tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        delta = m - m_new  # <= 0
        scale = tl.exp(delta)
        d = x - m_new
        e = tl.exp(d)
        if COMPUTE_ENTROPY:
            # Masked tail and -inf logits have d = -inf and e = 0; clamping d (e is already 0 below
            # -104) keeps e * d at 0 instead of 0 * -inf = nan.
            ed = e * tl.maximum(d, NEG_CLAMP)
            # Re-centre w on the new max: (x - m_old) = (x - m_new) - delta.
            w = scale * (w + tl.where(s > 0.0, delta * s, 0.0)) + tl.sum(ed, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # Labels are range-checked before the launch, except inside CUDA-graph capture (no host sync):
    # there an out-of-range label reads nothing and gives a NaN log-prob (its gradient has no one-hot).
    in_vocab = (label >= 0) & (label < V)
    safe_label = tl.where(valid & in_vocab, label, 0).to(tl.int64)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32) * inv_temperature
    # (x_label - m) - log s: exact when the label holds the max, unlike x_label - rounded(lse).
    logprob = tl.where(in_vocab, (x_label - m) - log_s, float("nan"))
    tl.store(logprobs_ptr + row, tl.where(valid, logprob, 0.0))
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - w / s, 0.0))


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_ptr,
    inner, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    V, inv_temperature, ignore_index,
    HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, inner, stride_outer, stride_inner)
    grad_row_ptr = grad_ptr + _row_offset(row, inner, grad_stride_outer, grad_stride_inner)
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    # Ignored tokens have constant (zero) outputs: zero upstream grads give them zero gradient.
    g_lp = tl.zeros((), tl.float32)
    g_h = tl.zeros((), tl.float32)
    h = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.where(valid, tl.load(grad_logprobs_ptr + row), 0.0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0)
        h = tl.load(entropy_ptr + row)
    # d/dx = p * (c_lin * logp + c_const) + g_lp * onehot, all times 1/temperature.
    c_lin = -g_h * inv_temperature
    c_const = -(g_lp + g_h * h) * inv_temperature
    g_label = g_lp * inv_temperature
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        in_row = idx < V
        x = tl.load(row_ptr + idx, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
        logp = x - lse
        p = tl.exp(logp)
        # p == 0 where logits are -inf: clamp logp so the product is 0, not 0 * inf = nan.
        g = p * (c_lin * tl.maximum(logp, NEG_CLAMP) + c_const)
        g = tl.where(idx == label, g + g_label, g)
        tl.store(grad_row_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _pick_block(V: int, block_v) -> int:
    if block_v is None:
        return min(MAX_BLOCK_V, next_power_of_2(V))
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of 2, got {block_v}")
    return int(block_v)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def token_stats_fwd(logits, labels, *, inv_temperature, ignore_index, compute_entropy, block_v=None):
    """Launch the forward kernel.

    ``logits``: [N, V] or [B, T, V] with stride 1 on the last dim (leading strides arbitrary);
    ``labels``: int64 with ``logits``' leading shape (contiguous). Returns fp32 ``(logprobs, entropy
    or None, lse)``, each shaped like ``labels``.
    """
    x = _as_3d(logits)
    B, T, V = x.shape
    n_rows = B * T
    labels = labels.contiguous()
    logprobs = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if compute_entropy else None
    if n_rows == 0:
        return logprobs, entropy, lse
    block = _pick_block(V, block_v)
    _token_stats_fwd_kernel[(n_rows,)](
        x, labels, logprobs, entropy if compute_entropy else logprobs, lse,
        T, x.stride(0), x.stride(1), V, float(inv_temperature), int(ignore_index),
        COMPUTE_ENTROPY=bool(compute_entropy), BLOCK_V=block, num_warps=num_warps_for(block),
    )
    return logprobs, entropy, lse


def token_stats_bwd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, out, *, inv_temperature,
                    ignore_index, block_v=None):
    """Launch the backward kernel, writing ``d/dlogits`` into ``out`` (same shape as ``logits``; may
    be ``logits`` itself). ``grad_logprobs`` / ``grad_entropy`` are fp32 like ``labels`` or None
    (zero); ``entropy`` is needed only with ``grad_entropy``. Returns ``out``."""
    x = _as_3d(logits)
    g = _as_3d(out)
    B, T, V = x.shape
    n_rows = B * T
    if n_rows == 0:
        return out
    labels = labels.contiguous()
    has_glp = grad_logprobs is not None
    has_gh = grad_entropy is not None
    dummy = lse
    block = _pick_block(V, block_v)
    _token_stats_bwd_kernel[(n_rows,)](
        x, labels, lse.contiguous(),
        entropy.contiguous() if has_gh else dummy,
        grad_logprobs.contiguous() if has_glp else dummy,
        grad_entropy.contiguous() if has_gh else dummy,
        g,
        T, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        V, float(inv_temperature), int(ignore_index),
        HAS_GRAD_LOGPROBS=has_glp, HAS_GRAD_ENTROPY=has_gh, BLOCK_V=block, num_warps=num_warps_for(block),
    )
    return out
