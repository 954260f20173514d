"""Rollout generation: left-padded prompts -> sampled completions with the masks the losses need.

Conventions (shared with :mod:`vrpo_fast.scoring` and :class:`vrpo_fast.models.value_model.ValueModel`):

* ``input_ids`` [B, L] = prompt (left-padded to P tokens) + completion (right-padded to L - P).
* ``response_mask`` [B, L] marks the completion's tokens up to and including the first EOS
  (token-aligned: entry t is 1 when token t was generated).
* ``action_mask`` [B, L] is ``response_mask`` shifted left by one (state-aligned: entry t is 1 when
  the state after token t generated a response token). Log-probs, entropies, values and advantages
  live in this state-aligned frame: the output of the model at position t belongs to the token at
  position t + 1, exactly like logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long: real prompt tokens + response tokens
    response_mask: torch.Tensor  # [B, L] bool, token-aligned
    prompt_length: int  # P: completions start at column P
    completions: List[str]

    @property
    def action_mask(self) -> torch.Tensor:
        """State-aligned response mask: ``action_mask[:, t] = response_mask[:, t + 1]``; last column 0."""
        return shift_left(self.response_mask)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` (a 1-d long tensor) as a new rollout."""
        rows = index.tolist()
        return Rollout(self.input_ids[index], self.attention_mask[index], self.response_mask[index],
                       self.prompt_length, [self.completions[i] for i in rows])


def shift_left(mask: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = mask[:, t + 1]``, ``out[:, -1] = 0``: token-aligned -> state-aligned."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (left padding does not shift them), as ``generate`` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def format_prompt(tokenizer, prompt: str) -> str:
    """The tokenizer's chat template around ``prompt`` (one user turn) when it has one, else ``prompt``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompts(tokenizer, prompts: Sequence[str], device=None):
    """Left-padded ``(input_ids, attention_mask)`` for the formatted prompts.

    A chat template already contains the special tokens it needs, so they are not added again.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def eos_token_ids(tokenizer, model=None) -> List[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation config names none: "
                         "completions could never end")
    return sorted(ids)


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """[B, N] bool: generated tokens up to and including the first EOS (everything if none).

    Works when pad == eos: a token counts if no EOS came strictly before it.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


class KeyedSampler:
    """Temperature sampling by the Gumbel-max trick with keyed noise (a ``transformers`` logits processor).

    Token ``n`` of row ``i`` is ``argmax_v(logits[i, v] / T + g(seed, keys[i], n, v))`` with ``g`` a
    standard Gumbel from :func:`vrpo_fast.ops._random.keyed_gumbel`: an exact sample from
    ``softmax(logits / T)``, and a pure function of the row's key, not of the other rows in the batch,
    their padding, or the process the row is on. That is what lets a data-parallel run sample exactly
    the tokens of a single-process run with the same global batch. The draw is
    :func:`vrpo_fast.ops.keyed_sample` (a Triton kernel on CUDA that reads the logits once); it returns
    scores that are 0 at the drawn token and -inf elsewhere, for greedy decoding (``do_sample=False``).
    """

    def __init__(self, seed: int, keys: torch.Tensor, prompt_length: int, temperature: float):
        if not temperature > 0:
            raise ValueError(f"KeyedSampler needs temperature > 0, got {temperature}")
        self.seed, self.keys, self.prompt_length, self.temperature = int(seed), keys.view(-1), prompt_length, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from vrpo_fast.ops import keyed_sample

        if input_ids.shape[0] != self.keys.shape[0]:
            raise ValueError(f"KeyedSampler got {input_ids.shape[0]} rows but {self.keys.shape[0]} keys")
        if self.keys.device != scores.device:
            self.keys = self.keys.to(scores.device)  # once, not every step
        position = input_ids.shape[1] - self.prompt_length  # the index of the token being sampled
        # fused on CUDA: the logits are read once, no [B, V] noise tensor
        tokens = keyed_sample(scores, self.keys.view(-1), seed=self.seed, position=position,
                              temperature=self.temperature)
        # greedy decoding (do_sample=False) takes the argmax: 0 at the sampled token, -inf elsewhere
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


def _check_keys(row_keys, n: int) -> torch.Tensor:
    if row_keys is None:
        return torch.arange(n)
    keys = torch.as_tensor(row_keys)
    if keys.dtype not in (torch.int32, torch.int64) or keys.shape != (n,):
        raise ValueError(f"row_keys must be an int tensor of shape ({n},) (one key per prompt), got "
                         f"{keys.dtype} of shape {tuple(keys.shape)}")
    return keys.long()


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
             device=None, seed: Optional[int] = None, row_keys=None) -> Rollout:
    """Sample one completion per prompt (``temperature == 0``: greedy) with the KV cache.

    Pure temperature sampling (no top-k / top-p / repetition penalty from the model's generation
    config), so that the sampling distribution is exactly the one the log-probs are computed from.
    Sampling is keyed (:class:`KeyedSampler`): completion ``i`` depends only on its prompt, ``seed``
    and ``row_keys[i]`` (default ``0..B-1``; ``seed`` None draws one from torch's default generator,
    so ``torch.manual_seed`` controls it), however the prompts are batched or sharded.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = device if device is not None else next(model.parameters()).device
    keys = _check_keys(row_keys, len(prompts))
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    eos_ids = eos_token_ids(tokenizer, model)
    prompt_length = prompt_ids.shape[1]
    processors = LogitsProcessorList()
    if temperature > 0:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        processors.append(KeyedSampler(seed, keys, prompt_length, temperature))
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy over the (Gumbel-perturbed, when sampling) scores
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                             logits_processor=processors)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_length:]
    comp_mask = completion_mask(completion_ids, eos_ids)
    # tokens after the first EOS become padding in the stored sequence
    completion_ids = torch.where(comp_mask, completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id))
    completions = decode_completions(tokenizer, completion_ids, comp_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), comp_mask], dim=1)
    return Rollout(input_ids, attention_mask, response_mask, prompt_length, completions)


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[str]:
    rows = completion_ids.tolist() if mask is None else [
        [t for t, keep in zip(ids, m) if keep] for ids, m in zip(completion_ids.tolist(), mask.tolist())
    ]
    return tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
