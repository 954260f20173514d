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

Dtypes: the GEMMs run in one compute dtype, the autocast dtype inside ``torch.autocast`` (as
``nn.Linear``) or else the promotion of the hidden / weight / bias dtypes; the statistics accumulate
in fp32 (fp64 for fp64) and are returned in ``out_dtype``. A vocabulary slice whose logits are all
-inf (a masking bias) has ``lse_t = -inf`` and adds nothing to the merge. The public function is a
PyTorch custom op (``torch.ops.vrpo_fast.linear_stats_fwd`` / ``_bwd``), so ``torch.compile`` traces it.

Default tiles (``chunk_tokens = chunk_vocab = None``) fill a budget of 512 MiB on CUDA, 64 MiB on
CPU: the whole problem if it fits; for bf16 / fp16 all tokens x a vocabulary slice (so ``dW`` needs no
fp32 staging); otherwise full-vocabulary rows x a token chunk. Example (H=4096, V=131072, N=8192,
bf16): tiles 8192 x 32768 (512 MiB) + 128 MiB fp32 ``d hidden`` staging.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from ._common import (FLOAT_DTYPES, accumulation_dtype, check_backend, check_tensor, resolve_backend,
                      resolve_out_dtype)
from .token_stats import (INT_DTYPES, _check_label_range, token_logprobs_entropy_reference, token_stats_backward_2d,
                          token_stats_forward_2d)

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
    acc = accumulation_dtype(hidden.dtype)
    logprobs = torch.empty(n, dtype=acc, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev) if compute_entropy else None
    lse = torch.empty(n, dtype=acc, device=dev)
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
            lse_parts = torch.empty(r, len(vocab_spans), dtype=acc, device=dev)
            ent_parts = torch.empty_like(lse_parts) if compute_entropy else None
            label_logit = torch.zeros(r, dtype=acc, device=dev)
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
                # A slice whose logits are all -inf (a masking bias) has lse_t = -inf and a NaN
                # log-prob (-inf - -inf); its label logit is -inf.
                label_logit = torch.where(in_slice, torch.where(lse_t > -math.inf, lp_t + lse_t, -math.inf),
                                          label_logit)
            lse_i = torch.logsumexp(lse_parts, dim=1)
            lp_i = torch.where(valid, label_logit - lse_i, 0.0)
            ent_i = None
            if compute_entropy:
                # H = sum_t w_t (H_t - log w_t), w_t = exp(lse_t - lse): the mixture's entropy. An
                # all -inf slice has w_t = 0 and H_t = NaN (0 / 0): it contributes exactly 0.
                log_w = lse_parts - lse_i.unsqueeze(1)
                terms = torch.where(lse_parts > -math.inf, log_w.exp() * (ent_parts - log_w), 0.0)
                ent_i = torch.where(valid, terms.sum(1), 0.0)
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
    grad_bias32 = torch.zeros(v, dtype=accumulation_dtype(dtype), device=dev) if need_bias else None
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
            grad_bias32[j0:j1] += dlogits.sum(0, dtype=grad_bias32.dtype)
    return grad_hidden, grad_weight, grad_bias32


# ----------------------------------------------------------------------------------------------
# Custom ops (fake kernels for torch.compile / meta tensors, autograd formula). Inputs: hidden [N, H]
# (last dim contiguous), weight [V, H], bias [V] or None, labels [N] int64, all of one dtype.
# ----------------------------------------------------------------------------------------------
def _tiles(hidden, weight, chunk_tokens, chunk_vocab):
    budget = DEFAULT_WORKSPACE_BYTES_CUDA if hidden.is_cuda else DEFAULT_WORKSPACE_BYTES_CPU
    return _plan_tiles(hidden.shape[0], weight.shape[0], hidden.element_size(), hidden.dtype in _LOW_PRECISION,
                       budget, chunk_tokens, chunk_vocab)


@torch.library.custom_op("vrpo_fast::linear_stats_fwd", mutates_args=())
def _linear_stats_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, temperature: float, ignore_index: int, compute_entropy: bool,
                         chunk_tokens: Optional[int], chunk_vocab: Optional[int], backend: str,
                         check_labels: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy or empty [0], lse), [N] each, in the accumulation dtype."""
    if check_labels:
        _check_label_range(labels, weight.shape[0], ignore_index)
    path = resolve_backend(backend, hidden, weight)
    rows, cols = _tiles(hidden, weight, chunk_tokens, chunk_vocab)
    # The caller has already cast to the compute dtype: nothing inside may be autocast again.
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, entropy, lse = _linear_stats_forward(
            hidden, weight, bias, labels, temperature=temperature, ignore_index=ignore_index,
            compute_entropy=compute_entropy, rows=rows, cols=cols, backend=path,
        )
    return logprobs, (entropy if entropy is not None else logprobs.new_empty(0)), lse


@_linear_stats_fwd_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_tokens, chunk_vocab, backend,
      check_labels):
    out = hidden.new_empty(hidden.shape[:1], dtype=accumulation_dtype(hidden.dtype))
    return out, (torch.empty_like(out) if compute_entropy else out.new_empty(0)), torch.empty_like(out)


@torch.library.custom_op("vrpo_fast::linear_stats_bwd", mutates_args=())
def _linear_stats_bwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                         grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                         temperature: float, ignore_index: int, chunk_tokens: Optional[int],
                         chunk_vocab: Optional[int], backend: str, need_hidden: bool, need_weight: bool,
                         need_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias); a gradient that is not needed is an empty [0] tensor."""
    path = resolve_backend(backend, hidden, weight)
    rows, cols = _tiles(hidden, weight, chunk_tokens, chunk_vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        grad_hidden, grad_weight, grad_bias32 = _linear_stats_backward(
            hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, temperature=temperature,
            ignore_index=ignore_index, rows=rows, cols=cols, backend=path, need_hidden=need_hidden,
            need_weight=need_weight, need_bias=need_bias,
        )
    empty = hidden.new_empty(0)
    return (grad_hidden if need_hidden else empty, grad_weight if need_weight else empty.clone(),
            grad_bias32.to(bias.dtype) if need_bias else empty.clone())


@_linear_stats_bwd_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      chunk_tokens, chunk_vocab, backend, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else empty,
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else empty.clone(),
            torch.empty_like(bias) if need_bias else empty.clone())


