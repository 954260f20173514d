"""Supervised warm-up: maximum likelihood on the task's reference completions before RL."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch

from .config import TrainConfig
from .distributed import global_token_weight, mean_over_processes
from .errors import NonFiniteLossError
from .ops import masked_mean
from .rollout import Rollout
from .scoring import score
from .seeding import derived_seed, progress_bar, shard
from .tasks import Example


def trainable_parameters(model) -> list:
    """What the optimiser updates: every parameter, or only the adapters (and value heads) under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def supervised_batch(tokenizer, examples: Sequence[Example], device) -> Rollout:
    """prompt + reference completion + EOS, as a rollout (so the same scorer gives its log-likelihood)."""
    from .rollout import encode_prompts

    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples])
    completions = tokenizer([e.reference for e in examples], add_special_tokens=False)["input_ids"]
    completions = [c + [tokenizer.eos_token_id] for c in completions]
    n = max(len(c) for c in completions)
    comp_ids = torch.full((len(examples), n), tokenizer.pad_token_id, dtype=torch.long)
    comp_mask = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, c in enumerate(completions):
        comp_ids[i, :len(c)] = torch.tensor(c)
        comp_mask[i, :len(c)] = True
    input_ids = torch.cat([prompt_ids, comp_ids], 1).to(device)
    attention_mask = torch.cat([prompt_mask, comp_mask.long()], 1).to(device)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), comp_mask], 1).to(device)
    return Rollout(input_ids, attention_mask, response_mask, prompt_ids.shape[1], [e.reference for e in examples])


def supervised_warmup(accelerator, policy, tokenizer, examples: Sequence[Example], cfg: TrainConfig,
                      progress: bool, probe: Optional[Callable[[], float]] = None,
                      optimizer=None) -> Dict[str, float]:
    """Maximum likelihood on the task's reference completions, so that RL starts from non-zero rewards.

    Runs ``--warmup-steps`` steps, or stops early once ``probe()`` (the clean reward on a few train
    prompts, checked every ``--warmup-check-every`` steps) reaches ``--warmup-target``: the policy
    should be clearly imperfect, leaving RL something to improve.
    """
    o = cfg.optim
    info = {"warmup_steps": 0, "warmup_final_nll": math.nan, "warmup_probe_reward": math.nan}
    if o.warmup_steps == 0:
        return info
    if not any(e.reference for e in examples):
        raise ValueError(f"task {cfg.task.task!r} has no reference completions for the warm-up: pass --warmup-steps 0")
    if optimizer is None:
        optimizer = accelerator.prepare(torch.optim.AdamW(trainable_parameters(policy), lr=o.warmup_lr,
                                                          weight_decay=0.0))
    else:  # FSDP2: the policy's own optimizer (prepared with it); the caller resets it afterwards
        for group in optimizer.param_groups:
            group.update(lr=o.warmup_lr, weight_decay=0.0)
    bar = progress_bar(o.warmup_steps, "warm-up", progress and accelerator.is_main_process)
    for step in range(o.warmup_steps):
        g = torch.Generator().manual_seed(derived_seed(cfg.run.seed, 5, step))
        idx = torch.randint(len(examples), (o.warmup_batch_size,), generator=g).tolist()
        mine = shard(idx, accelerator.process_index, accelerator.num_processes)
        batch = supervised_batch(tokenizer, [examples[i] for i in mine], accelerator.device)
        # the mean NLL over every process's tokens (not the mean of the per-process means)
        weight = global_token_weight(accelerator, batch.action_mask)
        with accelerator.autocast():
            logprobs, _ = score(policy, batch, compute_entropy=False)
            loss = -masked_mean(logprobs, batch.action_mask) * weight
        if not torch.isfinite(loss):
            raise NonFiniteLossError("warm-up (supervised)", step + 1, loss.item())
        accelerator.backward(loss)
        norm = float(accelerator.clip_grad_norm_(policy.parameters(), o.max_grad_norm))
        if not math.isfinite(norm):
            raise NonFiniteLossError("warm-up (supervised)", step + 1, norm, quantity="gradient norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        info["warmup_steps"] = step + 1
        info["warmup_final_nll"] = mean_over_processes(accelerator, {"nll": loss.detach()})["nll"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{info['warmup_final_nll']:.3f}", probe=f"{info['warmup_probe_reward']:.2f}")
        if probe is not None and o.warmup_target > 0 and (step + 1) % o.warmup_check_every == 0:
            info["warmup_probe_reward"] = probe()
            if info["warmup_probe_reward"] >= o.warmup_target:
                break
    if bar is not None:
        bar.close()
    return info
