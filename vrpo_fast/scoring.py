"""Per-token statistics of a causal LM on rollouts, without materialising the [B, T, V] logits.

:class:`TokenScorer` wraps a Hugging Face causal LM: its forward runs the LM's body to the final
hidden state and hands it, with the ``lm_head`` weight, to the fused
:func:`vrpo_fast.ops.linear_logprobs_entropy`. Being an ``nn.Module`` whose forward is the whole
computation, it is what ``accelerator.prepare`` wraps in DDP for the policy (gradients are averaged
across processes) and what scores the frozen reference.

``TokenScorer(lm, fused=False)`` is the plain-PyTorch path instead: the ``lm_head`` makes the full
[B, T, V] logits and :func:`vrpo_fast.ops.token_logprobs_entropy_reference` takes their fp32
log_softmax (what most RLHF codebases do). Same outputs; it exists to compare against
(``benchmarks/bench_train_step.py``).

All outputs are state-aligned (see :mod:`vrpo_fast.rollout`): entry t scores token t + 1.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vrpo_fast.ops import linear_logprobs_entropy, sequence_perplexity, token_logprobs_entropy_reference

from .rollout import Rollout, position_ids_from_mask

IGNORE_INDEX = -100


def next_token_labels(input_ids: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """``labels[:, t] = input_ids[:, t + 1]`` where ``action_mask`` is set, else ``IGNORE_INDEX``."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return torch.where(action_mask.bool(), labels, torch.full_like(labels, IGNORE_INDEX))


class TokenScorer(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> (logprobs [B, T], entropy [B, T] or None)``, fp32.

    ``fused=True`` (default): the fused linear + log-softmax op, no [B, T, V] logits, and the lm_head
    only on positions that have a label (``scores_labelled_only``): in a rollout the prompt (often a
    long chat template) and the padding after EOS need no logits; the others give 0, as before.
    ``fused=False``: full logits from the ``lm_head`` + plain fp32 log_softmax (the baseline).
    """

    scores_labelled_only = True  # fused path; read by benchmarks/bench_train_step.py's FLOP count

    def __init__(self, lm: nn.Module, *, fused: bool = True):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.lm = lm
        self.fused = fused
        head = lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(lm).__name__} has no output embedding (lm_head) to score tokens with")
        self._takes_position_ids = "position_ids" in inspect.signature(lm.base_model.forward).parameters

    def hidden_states(self, input_ids, attention_mask):
        """The body's final (normed) hidden states; positions skip left padding, as in ``generate``."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        return self.lm.base_model(**kwargs).last_hidden_state

    def forward(self, input_ids, attention_mask, labels, *, temperature: float = 1.0, compute_entropy: bool = True):
        hidden = self.hidden_states(input_ids, attention_mask)
        head = self.lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        # under autocast the body returns low-precision activations while the master weight is fp32:
        # run the head in the activations' dtype, as autocast would run an nn.Linear
        dtype = hidden.dtype if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
        if not self.fused:
            logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
            return token_logprobs_entropy_reference(logits, labels, temperature=temperature, ignore_index=IGNORE_INDEX,
                                                    compute_entropy=compute_entropy)
        # the lm_head on labelled positions only (one [n, H] gather); all or none labelled: as is
        valid = labels != IGNORE_INDEX
        trim = bool(valid.any()) and not bool(valid.all())
        rows, row_labels = (hidden[valid], labels[valid]) if trim else (hidden, labels)
        lp, ent = linear_logprobs_entropy(
            rows.to(dtype), weight.to(dtype), row_labels, None if bias is None else bias.to(dtype),
            temperature=temperature, ignore_index=IGNORE_INDEX, compute_entropy=compute_entropy,
        )
        if trim:
            lp = lp.new_zeros(labels.shape).index_put((valid,), lp)
            ent = None if ent is None else ent.new_zeros(labels.shape).index_put((valid,), ent)
        return lp, ent


@dataclass
class ReferenceStats:
    """What the frozen reference LM says about each rollout token (state-aligned, zero off the mask)."""

    logprobs: torch.Tensor  # [B, T] log pi_ref(token)
    entropy: torch.Tensor  # [B, T] entropy of pi_ref's next-token distribution
    perplexity: torch.Tensor  # [B] exp(mean NLL over the completion)

    @property
    def nll(self) -> torch.Tensor:
        """-log pi_ref of the token each state *generates* (state-aligned; not observable at that state)."""
        return -self.logprobs

    def surprisal(self, action_mask: torch.Tensor):
        """(target, mask): at state t, -log pi_ref(token t | s_{t-1}), the surprisal of the token just
        read -- observable from the state the critic has read. Defined where token t is a scored
        response token, i.e. at action states t whose previous state t - 1 is an action state too (the
        first response state has read a prompt token, which is not scored)."""
        target = torch.zeros_like(self.logprobs)
        target[:, 1:] = -self.logprobs[:, :-1]
        prev = torch.zeros_like(action_mask, dtype=torch.bool)
        prev[:, 1:] = action_mask[:, :-1].bool()
        return target, prev & action_mask.bool()

    def sequence_surprisal(self, action_mask: torch.Tensor):
        """(target, mask): at each response's last state, the mean surprisal of the response tokens read
        so far (the log-perplexity of the read prefix); mask marks that one state per row."""
        tok, tok_mask = self.surprisal(action_mask)
        m = tok_mask.to(tok.dtype)
        prefix = (tok * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
        on = action_mask.bool()
        pos = torch.arange(on.shape[1], device=on.device).expand_as(on)
        last = torch.where(on, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        mask = (pos == last) & on & (m.sum(1, keepdim=True) > 0)
        return torch.where(mask, prefix, torch.zeros_like(prefix)), mask


def score(scorer: nn.Module, rollout: Rollout, *, temperature: float = 1.0, compute_entropy: bool = True,
          batch_size: int = 0):
    """``scorer`` over a rollout (in chunks of ``batch_size`` rows; 0: all at once)."""
    action_mask = rollout.action_mask
    labels = next_token_labels(rollout.input_ids, action_mask)
    n = rollout.input_ids.shape[0]
    step = batch_size if batch_size > 0 else n
    lps, ents = [], []
    for i in range(0, n, step):
        sl = slice(i, i + step)
        lp, ent = scorer(rollout.input_ids[sl], rollout.attention_mask[sl], labels[sl], temperature=temperature,
                         compute_entropy=compute_entropy)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if compute_entropy else None)


@torch.no_grad()
def reference_stats(ref_scorer: nn.Module, rollout: Rollout, *, temperature: float = 1.0,
                    batch_size: int = 0) -> ReferenceStats:
    """Frozen-LM log-probs, entropies and sequence perplexities: the VRPO auxiliary targets and the KL anchor.

    ``batch_size`` rows are scored at a time (0: all at once), as in :func:`score`.
    """
    logprobs, entropy = score(ref_scorer, rollout, temperature=temperature, batch_size=batch_size)
    return ReferenceStats(logprobs, entropy, sequence_perplexity(logprobs, rollout.action_mask))
