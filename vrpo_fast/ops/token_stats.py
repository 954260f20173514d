"""Per-token log-prob of the label and entropy of the next-token distribution, from logits.

``token_logprobs_entropy(logits, labels)`` returns, for every token, ``log softmax(x)[label]`` and
``H = -sum softmax(x) * log softmax(x)`` with ``x = logits / temperature``, accumulated in fp32 (fp64
for fp64 logits) and returned in ``out_dtype``, without ever materialising an N x V log-softmax. The
public function is a PyTorch custom op (``torch.ops.vrpo_fast.token_stats_fwd`` / ``_bwd``, fake kernels
and an autograd formula below), so ``torch.compile(fullgraph=True)`` traces it:

* CUDA: Triton kernels (:mod:`vrpo_fast.kernels.token_stats`) read the logits once in the forward and
  once more in the backward, which writes the gradient once (optionally over the logits buffer).
* CPU: the C++ extension (``csrc/token_stats.cpp``) for fp32 / bf16 / fp16 logits: one read of the
  logits forward (blockwise online max / sum-exp / sum p*x), one read and one gradient write backward,
  vectorised, threads over rows. fp64 logits (or no extension): chunked PyTorch, rows in chunks small
  enough to stay in cache, so peak extra memory is O(chunk) (plus the gradient itself).

The forward saves only the per-row log-sum-exp (and entropy) for backward. Gradients, with
``p = softmax(x)``: ``d logp/dx = onehot - p``, ``dH/dx = -p (log p + H)``, chained with
``1 / temperature``.

``token_stats_forward_2d`` / ``token_stats_backward_2d`` are the un-validated building blocks (also
used by :mod:`vrpo_fast.ops.linear_stats`); keep their signatures stable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _cpu_ext
from ._common import (FLOAT_DTYPES, accumulation_dtype, check_backend, check_leading_shape, check_tensor,
                      data_checks_possible, is_compiling, resolve_backend, resolve_out_dtype)

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Target size of one fp32 chunk of rows on the torch path (the workspaces are this big). Smaller
# chunks stay in cache, but each chunk costs ~7 intra-op parallel regions, and on a busy machine every
# region waits for all OpenMP threads to be scheduled: on the shared 2-core dev box, 32 MiB chunks
# were ~2x faster than 4 MiB ones with 2 threads, and within 1.5x of the best chunk with 1 thread.
_CHUNK_BYTES = 32 << 20
# After exp(), entries with exp == 0 (incl. -inf logits) are clamped to this before multiplying by
# exp, so 0 * (-inf) never produces nan. exp(-1e3) == 0 in every float dtype, so nothing else moves.
_NEG_CLAMP = -1.0e3


def token_logprobs_entropy_reference(logits, labels, *, temperature=1.0, ignore_index=-100, compute_entropy=True):
    """Plain-PyTorch reference: materialises the full log_softmax (float32 or float64)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    ent = None
    if compute_entropy:
        # xlogy: p * log p with 0 * log 0 = 0 (exact zeros from -inf logits).
        ent = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return lp, ent


# ----------------------------------------------------------------------------------------------
# Torch (CPU) building blocks
# ----------------------------------------------------------------------------------------------
def _rows_per_chunk(V: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(V, 1)))


def _load_scaled(x: torch.Tensor, inv_temperature: float, ws: torch.Tensor) -> torch.Tensor:
    """``ws <- x * inv_temperature`` in the accumulation dtype (upcast first for fp16/bf16)."""
    if inv_temperature == 1.0:
        return ws.copy_(x)
    if x.dtype == ws.dtype:
        return torch.mul(x, inv_temperature, out=ws)
    return ws.copy_(x).mul_(inv_temperature)


