"""vrpo-fast in place of TRL's ``selective_log_softmax`` / ``entropy_from_logits`` (and its fused LM head).

TRL (huggingface/trl, ``trl/trainer/utils.py``) scores completions with

* ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``: ``log_softmax(logits / T)``
  gathered at ``index``, in the logits' dtype; rows where ``row_mask == 0`` give 0;
* ``entropy_from_logits(logits)``: ``-sum p log p`` of every row, in the logits' dtype, no masking;
* ``add_fused_lm_head(model, temperature)``: ``model(..., labels, fused_lm_head=True)`` returns
  ``log_probs`` / ``entropy`` of ``labels[:, 1:]`` under ``lm_head(last_hidden_state[:, :-1]) / T``,
  zero where the label is -100, without materialising the logits.

The functions below compute the same quantities with one fused pass
(:func:`vrpo_fast.ops.token_logprobs_entropy`, :func:`vrpo_fast.ops.linear_logprobs_entropy`): no
``[B, T, V]`` log-softmax temporary, no ``logits / T`` copy, fp32 outputs, differentiable. CUDA tensors
run the Triton kernels; CPU tensors the chunked-PyTorch path (``backend=`` forces one).

Run ``python examples/drop_in_trl.py`` for a CPU check against plain-PyTorch TRL semantics.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

from vrpo_fast.ops import linear_logprobs_entropy, token_logprobs_entropy

IGNORE_INDEX = -100


def _labels_with_row_mask(index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # TRL's row_mask == 0 means "skip, return 0": that is exactly our ignore_index.
    if row_mask is None:
        return index
    return index.masked_fill(row_mask == 0, IGNORE_INDEX)


def _token_stats_any_rank(logits, labels, temperature, compute_entropy, backend):
    """The op takes [N, V] or [B, T, V]; TRL accepts any number of leading dims."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError("index must have the leading shape of logits (one label per position; the top-K form "
                         f"is not supported), got index {tuple(labels.shape)} for logits {tuple(logits.shape)}")
    if logits.dim() in (2, 3):
        return token_logprobs_entropy(logits, labels, temperature=temperature, compute_entropy=compute_entropy,
                                      backend=backend)
    lead = logits.shape[:-1]
    logprobs, entropy = token_logprobs_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               temperature=temperature, compute_entropy=compute_entropy,
                                               backend=backend)
    return logprobs.view(lead), (entropy.view(lead) if entropy is not None else None)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """TRL's ``selective_log_softmax`` for one label per position; returns fp32 (TRL: the logits' dtype)."""
    labels = _labels_with_row_mask(index, row_mask)
    logprobs, _ = _token_stats_any_rank(logits, labels, temperature, False, backend)
    return logprobs


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128, *, temperature: float = 1.0,
                        backend: str = "auto") -> torch.Tensor:
    """TRL's ``entropy_from_logits``: entropy of every row (nothing masked); returns fp32.

    ``chunk_size`` is accepted for signature compatibility and ignored (the op never materialises
    more than one chunk anyway).
    """
    # The entropy does not depend on the label; any in-range id (0) keeps every row unmasked.
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _token_stats_any_rank(logits, labels, temperature, True, backend)
    return entropy


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: Optional[torch.Tensor] = None, *,
                                      backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Both in one pass over the logits (TRL's ``selective_log_softmax_and_entropy``); rows with
    ``row_mask == 0`` give 0 in both outputs."""
    labels = _labels_with_row_mask(index, row_mask)
    logprobs, entropy = _token_stats_any_rank(logits, labels, temperature, True, backend)
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


def patch_trl() -> list:
    """Rebind TRL's helpers to the drop-ins in every imported ``trl`` module that imported them.

    TRL's trainers scale the logits by the temperature before calling these, so the patched functions
    keep TRL's default ``temperature=1.0``. Returns the patched ``module.name`` strings.
    """
    patched = []
    replacements = {"selective_log_softmax": selective_log_softmax, "entropy_from_logits": entropy_from_logits,
                    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy}
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "trl" or mod_name.startswith("trl.")):
            continue
        for name, fn in replacements.items():
            if callable(getattr(module, name, None)):
                setattr(module, name, fn)
                patched.append(f"{mod_name}.{name}")
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
