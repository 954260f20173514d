"""Model FLOPs of one RL step of a Llama-style decoder, counted from its configuration.

Pure functions of shapes: no model, no tensors. The count is *model* FLOPs (what the algorithm
needs), the convention behind "MFU": one multiply-add is 2 FLOPs, a backward costs twice its
forward (a gradient for the input and one for the weight of every matmul), and recomputation is
not counted (the fused lm_head op recomputes its logits tiles in the backward: +2 N H V executed,
not counted here). Elementwise work (norms, rotary, activations, softmax, the optimiser) is left
out: it is memory traffic, not matmul FLOPs.

Per token of a forward pass, with H = hidden, I = intermediate, h = heads, k = kv heads, d = head
dim, V = vocabulary, n_layers layers:

* projections: ``2 n_layers (H h d + 2 H k d + h d H + 3 H I)`` (q, k, v, o, gate / up / down);
* attention: ``4 n_layers h d c`` for a query that attends to ``c`` keys (``Q K^T`` and ``A V``);
  a causal pass over ``L`` positions has ``sum_{t<L} (t + 1) = L (L + 1) / 2`` query-key pairs per row,
  counted over the padded ``[B, L]`` block the kernels compute;
* lm_head: ``2 H V`` per token whose logits are made (the embedding lookup is free).

A step (:func:`rl_step_flops`, phases named as in ``benchmarks/bench_train_step.py``):

* ``generate``: a prefill of the ``P`` prompt columns, then ``N - 1`` decode steps of one column
  (query at position ``P + i - 1`` with the KV cache); the lm_head runs on the last column of the
  prefill and on every decode step (``B N`` rows; transformers' ``generate`` keeps one position);
* ``score``: policy (log pi_old) and reference forwards over ``[B, L]``, ``L = P + N``;
* ``value_old``: critic forward (body + value head, no lm_head);
* ``policy_fb``: policy forward + backward (3x forward); ``value_fb``: critic forward + backward;
* ``gae``, ``optimizer``: 0 matmul FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

PHASES = ("generate", "score", "value_old", "gae", "policy_fb", "value_fb", "optimizer")


@dataclass(frozen=True)
class DecoderShape:
    """The shape numbers of a Llama-style decoder that its matmul FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def __post_init__(self):
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderShape.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"DecoderShape.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From a Hugging Face Llama-family config (``head_dim`` defaults to hidden / heads)."""
        try:
            heads = int(config.num_attention_heads)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls(hidden=int(config.hidden_size), intermediate=int(config.intermediate_size),
                       layers=int(config.num_hidden_layers), heads=heads,
                       kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                       head_dim=int(head_dim), vocab=int(config.vocab_size))
        except AttributeError as err:
            raise ValueError(f"not a Llama-style decoder config ({type(config).__name__}): {err}") from None

    @property
    def projection_params(self) -> int:
        """Matmul weights of the decoder layers (q, k, v, o, gate, up, down), all layers."""
        H, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (H * q + 2 * H * kv + q * H + 3 * H * self.intermediate)


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def body_flops(shape: DecoderShape, tokens: int, query_key_pairs: int) -> int:
    """Forward FLOPs of the decoder layers for ``tokens`` query positions attending, in all, to
    ``query_key_pairs`` (query, key) pairs (per row and per head group: the sum of keys seen)."""
    _check_count("tokens", tokens)
    _check_count("query_key_pairs", query_key_pairs)
    attention = 4 * shape.layers * shape.heads * shape.head_dim * query_key_pairs
    return 2 * shape.projection_params * tokens + attention


def causal_pairs(length: int, past: int = 0) -> int:
    """(query, key) pairs of ``length`` new positions after ``past`` cached ones, causal:
    ``sum_{t < length} (past + t + 1)``."""
    _check_count("length", length)
    _check_count("past", past)
    return length * past + length * (length + 1) // 2


def head_flops(shape: DecoderShape, tokens: int) -> int:
    """Forward FLOPs of the lm_head on ``tokens`` positions."""
    return 2 * shape.hidden * shape.vocab * _check_count("tokens", tokens)


def forward_flops(shape: DecoderShape, batch: int, length: int, *, head_tokens: Optional[int] = None) -> int:
    """One causal forward over a ``[batch, length]`` block; the lm_head on ``head_tokens`` positions
    (default every one of the ``batch * length``; 0 for a body-only pass)."""
    _check_count("batch", batch)
    _check_count("length", length)
    n = batch * length
    head = head_flops(shape, n if head_tokens is None else head_tokens)
    return body_flops(shape, n, batch * causal_pairs(length)) + head


def generate_flops(shape: DecoderShape, batch: int, prompt_length: int, new_tokens: int) -> int:
    """``generate`` with the KV cache: prefill ``[batch, P]``, then ``new_tokens - 1`` one-column decode
    steps; logits for the last column only (``batch * new_tokens`` lm_head rows in all)."""
    _check_count("batch", batch)
    _check_count("prompt_length", prompt_length, 1)
    if _check_count("new_tokens", new_tokens) == 0:
        return 0
    total = body_flops(shape, batch * prompt_length, batch * causal_pairs(prompt_length))
    for i in range(1, new_tokens):
        total += body_flops(shape, batch, batch * causal_pairs(1, past=prompt_length + i - 1))
    return total + head_flops(shape, batch * new_tokens)


def rl_step_flops(shape: DecoderShape, *, batch: int, prompt_length: int, new_tokens: int,
                  value_head_params: int = 0, scored_tokens: Optional[int] = None,
                  critic: Optional[DecoderShape] = None) -> Dict[str, int]:
    """Model FLOPs of one VRPO / PPO step, phase by phase (keys :data:`PHASES`, plus ``"step"``).

    ``batch`` rollouts of ``prompt_length`` (left-padded) prompt columns and ``new_tokens`` generated
    columns; one PPO epoch (every rollout through one policy and one critic forward + backward).
    ``scored_tokens``: lm_head rows per scoring pass (default all ``batch * (prompt_length +
    new_tokens)``; a scorer that skips unlabelled positions makes fewer). ``value_head_params``: the
    critic's head matmul weights (2 FLOPs each per token). ``critic``: the critic's backbone shape
    (default the policy's).
    """
    critic = critic or shape
    L = prompt_length + new_tokens
    _check_count("value_head_params", value_head_params)
    policy_fwd = forward_flops(shape, batch, L, head_tokens=scored_tokens)
    critic_fwd = forward_flops(critic, batch, L, head_tokens=0) + 2 * value_head_params * batch * L
    out = {
        "generate": generate_flops(shape, batch, prompt_length, new_tokens),
        "score": 2 * policy_fwd,  # pi_old and the reference (same shape)
        "value_old": critic_fwd,
        "gae": 0,
        "policy_fb": 3 * policy_fwd,
        "value_fb": 3 * critic_fwd,
        "optimizer": 0,
    }
    out["step"] = sum(out[p] for p in PHASES)
    return out


__all__ = ["PHASES", "DecoderShape", "body_flops", "causal_pairs", "head_flops", "forward_flops", "generate_flops",
           "rl_step_flops"]