# The torch path works on chunks of rows in two reusable workspaces: fresh buffers per chunk would
# page-fault on every chunk, and in-place passes over a cache-sized chunk are cheap, so the math is
# written as a few out= / in-place passes rather than expressions that allocate N x V temporaries.
def _forward_torch_2d(logits, labels, inv_temperature, ignore_index, compute_entropy):
    if logits.device.type == "cpu" and logits.dtype in _CPP_DTYPES:
        ext = _cpu_ext.extension("token_stats_forward", "token_logprobs_entropy")
        if ext is not None:
            return _forward_cpp(ext, logits, labels, inv_temperature, ignore_index, compute_entropy)
    N, V = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # Outputs in the accumulation dtype: fp32, or fp64 for fp64 logits.
    logprobs = torch.empty(N, dtype=acc_dtype, device=logits.device)
    entropy = torch.empty(N, dtype=acc_dtype, device=logits.device) if compute_entropy else None
    lse = torch.empty(N, dtype=acc_dtype, device=logits.device)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    step = max(1, min(N, _rows_per_chunk(V)))
    ws_t = torch.empty(step, V, dtype=acc_dtype, device=logits.device)
    ws_e = torch.empty(step, V, dtype=acc_dtype, device=logits.device)
    plain = logits.dtype == acc_dtype and inv_temperature == 1.0
    for i in range(0, N, step):
        j = min(N, i + step)
        t, e = ws_t[: j - i], ws_e[: j - i]
        x = logits[i:j] if plain else _load_scaled(logits[i:j], inv_temperature, t)
        # A row of -inf (e.g. a vocabulary slice under a masking bias) keeps a finite max, so that
        # s = 0 and lse = -inf, not -inf - -inf = NaN; NaN still propagates through clamp.
        m = x.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(acc_dtype).min)
        x_label = x.gather(1, safe_labels[i:j]).squeeze(1)
        torch.sub(x, m, out=t)  # shifted logits, <= 0 (in place when x is t)
        torch.exp(t, out=e)
        s = e.sum(dim=1)
        log_s = torch.log(s)
        m = m.squeeze(1)
        lse[i:j] = m + log_s
        # (x_label - m) - log s, not x_label - lse: lse ~ |logits| loses low bits when rounded.
        logprobs[i:j] = torch.where(valid[i:j], (x_label - m) - log_s, 0.0)
        if compute_entropy:
            # H = log s - sum(e * t) / s. Clamping t where e == 0 (incl. -inf logits) keeps the
            # product at 0 instead of 0 * -inf = nan.
            w = e.mul_(t.clamp_min_(_NEG_CLAMP)).sum(dim=1)
            entropy[i:j] = torch.where(valid[i:j], log_s - w / s, 0.0)
    return logprobs, entropy, lse


