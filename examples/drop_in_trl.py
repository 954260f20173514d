"""vrpo-fast in place of TRL's ``selective_log_softmax`` / ``entropy_from_logits`` (and its fused LM head).

TRL (huggingface/trl) scores completions with

* ``trl.trainer.utils.selective_log_softmax(logits, index)``: ``log_softmax(logits)`` gathered at
  ``index``, in the logits' dtype (the trainers divide the logits by the temperature first);
* ``trl.trainer.utils.entropy_from_logits(logits, chunk_size=128)``: ``-sum p log p`` of every row, in
  the logits' dtype, no masking;
* ``trl.kernels.selective_log_softmax_and_entropy(logits, index, temperature=1.0, row_mask=None)``
  (a Triton kernel, CUDA only): both of ``log_softmax(logits / T)``, fp32; rows where
  ``row_mask == 0`` give 0 in both;
* ``add_fused_lm_head(model, temperature)``: ``model(..., labels, fused_lm_head=True)`` returns
  ``log_probs`` / ``entropy`` of ``labels[:, 1:]`` under ``lm_head(last_hidden_state[:, :-1]) / T``,
  zero where the label is -100, without materialising the logits.

The functions below compute the same quantities with one fused pass
(:func:`vrpo_fast.ops.token_logprobs_entropy`, :func:`vrpo_fast.ops.linear_logprobs_entropy`): no
``[B, T, V]`` log-softmax temporary, no ``logits / T`` copy, fp32 outputs (``out_dtype=None``: the
logits' dtype, as TRL's helpers), differentiable, on CPU and CUDA. CUDA tensors run the Triton kernels;
CPU tensors the chunked-PyTorch path (``backend=`` forces one). Each replacement takes TRL's parameters
in TRL's order with TRL's defaults, then optional extras, so any call that is valid for TRL's function
means the same with the replacement (``patch_trl`` checks this against the installed TRL).

Run ``python examples/drop_in_trl.py`` for a CPU check against plain-PyTorch TRL semantics.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Optional, Tuple

import torch

from vrpo_fast.ops import linear_logprobs_entropy, token_logprobs_entropy

IGNORE_INDEX = -100


def _labels_with_row_mask(index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # TRL's row_mask == 0 means "skip, return 0": that is exactly our ignore_index.
    if row_mask is None:
        return index
    return index.masked_fill(row_mask == 0, IGNORE_INDEX)


def _token_stats_any_rank(logits, labels, temperature, compute_entropy, backend, out_dtype):
    """The op takes [N, V] or [B, T, V]; TRL accepts any number of leading dims (also none: [V])."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError("index must have the leading shape of logits (one label per position; the top-K form "
                         f"is not supported), got index {tuple(labels.shape)} for logits {tuple(logits.shape)}")
    kw = dict(temperature=temperature, compute_entropy=compute_entropy, backend=backend, out_dtype=out_dtype)
    if logits.dim() in (2, 3):
        return token_logprobs_entropy(logits, labels, **kw)
    lead = logits.shape[:-1]
    logprobs, entropy = token_logprobs_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), **kw)
    return logprobs.view(lead), (entropy.view(lead) if entropy is not None else None)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: Optional[torch.Tensor] = None, *, backend: str = "auto",
                          out_dtype="auto") -> torch.Tensor:
    """TRL's ``selective_log_softmax(logits, index)`` for one label per position, plus an optional
    ``temperature`` and ``row_mask`` (0 -> 0). fp32 out by default; ``out_dtype=None`` gives the
    logits' dtype, as TRL."""
    labels = _labels_with_row_mask(index, row_mask)
    logprobs, _ = _token_stats_any_rank(logits, labels, temperature, False, backend, out_dtype)
    return logprobs


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128, *, temperature: float = 1.0,
                        backend: str = "auto", out_dtype="auto") -> torch.Tensor:
    """TRL's ``entropy_from_logits``: entropy of every row (nothing masked); fp32 out by default
    (``out_dtype=None``: the logits' dtype, as TRL).

    ``chunk_size`` is accepted for signature compatibility and ignored (the op never materialises
    more than one chunk anyway).
    """
    # The entropy does not depend on the label; any in-range id (0) keeps every row unmasked.
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _token_stats_any_rank(logits, labels, temperature, True, backend, out_dtype)
    return entropy


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                                      row_mask: Optional[torch.Tensor] = None, *, entropy_requires_grad: bool = True,
                                      backend: str = "auto", out_dtype="auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``trl.kernels.selective_log_softmax_and_entropy(logits, index, temperature=1.0,
    row_mask=None)``: both in one pass over the logits, fp32 (as TRL's kernel), rows with
    ``row_mask == 0`` give 0 in both outputs. Runs on CPU too (TRL's kernel is CUDA only).
    ``entropy_requires_grad=False`` detaches the entropy (keyword only)."""
    labels = _labels_with_row_mask(index, row_mask)
    logprobs, entropy = _token_stats_any_rank(logits, labels, temperature, True, backend, out_dtype)
    return logprobs, (entropy if entropy_requires_grad else entropy.detach())


def fused_lm_head_logps_entropy(last_hidden_state: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                                temperature: float = 1.0, *, backend: str = "auto"
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``log_probs`` / ``entropy`` of TRL's fused LM head (``model(..., labels=labels, fused_lm_head=True)``).

    Position t scores ``labels[:, t + 1]`` from ``last_hidden_state[:, t]``; -100 labels give 0. Shapes
    ``[B, T - 1]``, fp32. Models with ``final_logit_softcapping`` are not covered; a ``logit_scale`` s
    folds into the temperature (pass ``temperature / s``).
    """
    return linear_logprobs_entropy(last_hidden_state[:, :-1], lm_head.weight, labels[:, 1:], lm_head.bias,
                                   temperature=temperature, ignore_index=IGNORE_INDEX, backend=backend)


REPLACEMENTS = {"selective_log_softmax": selective_log_softmax, "entropy_from_logits": entropy_from_logits,
                "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy}


def signature_mismatch(upstream, replacement) -> Optional[str]:
    """None if ``replacement`` can stand in for ``upstream``, else why not.

    It can when every parameter of ``upstream`` is the same parameter of ``replacement`` (name,
    position, kind and default) and every extra parameter of ``replacement`` is optional: then any
    call that is valid for ``upstream`` binds the same values to the same names in ``replacement``
    (a positional ``temperature`` stays the temperature).
    """
    try:
        theirs = list(inspect.signature(upstream).parameters.values())
    except (TypeError, ValueError):
        return "its signature cannot be read"
    ours = list(inspect.signature(replacement).parameters.values())
    if len(theirs) > len(ours):
        return f"it has more parameters than {replacement.__name__}{inspect.signature(replacement)}"
    for a, b in zip(theirs, ours):
        if (a.name, a.kind) != (b.name, b.kind) or a.default is not b.default and a.default != b.default:
            return f"parameter {a} differs from {b}"
    extra = [p.name for p in ours[len(theirs):]
             if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if extra:
        return f"the replacement requires {extra}"
    return None


def patch_trl(verbose: bool = False) -> list:
    """Rebind TRL's helpers to the drop-ins in every imported ``trl`` module that holds them.

    A name is rebound only where the installed function's signature matches the replacement's
    (:func:`signature_mismatch`); the others are left alone with a ``RuntimeWarning`` saying why.
    Returns the patched ``module.name`` strings (also printed with ``verbose=True``).
    """
    patched = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "trl" or mod_name.startswith("trl.")):
            continue
        for name, fn in REPLACEMENTS.items():
            current = getattr(module, name, None)
            if current is fn or not callable(current):
                continue
            why = signature_mismatch(current, fn)
            if why is not None:
                warnings.warn(f"patch_trl: left {mod_name}.{name} alone: {why}", RuntimeWarning, stacklevel=2)
                continue
            setattr(module, name, fn)
            patched.append(f"{mod_name}.{name}")
    if verbose:
        print("patch_trl patched:", ", ".join(patched) if patched else "nothing")
    return patched


def _trl_semantics(logits, index, temperature):
    """Plain-PyTorch TRL semantics (trainer divides by T in the logits' dtype), for the check below."""
    x = logits / temperature
    logp = torch.log_softmax(x, dim=-1)
    return logp.gather(-1, index.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def main() -> int:
    torch.manual_seed(0)
    B, T, V, temperature = 4, 9, 257, 0.7
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        logits = (3 * torch.randn(B, T, V)).to(dtype).requires_grad_(True)
        completion_ids = torch.randint(0, V, (B, T))
        # Before (TRL's GRPOTrainer): logits = logits / T; logps = selective_log_softmax(logits, ids); ...
        ref_lp, ref_h = _trl_semantics(logits.detach().double(), completion_ids, temperature)
        # After: one fused pass, temperature inside the op.
        logps, entropies = selective_log_softmax_and_entropy(logits, completion_ids, temperature=temperature)
        err_lp = (logps.double() - ref_lp).abs().max().item()
        err_h = (entropies.double() - ref_h).abs().max().item()
        logps.sum().backward()
        ref_logits = logits.detach().double().requires_grad_(True)
        _trl_semantics(ref_logits, completion_ids, temperature)[0].sum().backward()
        err_g = (logits.grad.double() - ref_logits.grad).abs().max().item()
        good = max(err_lp, err_h, err_g) < tol
        ok &= good
        print(f"{str(dtype):15s} max|dlogp|={err_lp:.2e} max|dH|={err_h:.2e} max|dgrad|={err_g:.2e} "
              f"{'OK' if good else 'MISMATCH'}")
    print("TRL drop-in:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
