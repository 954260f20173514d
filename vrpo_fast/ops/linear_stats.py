"""Token log-probs and entropy straight from hidden states and an lm_head weight.

``linear_logprobs_entropy(hidden, weight, labels)`` returns, per token, ``log softmax(z)[label]`` and
``H = -sum softmax(z) * log softmax(z)`` with ``z = (hidden @ weight.T + bias) / temperature``,
without ever holding the N x V logits. The logits are produced one *tile* (``chunk_tokens`` rows x
``chunk_vocab`` columns) at a time by cuBLAS / MKL (``torch.mm`` / ``addmm`` into a reused buffer);
the per-token statistics come from the token-statistics building blocks of
:mod:`vrpo_fast.ops.token_stats` (Triton on CUDA, chunked torch on CPU).

Forward: every tile is made once (``2*N*H*V`` flops). With full-vocabulary tiles the building
block's forward gives the statistics directly; with vocabulary slices each slice's
``(lse_t, H_t, z_label)`` is kept per token and merged exactly at the end:
``lse = logsumexp_t lse_t`` and ``H = sum_t w_t (H_t + lse - lse_t)`` with ``w_t = exp(lse_t - lse)``
(every term is >= 0, so no cancellation). Only per-token ``lse`` and ``H`` (fp32) are saved.

Backward: every tile is recomputed, turned into d logits IN PLACE by the building block (the
gradient of one logit only needs the token's saved ``lse`` and ``H``), then
``d hidden += dlogits @ W_slice`` and ``d W_slice += dlogits.T @ hidden_chunk``: ``6*N*H*V`` flops,
``8*N*H*V`` for forward + backward. For bf16 / fp16 a gradient that sums several tiles is accumulated
in fp32 and cast once at the end; one that comes from a single tile is written directly (cuBLAS
accumulates in fp32 inside the GEMM). The tile loop order is chosen so that the fp32 staging buffer
is the smaller of ``[N, H]`` (vocabulary slices outer) and ``[V, H]`` (token chunks outer).

Workspace (beyond inputs, outputs and the gradients themselves), independent of ``N * V``:

* one tile buffer of ``chunk_tokens * (chunk_vocab + 16)`` elements in the compute dtype;
* O(N) fp32 vectors (lse, entropy, per-slice statistics ``N x ceil(V / chunk_vocab)``);
* bf16 / fp16 backward only: fp32 staging of ``4 * H * min(N + chunk_vocab, V + chunk_tokens)``
  bytes at most, and none when every gradient comes from a single tile per row block;
* the building blocks' own scratch (none for Triton; 4 MiB chunks on the torch path).

Default tiles (``chunk_tokens = chunk_vocab = None``) fill a budget of 512 MiB on CUDA, 64 MiB on
CPU: the whole problem if it fits; for bf16 / fp16 all tokens x a vocabulary slice (so ``dW`` needs no
fp32 staging); otherwise full-vocabulary rows x a token chunk. Example (H=4096, V=131072, N=8192,
bf16): tiles 8192 x 32768 (512 MiB) + 128 MiB fp32 ``d hidden`` staging.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ._common import FLOAT_DTYPES, check_tensor, resolve_backend
from .token_stats import INT_DTYPES, token_logprobs_entropy_reference, token_stats_backward_2d, token_stats_forward_2d

# Tile-buffer budget when neither chunk size is given.
DEFAULT_WORKSPACE_BYTES_CUDA = 512 << 20
DEFAULT_WORKSPACE_BYTES_CPU = 64 << 20
# Narrowest vocabulary slice used for an all-tokens tile: narrower slices make thin, slow GEMMs.
_MIN_SLICE_COLS = 4096
# Fewest rows in a full-vocabulary tile before the vocabulary is sliced as well.
_MIN_TILE_ROWS = 128
# Row stride of the backward tile buffer is rounded up to this many elements (>= 16-byte aligned rows
# for every dtype, as tensor-core GEMMs want).
_ROW_ALIGN = 16
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def linear_logprobs_entropy_reference(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                                      compute_entropy=True):
    """float64 reference: materialises the full logits and log_softmax. Returns float64 tensors."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return token_logprobs_entropy_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, compute_entropy=compute_entropy
    )


