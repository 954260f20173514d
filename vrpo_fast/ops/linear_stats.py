"""Token log-probs and entropy straight from hidden states and an lm_head weight.

STUB (issue [1 of 6] in progress): reference only.
"""
from __future__ import annotations

import torch

from .token_stats import token_logprobs_entropy_reference


def linear_logprobs_entropy_reference(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                                      compute_entropy=True):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return token_logprobs_entropy_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, compute_entropy=compute_entropy
    )


def linear_logprobs_entropy(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                            compute_entropy=True, backend="auto"):
    return linear_logprobs_entropy_reference(hidden, weight, labels, bias, temperature=temperature,
                                             ignore_index=ignore_index, compute_entropy=compute_entropy)
