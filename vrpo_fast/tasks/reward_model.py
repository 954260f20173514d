"""Learned reward models: train a tiny one on preference pairs, load any local HF one to score text.

* :func:`load_reward_model` turns a local Hugging Face *sequence-classification* model directory
  (``AutoModelForSequenceClassification`` + ``AutoTokenizer``) into a scorer
  ``scorer(prompts, completions) -> float32 tensor [N] in [0, 1]``: the sigmoid of the model's score
  (for a 2-label classifier, the probability of label 1). Prompt and completion are encoded as a
  text pair (or through the tokenizer's chat template when it has one), right-padded so the scores
  do not depend on the batch, and truncated from the left (the oldest turns go first).
* :func:`train_reward_model` trains a tiny ``LlamaForSequenceClassification`` with a character
  tokenizer (saved alongside, ``save_pretrained`` format) on (prompt, chosen, rejected) triples with
  the Bradley-Terry loss plus a small pointwise anchor that makes sigmoid(score) read as
  "probability the reply is good" rather than an arbitrary offset.
* :func:`cache_root` is where built-in models are cached: ``$VRPO_FAST_CACHE`` or
  ``~/.cache/vrpo_fast``.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..cache import cache_root  # re-exported: built-in reward models live under it

PAD, UNK, BOS, SEP, EOS = "<pad>", "<unk>", "<bos>", "<sep>", "<eos>"


def build_reward_tokenizer():
    """Character tokenizer for reward models: ``<bos> prompt <sep> completion <eos>`` for a pair.

    The ``<eos>`` closing every sequence is the token the classification head reads, so the score
    always sees where the reply ended (an empty or cut-off reply looks different from a full one).
    """
    from ..models.tiny import char_tokenizer

    return char_tokenizer((PAD, UNK, BOS, SEP, EOS), single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {SEP} $B {EOS}",
                          padding_side="right", truncation_side="left", pad_token=PAD, unk_token=UNK,
                          bos_token=BOS, eos_token=EOS, sep_token=SEP)


@dataclass
class RewardModelConfig:
    """Shape and training schedule of a tiny reward model (defaults: ~0.1M parameters)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_length: int = 128  # training: tokens (characters) per (prompt, completion) pair, specials included
    max_position_embeddings: int = 256  # scoring may see longer pairs than training did
    epochs: int = 1
    batch_size: int = 16  # pairs per step
    lr: float = 3e-3
    weight_decay: float = 0.01
    anchor_weight: float = 0.5  # weight of the pointwise BCE (chosen -> 1, rejected -> 0)
    #: stop early (after a whole step) past this many seconds; None: always the full schedule, so a
    #: cached model does not depend on how busy the machine was
    time_budget_s: Optional[float] = None
    #: intra-op threads while training: the matrices are so small that extra threads cost more in
    #: synchronisation than they save, and on a busy machine they cost ~10x (0: leave torch's setting)
    num_threads: int = 1
    seed: int = 0


def build_reward_model(tokenizer, config: RewardModelConfig):
    """A freshly initialised tiny ``LlamaForSequenceClassification`` (one output: the score)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max(config.max_position_embeddings, config.max_length),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, num_labels=1, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LlamaForSequenceClassification(llama)


def _encode(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int, device):
    """Tokenise (prompt, completion) pairs, right-padded, oldest prompt text truncated first."""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions)
        ]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), list(completions), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


class RewardModelScorer:
    """``scorer(prompts, completions) -> float32 CPU tensor [N]`` in [0, 1] (see :func:`load_reward_model`)."""

    def __init__(self, model, tokenizer, device="cpu", max_length: int = 512, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.device, self.batch_size = torch.device(device), int(batch_size)
        num_labels = int(getattr(model.config, "num_labels", 1))
        if num_labels not in (1, 2):
            raise ValueError(f"a reward model must have 1 output (a score) or 2 (bad/good), got num_labels={num_labels}")
        self.num_labels = num_labels
        # right padding: Llama-style models take positions from the sequence start, so left padding
        # would shift them and make a pair's score depend on the longest pair in its batch
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            for fallback in (tokenizer.eos_token, tokenizer.unk_token):
                if fallback is not None:
                    tokenizer.pad_token = fallback
                    break
        if tokenizer.pad_token_id is None:  # nothing to pad with: score one pair at a time
            self.batch_size = 1
        elif getattr(model.config, "pad_token_id", None) != tokenizer.pad_token_id:
            # the classification head finds each row's last real token through config.pad_token_id
            model.config.pad_token_id = tokenizer.pad_token_id
        limits = [max_length, getattr(tokenizer, "model_max_length", max_length) or max_length,
                  getattr(model.config, "max_position_embeddings", max_length) or max_length]
        self.max_length = int(min(limits))

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Raw scores (logits; for 2 labels, logit[1] - logit[0]), float32 CPU tensor [N]."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TypeError("prompts and completions must be sequences of strings, not a single string")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            p = [str(x) for x in prompts[i : i + self.batch_size]]
            c = [str(x).strip() for x in completions[i : i + self.batch_size]]
            logits = self.model(**_encode(self.tokenizer, p, c, self.max_length, self.device)).logits.float()
            out.append((logits[:, 1] - logits[:, 0] if self.num_labels == 2 else logits[:, 0]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.scores(prompts, completions)).float()


def load_reward_model(path: str, device="cpu", max_length: int = 512, batch_size: int = 64) -> RewardModelScorer:
    """Load a local HF sequence-classification model directory as a reward function.

    Returns ``scorer(prompts: list[str], completions: list[str]) -> float32 tensor [N]`` in [0, 1]
    (sigmoid of the score; 2-label classifiers: P(label 1)). Scoring runs under ``no_grad`` in
    batches of ``batch_size``, truncating each pair to ``max_length`` tokens from the left.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reward model directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    return RewardModelScorer(model, tokenizer, device=device, max_length=max_length, batch_size=batch_size)