def _backward_torch_2d(logits, labels, lse, entropy, grad_logprobs, grad_entropy, inv_temperature,
                       ignore_index, out):
    if logits.device.type == "cpu" and logits.dtype in _CPP_DTYPES and out.dtype == logits.dtype:
        ext = _cpu_ext.extension("token_stats_backward", "token_logprobs_entropy")
        if ext is not None:
            return _backward_cpp(ext, logits, labels, lse, entropy, grad_logprobs, grad_entropy, inv_temperature,
                                 ignore_index, out)
    N, V = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    zeros = torch.zeros(N, dtype=acc_dtype, device=logits.device)
    g_lp = torch.where(valid, grad_logprobs.to(acc_dtype), zeros) if grad_logprobs is not None else zeros
    g_h = torch.where(valid, grad_entropy.to(acc_dtype), zeros) if grad_entropy is not None else None
    # d/dx = p * (c_lin * logp + c_const) + g_lp * onehot, all / temperature.
    c_const = (-g_lp * inv_temperature).unsqueeze(1)
    if g_h is not None:
        c_const = c_const - (g_h * entropy.to(acc_dtype) * inv_temperature).unsqueeze(1)
        c_lin = (-g_h * inv_temperature).unsqueeze(1)
    g_label = (g_lp * inv_temperature).unsqueeze(1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    lse = lse.to(acc_dtype).unsqueeze(1)
    step = max(1, min(N, _rows_per_chunk(V)))
    ws_logp = torch.empty(step, V, dtype=acc_dtype, device=logits.device)
    # fp32 output (fp64 for fp64): p is computed straight into the output rows, so the backward needs
    # a single workspace; fp16/bf16 outputs get p in fp32 and one rounding copy at the end.
    direct = out.dtype == acc_dtype
    ws_p = None if direct else torch.empty(step, V, dtype=acc_dtype, device=logits.device)
    plain = logits.dtype == acc_dtype and inv_temperature == 1.0
    for i in range(0, N, step):
        j = min(N, i + step)
        logp = ws_logp[: j - i]
        x = logits[i:j] if plain else _load_scaled(logits[i:j], inv_temperature, logp)
        torch.sub(x, lse[i:j], out=logp)
        # Every read of this chunk of logits is done: writing `out` (possibly the logits) is safe.
        p = out[i:j] if direct else ws_p[: j - i]
        torch.exp(logp, out=p)
        if g_h is None:
            p.mul_(c_const[i:j])
        else:
            # Clamp where p == 0 (incl. -inf logits) so the product is 0, not 0 * inf = nan.
            logp.clamp_min_(_NEG_CLAMP).mul_(c_lin[i:j]).add_(c_const[i:j])
            p.mul_(logp)
        p.scatter_add_(1, safe_labels[i:j], g_label[i:j])
        if not direct:
            out[i:j].copy_(p)
    return out


# ----------------------------------------------------------------------------------------------
# CPU: the C++ extension (csrc/token_stats.cpp) for fp32 / bf16 / fp16 logits, read in place (row
# stride free): one read of the logits forward (blockwise online max / sum-exp / sum p*x), one read
# and one write backward (possibly over the logits), vectorised, threads over rows, GIL released.
# fp64 logits stay on the chunked torch path above.
# ----------------------------------------------------------------------------------------------
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32_rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _forward_cpp(ext, logits, labels, inv_temperature, ignore_index, compute_entropy):
    N, V = logits.shape
    labels = labels.to(torch.int64).contiguous()
    logprobs = torch.empty(N, dtype=torch.float32)
    entropy = torch.empty(N, dtype=torch.float32) if compute_entropy else None
    lse = torch.empty(N, dtype=torch.float32)
    ext.token_stats_forward(logits.data_ptr(), labels.data_ptr(), logprobs.data_ptr(),
                            entropy.data_ptr() if compute_entropy else 0, lse.data_ptr(), N, V,
                            _cpu_ext.row_stride(logits), _cpu_ext.DTYPE_CODES[logits.dtype], float(inv_temperature),
                            int(ignore_index), torch.get_num_threads())
    return logprobs, entropy, lse


def _backward_cpp(ext, logits, labels, lse, entropy, grad_logprobs, grad_entropy, inv_temperature, ignore_index,
                  out):
    N, V = logits.shape
    labels = labels.to(torch.int64).contiguous()
    grad_lp, grad_h = _f32_rows(grad_logprobs), _f32_rows(grad_entropy)
    ent = _f32_rows(entropy) if grad_h is not None else None
    lse = _f32_rows(lse)
    ext.token_stats_backward(logits.data_ptr(), labels.data_ptr(), lse.data_ptr(),
                             ent.data_ptr() if ent is not None else 0,
                             grad_lp.data_ptr() if grad_lp is not None else 0,
                             grad_h.data_ptr() if grad_h is not None else 0, out.data_ptr(), N, V,
                             _cpu_ext.row_stride(logits), _cpu_ext.row_stride(out),
                             _cpu_ext.DTYPE_CODES[logits.dtype], float(inv_temperature), int(ignore_index),
                             torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------------------------
# Building blocks (validated inputs; shared with linear_stats)
# ----------------------------------------------------------------------------------------------
def token_stats_forward_2d(logits, labels, *, temperature, ignore_index, compute_entropy, backend):
    """logits [N, V] (last dim contiguous), labels [N] int64; validated already. backend in {"triton","torch"}.

    Returns (logprobs [N], entropy [N] or None, lse [N]) in the accumulation dtype (fp32; fp64 for
    fp64 logits) where lse = logsumexp(logits/temperature). Ignored labels give logprob 0 and entropy
    0 (lse is still computed).
    """
    inv_t = 1.0 / float(temperature)
    if backend == "triton":
        return _triton_forward(logits, labels, inv_t, ignore_index, compute_entropy)
    return _forward_torch_2d(logits, labels, inv_t, ignore_index, compute_entropy)


def _triton_forward(logits, labels, inv_t, ignore_index, compute_entropy):
    """The Triton kernel (fp32 arithmetic); fp64 logits get their outputs widened to fp64."""
    from vrpo_fast.kernels.token_stats import token_stats_fwd

    out = token_stats_fwd(logits, labels, inv_temperature=inv_t, ignore_index=ignore_index,
                          compute_entropy=compute_entropy)
    if logits.dtype == torch.float64:
        out = tuple(t.double() if t is not None else None for t in out)
    return out


def token_stats_backward_2d(logits, labels, lse, entropy, grad_logprobs, grad_entropy, *, temperature, ignore_index,
                            out, backend):
    """grad_logprobs / grad_entropy: fp32 [N] or None (= zeros). out: None (allocate, dtype of logits) or a
    [N, V] tensor to write into, which may be `logits` itself (in-place). Returns the grad w.r.t. logits."""
    inv_t = 1.0 / float(temperature)
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if backend == "triton":
        from vrpo_fast.kernels.token_stats import token_stats_bwd

        return token_stats_bwd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, out,
                               inv_temperature=inv_t, ignore_index=ignore_index)
    return _backward_torch_2d(logits, labels, lse, entropy, grad_logprobs, grad_entropy, inv_t, ignore_index, out)


# ----------------------------------------------------------------------------------------------
# [N, V] or [B, T, V] dispatch (leading strides kept, no copy)
# ----------------------------------------------------------------------------------------------
def _rows_2d(logits: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, T, V] -> [B*T, V] view when the leading strides allow it, else None."""
    if logits.dim() == 2:
        return logits
    B, T, V = logits.shape
    if B == 1 or T == 1 or logits.stride(0) == T * logits.stride(1):
        return logits.as_strided((B * T, V), (logits.stride(1) if T > 1 else logits.stride(0), 1))
    return None


def _forward_nd(logits, labels, temperature, ignore_index, compute_entropy, backend):
    if backend == "triton":
        return _triton_forward(logits, labels, 1.0 / float(temperature), ignore_index, compute_entropy)
    kw = dict(temperature=temperature, ignore_index=ignore_index, compute_entropy=compute_entropy, backend=backend)
    flat = _rows_2d(logits)
    if flat is not None:
        lp, ent, lse = token_stats_forward_2d(flat, labels.reshape(-1), **kw)
        shape = labels.shape
        return lp.view(shape), (ent.view(shape) if ent is not None else None), lse.view(shape)
    # Leading strides that cannot be flattened (e.g. logits[:, :-1]): one 2-D view per sequence.
    parts = [token_stats_forward_2d(logits[b], labels[b], **kw) for b in range(logits.shape[0])]
    lp = torch.stack([p[0] for p in parts])
    ent = torch.stack([p[1] for p in parts]) if compute_entropy else None
    lse = torch.stack([p[2] for p in parts])
    return lp, ent, lse


def _backward_nd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, out, backend):
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if backend == "triton":
        from vrpo_fast.kernels.token_stats import token_stats_bwd

        return token_stats_bwd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, out,
                               inv_temperature=1.0 / float(temperature), ignore_index=ignore_index)
    kw = dict(temperature=temperature, ignore_index=ignore_index, backend=backend)
    flat, flat_out = _rows_2d(logits), _rows_2d(out)
    if flat is not None and flat_out is not None:
        def rows(t):
            return t.reshape(-1) if t is not None else None

        token_stats_backward_2d(flat, rows(labels), rows(lse), rows(entropy), rows(grad_logprobs),
                                rows(grad_entropy), out=flat_out, **kw)
        return out
    for b in range(logits.shape[0]):
        def seq(t):
            return t[b] if t is not None else None

        token_stats_backward_2d(logits[b], labels[b], lse[b], seq(entropy), seq(grad_logprobs), seq(grad_entropy),
                                out=out[b], **kw)
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops: the implementation under the public function. torch.compile sees the fake kernels
# (shapes and dtypes only) and calls the real ones at run time, so the data-dependent label check
# below runs inside the op, never as a Python branch in a traced graph.
# ----------------------------------------------------------------------------------------------
def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """``labels`` (int64) in [0, V) or ``ignore_index``: one reduction (a device sync on CUDA). Skipped
    inside CUDA-graph capture, where the kernels give NaN for an out-of-range label instead."""
    if labels.numel() == 0 or not data_checks_possible(labels):
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, "
                         f"got {labels[bad][0].item()}")


@torch.library.custom_op("vrpo_fast::token_stats_fwd", mutates_args=())
def _token_stats_fwd_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                        compute_entropy: bool, inplace_backward: bool, backend: str,
                        check_labels: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy, lse) like ``labels``, in the accumulation dtype; entropy is empty [0]
    when not computed (custom ops cannot return None). ``inplace_backward`` is used by the backward."""
    if check_labels:
        _check_label_range(labels, logits.shape[-1], ignore_index)
    path = resolve_backend(backend, logits)
    logprobs, entropy, lse = _forward_nd(logits, labels, temperature, ignore_index, compute_entropy, path)
    return logprobs, (entropy if entropy is not None else logprobs.new_empty(0)), lse


@_token_stats_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend, check_labels):
    out = labels.new_empty(labels.shape, dtype=accumulation_dtype(logits.dtype))
    return out, (torch.empty_like(out) if compute_entropy else out.new_empty(0)), torch.empty_like(out)


