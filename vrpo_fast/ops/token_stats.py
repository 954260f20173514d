"""Per-token log-prob of the label and entropy of the next-token distribution, from logits.

STUB (issue [1 of 6] in progress): only the reference implementation exists yet; the public op
calls it so callers can already use the final name and signature.
"""
from __future__ import annotations

import torch


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
        ent = -(logp.exp() * logp).sum(-1)
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return lp, ent


def token_logprobs_entropy(logits, labels, *, temperature=1.0, ignore_index=-100, compute_entropy=True,
                           inplace_backward=False, backend="auto"):
    lp, ent = token_logprobs_entropy_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, compute_entropy=compute_entropy
    )
    return lp.float(), (ent.float() if ent is not None else None)