def _pair_loss(model, tokenizer, prompts, chosen, rejected, config: RewardModelConfig):
    n = len(prompts)
    enc = _encode(tokenizer, list(prompts) * 2, list(chosen) + list(rejected), config.max_length, "cpu")
    scores = model(**enc).logits[:, 0].float()
    s_c, s_r = scores[:n], scores[n:]
    bt = -F.logsigmoid(s_c - s_r).mean()
    anchor = 0.5 * (F.softplus(-s_c).mean() + F.softplus(s_r).mean())  # BCE(chosen, 1) + BCE(rejected, 0)
    return bt + config.anchor_weight * anchor, (s_c > s_r).float().mean().item()


def train_reward_model(
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    out_dir: Optional[str] = None,
    config: Optional[RewardModelConfig] = None,
    log: Optional[Callable[[str], None]] = None,
    overwrite: bool = True,
):
    """Train a tiny reward model on preference triples; save it to ``out_dir`` if given.

    Returns ``(model, tokenizer, info)`` with ``info`` = {"steps", "final_loss", "train_accuracy",
    "wall_time_s", ...}. Deterministic given ``config.seed`` (single-threaded math aside).
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError(f"need equally many prompts, chosen and rejected (> 0), got "
                         f"{len(prompts)}, {len(chosen)}, {len(rejected)}")
    config = config or RewardModelConfig()
    threads = torch.get_num_threads()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(prompts, chosen, rejected, out_dir, config, log, overwrite)
    finally:
        torch.set_num_threads(threads)


def _train(prompts, chosen, rejected, out_dir, config: RewardModelConfig, log, overwrite):
    tokenizer = build_reward_tokenizer()
    model = build_reward_model(tokenizer, config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(prompts)
    total = math.ceil(n / config.batch_size) * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    rng = random.Random(config.seed)
    t0, step, loss, acc, accs = time.time(), 0, float("nan"), 0.0, []
    batches = []  # the whole schedule up front: a fresh shuffle per epoch
    for _ in range(config.epochs):
        order = list(range(n))
        rng.shuffle(order)
        batches += [order[b : b + config.batch_size] for b in range(0, n, config.batch_size)]
    model.train()
    for idx in batches:
        loss_t, acc = _pair_loss(model, tokenizer, [prompts[i] for i in idx], [chosen[i] for i in idx],
                                 [rejected[i] for i in idx], config)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step, loss = step + 1, float(loss_t.detach())
        accs = (accs + [acc])[-20:]
        if log and step % 50 == 0:
            log(f"reward model step {step}/{total} loss {loss:.4f} acc {sum(accs) / len(accs):.3f}")
        if config.time_budget_s is not None and time.time() - t0 > config.time_budget_s:
            break
    model.eval()
    info = {"steps": step, "planned_steps": total, "final_loss": loss,
            "train_accuracy": sum(accs) / max(1, len(accs)), "wall_time_s": time.time() - t0,
            "n_pairs": n, "config": asdict(config)}
    if out_dir is not None:
        save_reward_model(model, tokenizer, out_dir, info, overwrite=overwrite)
    return model, tokenizer, info


def save_reward_model(model, tokenizer, out_dir: str, info: Optional[Dict] = None, overwrite: bool = True) -> str:
    """``save_pretrained`` model + tokenizer into ``out_dir`` atomically (temp dir, then rename), so
    a concurrent reader never sees half a model. ``overwrite=False`` keeps an existing ``out_dir``
    (another process that trained the same cached model first)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            with open(os.path.join(tmp, "vrpo_fast_reward_model.json"), "w") as f:
                json.dump(info, f, indent=2, default=str)
        if os.path.exists(out_dir) and overwrite:
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not overwrite and os.path.isdir(out_dir):
                pass  # lost the race to another process: its copy is as good as ours
            else:
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@torch.no_grad()
def preference_accuracy(scorer: Callable, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> float:
    """Fraction of triples where ``scorer`` ranks the chosen reply above the rejected one."""
    s_c = scorer(list(prompts), list(chosen))
    s_r = scorer(list(prompts), list(rejected))
    return float((s_c > s_r).float().mean())


__all__ = [
    "cache_root",
    "build_reward_tokenizer",
    "RewardModelConfig",
    "build_reward_model",
    "RewardModelScorer",
    "load_reward_model",
    "train_reward_model",
    "save_reward_model",
    "preference_accuracy",
]