def _linear_stats_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_tokens, chunk_vocab, backend, _ = \
        inputs
    _, entropy, lse = output
    # References to the inputs plus per-token lse / entropy: nothing of size N x V.
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if compute_entropy else None)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.config = (temperature, ignore_index, compute_entropy, chunk_tokens, chunk_vocab, backend)


def _linear_stats_backward_formula(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, chunk_tokens, chunk_vocab, backend = ctx.config
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    nones = (None,) * 8
    if not compute_entropy:
        grad_entropy = None
    if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return (None, None, None) + nones
    grad_hidden, grad_weight, grad_bias = _linear_stats_bwd_op(
        hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
        chunk_tokens, chunk_vocab, backend, need_hidden, need_weight, need_bias,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None) + nones


torch.library.register_autograd("vrpo_fast::linear_stats_fwd", _linear_stats_backward_formula,
                                setup_context=_linear_stats_setup_context)


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
    """Shape / dtype / argument checks; no data is read (safe under torch.compile and on meta)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=(2,), device=hidden.device)
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
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=(1,), device=hidden.device)
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


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the GEMMs run in: under ``torch.autocast`` on the inputs' device, the autocast dtype
    (fp64 inputs are not autocast, as in ``nn.Linear``); otherwise ``torch.promote_types`` of the
    three dtypes (bf16 hidden + fp32 weight -> fp32)."""
    device_type = hidden.device.type
    dtypes = [t.dtype for t in (hidden, weight, bias) if t is not None]
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        fast = torch.get_autocast_dtype(device_type)
        dtypes = [fast if d in _AUTOCAST_ELIGIBLE else d for d in dtypes]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def linear_logprobs_entropy(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                            compute_entropy=True, chunk_tokens=None, chunk_vocab=None, backend="auto",
                            out_dtype="auto"):
    """Per-token log-prob of ``labels`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``.

    The N x V logits are never materialised: they are made and consumed one tile at a time (see the
    module docstring for the algorithm and the workspace bound). A PyTorch custom op underneath
    (``torch.ops.vrpo_fast.linear_stats_fwd``), so ``torch.compile(fullgraph=True)`` traces it.

    Args:
        hidden: [N, H] or [B, T, H] final hidden states, fp16 / bf16 / fp32 / fp64.
        weight: [V, H] lm_head / ``nn.Linear`` weight on ``hidden``'s device.
        labels: integer tensor with the leading shape of ``hidden``; entries equal to
            ``ignore_index`` give 0 in both outputs and no gradient, the others must lie in [0, V).
        bias: optional [V] bias.
        temperature: divides the logits before the softmax (> 0).
        compute_entropy: if False, ``entropy`` is None and its work is skipped.
        chunk_tokens, chunk_vocab: tile shape. None picks it from a workspace budget (512 MiB on CUDA,
            64 MiB on CPU). Giving only ``chunk_tokens`` means full-vocabulary tiles.
        backend: "auto" (CUDA -> Triton statistics kernels, CPU -> chunked torch), "triton" or
            "torch". The matmuls always run through torch (cuBLAS / CPU BLAS).
        out_dtype: "auto" (fp32; fp64 when the compute dtype is fp64), None (``hidden``'s dtype) or a
            floating dtype.

    Dtypes: ``hidden``, ``weight`` and ``bias`` are cast to one compute dtype (:func:`compute_dtype`):
    the autocast dtype inside ``torch.autocast`` (so the GEMMs run in bf16 / fp16 there, like
    ``nn.Linear``), else the promotion of their dtypes (bf16 hidden with an fp32 weight computes in
    fp32). The statistics always accumulate in fp32 (fp64 for fp64); each gradient comes back in its
    input's own dtype.

    Returns:
        ``(logprobs, entropy)`` shaped like ``labels`` (``entropy`` None when
        ``compute_entropy=False``), differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _validate(hidden, weight, labels, bias, temperature, ignore_index)
    chunk_tokens = _check_chunk("chunk_tokens", chunk_tokens)
    chunk_vocab = _check_chunk("chunk_vocab", chunk_vocab)
    check_backend(backend)
    cdt = compute_dtype(hidden, weight, bias)
    dtype = resolve_out_dtype(out_dtype, cdt if out_dtype == "auto" else hidden.dtype)
    # Casts outside the op (differentiable, no-ops when the dtype already matches).
    hidden, weight = hidden.to(cdt), weight.to(cdt)
    bias = bias.to(cdt) if bias is not None else None

    lead_shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    # int64 before any comparison: a narrow label dtype cannot hold V (or ignore_index).
    logprobs, entropy, _ = _linear_stats_fwd_op(
        hidden2d, weight, bias, labels.reshape(-1).long(), float(temperature), ignore_index, bool(compute_entropy),
        chunk_tokens, chunk_vocab, backend, True,
    )
    logprobs = logprobs.view(lead_shape).to(dtype)
    return logprobs, (entropy.view(lead_shape).to(dtype) if compute_entropy else None)