@torch.library.custom_op("vrpo_fast::token_stats_bwd", mutates_args=())
def _token_stats_bwd_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                        grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                        temperature: float, ignore_index: int, backend: str) -> torch.Tensor:
    """d/dlogits in a new tensor (logits' dtype and shape, contiguous)."""
    path = resolve_backend(backend, logits)
    return _backward_nd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                        None, path)


@_token_stats_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("vrpo_fast::token_stats_bwd_inplace", mutates_args=("logits",))
def _token_stats_bwd_inplace_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                entropy: torch.Tensor, grad_logprobs: Optional[torch.Tensor],
                                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                                backend: str) -> None:
    """d/dlogits written over ``logits`` (``inplace_backward=True``, eager only)."""
    path = resolve_backend(backend, logits)
    _backward_nd(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, logits, path)


def _token_stats_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend, _ = inputs
    _, entropy, lse = output
    # Only the logits (already alive) and per-row lse / entropy are kept: no N x V temporaries.
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.config = (temperature, ignore_index, compute_entropy, inplace_backward, backend)


def _token_stats_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, inplace_backward, backend = ctx.config
    if not compute_entropy:
        grad_entropy = None
    if grad_logprobs is None and grad_entropy is None:
        return (None,) * 8
    args = (logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, backend)
    if inplace_backward:
        _token_stats_bwd_inplace_op(*args)
        grad = logits
    else:
        grad = _token_stats_bwd_op(*args)
    return (grad,) + (None,) * 7