# ----------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------
def _round_down(x: int, multiple: int) -> int:
    return x - x % multiple if x >= multiple else x


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _plan_tiles(n: int, v: int, elem_bytes: int, low_precision: bool, budget_bytes: int,
                chunk_tokens: Optional[int], chunk_vocab: Optional[int]) -> Tuple[int, int]:
    """Tile shape (rows, cols). Explicit chunk sizes win; a missing one is filled from the budget."""
    n = max(n, 1)
    elems = max(1, budget_bytes // elem_bytes)
    if chunk_tokens is not None or chunk_vocab is not None:
        cols = min(v, chunk_vocab) if chunk_vocab is not None else v
        rows = min(n, chunk_tokens) if chunk_tokens is not None else max(1, min(n, elems // cols))
        return rows, cols
    if n * v <= elems:
        return n, v
    if low_precision:
        # All tokens in every tile: each dW slice is then one GEMM, written once, no fp32 [V, H] staging.
        cols = _round_down(elems // n, 128)
        if cols >= min(v, _MIN_SLICE_COLS):
            return n, min(v, cols)
    rows = elems // v
    if rows >= min(n, _MIN_TILE_ROWS):
        return min(n, _round_down(rows, 64)), v
    # Huge vocabulary for the budget: a few rows, and the vocabulary sliced to fit.
    rows = min(n, _MIN_TILE_ROWS)
    return rows, max(1, min(v, _round_down(elems // rows, 128)))


def _spans(total: int, step: int):
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def _tile_logits(hidden_rows, weight_rows, bias_rows, out):
    """out = hidden_rows @ weight_rows.T (+ bias_rows), written into the tile buffer by the GEMM."""
    if bias_rows is None:
        return torch.mm(hidden_rows, weight_rows.t(), out=out)
    return torch.addmm(bias_rows, hidden_rows, weight_rows.t(), out=out)


@functools.lru_cache(maxsize=None)
def _fp32_out_gemm(device: str) -> bool:
    """True where ``addmm(fp32, bf16, bf16, out_dtype=fp32)`` runs in one GEMM (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm_accumulate(target, stage, a, b, first: bool, last: bool) -> None:
    """``target (+)= a @ b`` over a sequence of calls (``first`` overwrites).

    ``stage`` is None (accumulate in ``target``'s own dtype) or an fp32 buffer shaped like
    ``target`` that holds the running sum until ``last`` casts it into ``target``.
    """
    if stage is None:
        if first:
            torch.mm(a, b, out=target)
        else:
            target.addmm_(a, b)
        return
    if _fp32_out_gemm(str(a.device)):
        # beta=0 ignores the (uninitialised) stage on the first call.
        torch.addmm(stage, a, b, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=stage)
    elif first:
        stage.copy_(torch.mm(a, b))
    else:
        stage.add_(torch.mm(a, b))
    if last:
        target.copy_(stage)


def _staging_plan(n: int, v: int, rows: int, cols: int, low_precision: bool, need_hidden: bool,
                  need_weight: bool) -> Tuple[bool, int, int]:
    """Backward loop order and fp32 staging: (vocab_outer, staged rows of d hidden, of d W).

    For bf16 / fp16 a gradient summed over several tiles is staged in fp32: d hidden sums over the
    vocabulary slices, d W over the token chunks. Vocabulary slices outer stages [N, H] + [cols, H];
    token chunks outer stages [rows, H] + [V, H]; the smaller wins.
    """
    stage_h = need_hidden and low_precision and v > cols
    stage_w = need_weight and low_precision and n > rows
    vocab_outer = stage_h * n + stage_w * cols < stage_h * rows + stage_w * v
    h_rows = (n if vocab_outer else rows) if stage_h else 0
    w_rows = (cols if vocab_outer else v) if stage_w else 0
    return vocab_outer, h_rows, w_rows


# ----------------------------------------------------------------------------------------------
# Forward / backward over tiles (inputs validated; hidden [N, H], labels [N] int64)
# ----------------------------------------------------------------------------------------------
def _linear_stats_forward(hidden, weight, bias, labels, *, temperature, ignore_index, compute_entropy, rows, cols,
                          backend):
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logprobs = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if compute_entropy else None
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    vocab_spans = _spans(v, cols)
    buf = torch.empty(rows * cols, dtype=hidden.dtype, device=dev)
    stats = dict(temperature=temperature, compute_entropy=compute_entropy, backend=backend)

    for i0, i1 in _spans(n, rows):
        h_rows, lab = hidden[i0:i1], labels[i0:i1]
        r = i1 - i0
        if len(vocab_spans) == 1:
            logits = _tile_logits(h_rows, weight, bias, buf[: r * v].view(r, v))
            lp_i, ent_i, lse_i = token_stats_forward_2d(logits, lab, ignore_index=ignore_index, **stats)
        else:
            valid = lab != ignore_index
            lse_parts = torch.empty(r, len(vocab_spans), dtype=torch.float32, device=dev)
            ent_parts = torch.empty_like(lse_parts) if compute_entropy else None
            label_logit = torch.zeros(r, dtype=torch.float32, device=dev)
            for t, (j0, j1) in enumerate(vocab_spans):
                c = j1 - j0
                logits = _tile_logits(h_rows, weight[j0:j1], None if bias is None else bias[j0:j1],
                                      buf[: r * c].view(r, c))
                # Tokens whose label lies in another slice read column 0; their log-prob is discarded.
                in_slice = valid & (lab >= j0) & (lab < j1)
                slice_labels = torch.where(in_slice, lab - j0, 0)
                lp_t, ent_t, lse_t = token_stats_forward_2d(logits, slice_labels, ignore_index=-1, **stats)
                lse_parts[:, t] = lse_t
                if compute_entropy:
                    ent_parts[:, t] = ent_t
                label_logit = torch.where(in_slice, lp_t + lse_t, label_logit)
            lse_i = torch.logsumexp(lse_parts, dim=1)
            lp_i = torch.where(valid, label_logit - lse_i, 0.0)
            ent_i = None
            if compute_entropy:
                # H = sum_t w_t (H_t - log w_t), w_t = exp(lse_t - lse): the mixture's entropy.
                log_w = lse_parts - lse_i.unsqueeze(1)
                ent_i = torch.where(valid, (log_w.exp() * (ent_parts - log_w)).sum(1), 0.0)
        logprobs[i0:i1] = lp_i
        lse[i0:i1] = lse_i
        if compute_entropy:
            entropy[i0:i1] = ent_i
    return logprobs, entropy, lse


def _linear_stats_backward(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, *, temperature,
                           ignore_index, rows, cols, backend, need_hidden, need_weight, need_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    grad_hidden = torch.empty(n, h, dtype=dtype, device=dev) if need_hidden else None
    grad_weight = torch.empty(v, h, dtype=weight.dtype, device=dev) if need_weight else None
    grad_bias32 = torch.zeros(v, dtype=torch.float32, device=dev) if need_bias else None
    if n == 0:
        return grad_hidden, (grad_weight.zero_() if need_weight else None), grad_bias32

    token_spans, vocab_spans = _spans(n, rows), _spans(v, cols)
    sliced = len(vocab_spans) > 1
    vocab_outer, stage_h_rows, stage_w_rows = _staging_plan(
        n, v, rows, cols, dtype in _LOW_PRECISION, need_hidden, need_weight
    )
    stage_hidden = torch.empty(stage_h_rows, h, dtype=torch.float32, device=dev) if stage_h_rows else None
    stage_weight = torch.empty(stage_w_rows, h, dtype=torch.float32, device=dev) if stage_w_rows else None

    # With vocabulary slices, a token whose label is in another slice must get no one-hot term: its
    # label points at one extra "dummy" column after the slice, whose gradient is thrown away.
    row_stride = _round_up(cols + 1, _ROW_ALIGN) if sliced else v
    buf = torch.empty(rows * row_stride, dtype=dtype, device=dev)
    if vocab_outer:
        tiles = [(ti, vi) for vi in vocab_spans for ti in token_spans]
    else:
        tiles = [(ti, vi) for ti in token_spans for vi in vocab_spans]

    def part(t, i0, i1):
        return None if t is None else t[i0:i1]

    for (i0, i1), (j0, j1) in tiles:
        r, c = i1 - i0, j1 - j0
        h_rows, w_rows = hidden[i0:i1], weight[j0:j1]
        tile = buf[: r * row_stride].view(r, row_stride)
        _tile_logits(h_rows, w_rows, part(bias, j0, j1), tile[:, :c])
        lab = labels[i0:i1]
        if sliced:
            valid = lab != ignore_index
            in_slice = valid & (lab >= j0) & (lab < j1)
            tile_labels = torch.where(in_slice, lab - j0, torch.where(valid, c, -1))
            # Dummy logit = lse * T, i.e. p = 1 there: finite whatever the buffer held before.
            tile[:, c].copy_(lse[i0:i1] * temperature)
            tile, tile_ignore = tile[:, : c + 1], -1
        else:
            tile, tile_ignore = tile[:, :c], ignore_index
        dtile = token_stats_backward_2d(
            tile, tile_labels if sliced else lab, lse[i0:i1], part(entropy, i0, i1),
            part(grad_logprobs, i0, i1), part(grad_entropy, i0, i1),
            temperature=temperature, ignore_index=tile_ignore, out=tile, backend=backend,
        )
        dlogits = dtile[:, :c]
        if need_hidden:
            stage = None
            if stage_hidden is not None:
                stage = stage_hidden[i0:i1] if vocab_outer else stage_hidden[:r]
            _mm_accumulate(grad_hidden[i0:i1], stage, dlogits, w_rows, first=j0 == 0, last=j1 == v)
        if need_weight:
            stage = None
            if stage_weight is not None:
                stage = stage_weight[:c] if vocab_outer else stage_weight[j0:j1]
            _mm_accumulate(grad_weight[j0:j1], stage, dlogits.t(), h_rows, first=i0 == 0, last=i1 == n)
        if need_bias:
            grad_bias32[j0:j1] += dlogits.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias32


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, rows, cols, backend):
        logprobs, entropy, lse = _linear_stats_forward(
            hidden, weight, bias, labels, temperature=temperature, ignore_index=ignore_index,
            compute_entropy=compute_entropy, rows=rows, cols=cols, backend=backend,
        )
        # References to the inputs plus per-token fp32 lse / entropy: nothing of size N x V.
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.config = dict(temperature=temperature, ignore_index=ignore_index, rows=rows, cols=cols, backend=backend)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        nones = (None,) * 7
        if grad_logprobs is None and grad_entropy is None:
            return (None, None, None) + nones
        grad_hidden, grad_weight, grad_bias32 = _linear_stats_backward(
            hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, **ctx.config,
        )
        grad_bias = grad_bias32.to(bias.dtype) if need_bias else None
        return (grad_hidden, grad_weight, grad_bias) + nones


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def _check_chunk(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return value


def _validate(hidden, weight, labels, bias, temperature, ignore_index):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=(2,), device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {H} (an nn.Linear / lm_head weight), "
            f"got shape {tuple(weight.shape)}"
        )
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocabulary size V > 0)")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=(1,), device=hidden.device)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape [V] = [{V}] (weight.shape[0]), got {tuple(bias.shape)}")
    check_tensor("labels", labels, dtypes=INT_DTYPES, device=hidden.device)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels.numel() > 0:
        # One reduction (a device sync on CUDA): an out-of-range label would index outside a tile.
        bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, got {labels[bad][0].item()}"
            )


def linear_logprobs_entropy(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                            compute_entropy=True, chunk_tokens=None, chunk_vocab=None, backend="auto"):
    """Per-token log-prob of ``labels`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``.

    The N x V logits are never materialised: they are made and consumed one tile at a time (see the
    module docstring for the algorithm and the workspace bound).

    Args:
        hidden: [N, H] or [B, T, H] final hidden states, fp16 / bf16 / fp32 (fp64 on the torch path).
        weight: [V, H] lm_head / ``nn.Linear`` weight, same dtype and device as ``hidden``.
        labels: integer tensor with the leading shape of ``hidden``; entries equal to
            ``ignore_index`` give 0 in both outputs and no gradient, the others must lie in [0, V).
        bias: optional [V] bias, same dtype as ``weight``.
        temperature: divides the logits before the softmax (> 0).
        compute_entropy: if False, ``entropy`` is None and its work is skipped.
        chunk_tokens, chunk_vocab: tile shape. None picks it from a workspace budget (512 MiB on CUDA,
            64 MiB on CPU). Giving only ``chunk_tokens`` means full-vocabulary tiles.
        backend: "auto" (CUDA -> Triton statistics kernels, CPU -> chunked torch), "triton" or
            "torch". The matmuls always run through torch (cuBLAS / CPU BLAS).

    Returns:
        ``(logprobs, entropy)``, fp32 and shaped like ``labels`` (``entropy`` None when
        ``compute_entropy=False``), differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _validate(hidden, weight, labels, bias, temperature, ignore_index)
    chunk_tokens = _check_chunk("chunk_tokens", chunk_tokens)
    chunk_vocab = _check_chunk("chunk_vocab", chunk_vocab)
    backend = resolve_backend(backend, hidden, weight)
    temperature = float(temperature)
    compute_entropy = bool(compute_entropy)

    lead_shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    labels1d = labels.reshape(-1).long()
    n, v = hidden2d.shape[0], weight.shape[0]
    budget = DEFAULT_WORKSPACE_BYTES_CUDA if hidden.is_cuda else DEFAULT_WORKSPACE_BYTES_CPU
    rows, cols = _plan_tiles(n, v, hidden.element_size(), hidden.dtype in _LOW_PRECISION, budget,
                             chunk_tokens, chunk_vocab)

    args = (temperature, ignore_index, compute_entropy, rows, cols, backend)
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if torch.is_grad_enabled() and needs_grad:
        logprobs, entropy = _LinearLogprobsEntropy.apply(hidden2d, weight, bias, labels1d, *args)
    else:
        logprobs, entropy, _ = _linear_stats_forward(
            hidden2d, weight, bias, labels1d, temperature=temperature, ignore_index=ignore_index,
            compute_entropy=compute_entropy, rows=rows, cols=cols, backend=backend,
        )
    logprobs = logprobs.view(lead_shape)
    return logprobs, (entropy.view(lead_shape) if entropy is not None else None)