torch.library.register_autograd("vrpo_fast::token_stats_fwd", _token_stats_backward,
                                setup_context=_token_stats_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def _validate(logits, labels, temperature, ignore_index):
    """Shape / dtype / argument checks (no data is read: safe under torch.compile and on meta)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    check_leading_shape("labels", labels, "logits", logits)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    if logits.stride(-1) != 1 and V > 1:
        raise ValueError(
            f"logits must be contiguous in the last (vocabulary) dimension, got stride {logits.stride(-1)}; "
            "call logits.contiguous() first (leading strides may be arbitrary)"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def token_logprobs_entropy(logits, labels, *, temperature=1.0, ignore_index=-100, compute_entropy=True,
                           inplace_backward=False, backend="auto", out_dtype="auto", _check_label_range=True):
    """Per-token log-prob of ``labels`` and entropy under ``softmax(logits / temperature)``.

    A PyTorch custom op (``torch.ops.vrpo_fast.token_stats_fwd`` underneath, with a fake kernel and an
    autograd formula), so ``torch.compile(fullgraph=True)`` traces it without a graph break.

    Args:
        logits: [B, T, V] or [N, V], fp16 / bf16 / fp32 / fp64. The vocabulary dim must be contiguous;
            leading strides are free (``logits[:, :-1]`` is used without a copy).
        labels: integer tensor (int64 / int32 / int16 / int8 / uint8) with the leading shape of
            ``logits``. Entries equal to ``ignore_index`` give 0 in both outputs and zero gradient;
            others must lie in ``[0, V)`` (checked inside the op: ``ValueError``, also when compiled).
        temperature: divides the logits before the softmax (> 0).
        compute_entropy: if False, ``entropy`` is None and its work is skipped.
        inplace_backward: the backward writes d/dlogits over the logits buffer and returns it as the
            gradient, saving one N x V allocation. The logits are DESTROYED by the backward; use it only
            when nothing else reads them afterwards (typical: lm_head output feeding only this op).
            Refused (ValueError) for a leaf tensor or a view of one. Ignored under ``torch.compile``
            (a compiled graph may not mutate a saved input in its backward).
        backend: "auto" (CUDA -> Triton, CPU -> chunked torch), "triton" or "torch".
        out_dtype: dtype of both outputs. "auto": fp32 (fp64 for fp64 logits); None: the logits'
            dtype (TRL's convention); or any floating dtype. Statistics are always accumulated in
            fp32 (fp64 for fp64 logits) and rounded once.

    Returns:
        ``(logprobs, entropy)`` shaped like ``labels``; ``entropy`` is None when
        ``compute_entropy=False``. Both are differentiable w.r.t. ``logits``.
    """
    _validate(logits, labels, temperature, ignore_index)
    check_backend(backend)
    dtype = resolve_out_dtype(out_dtype, logits.dtype)
    compiling = is_compiling()
    inplace_backward = bool(inplace_backward) and not compiling
    if inplace_backward and logits.requires_grad:
        root = logits._base if logits._base is not None else logits
        if root.is_leaf:
            # The gradient would be the leaf's own storage (p.grad aliasing p): an optimizer step
            # would then corrupt the parameter.
            raise ValueError(
                "inplace_backward=True needs logits produced by an op (e.g. the lm_head matmul), not a leaf "
                "tensor or a view of one: its buffer is overwritten by the gradient"
            )
    # int64 before any comparison: a narrow label dtype cannot hold V (or ignore_index).
    logprobs, entropy, _ = _token_stats_fwd_op(
        logits, labels.long(), float(temperature), ignore_index, bool(compute_entropy), inplace_backward, backend,
        bool(_check_label_range),
    )
    logprobs = logprobs.to(dtype)
    return logprobs, (entropy.to(dtype) if compute_entropy else None)
