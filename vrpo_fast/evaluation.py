"""Held-out evaluation: the mean CLEAN reward of the policy's completions (the run's headline)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from .config import TrainConfig
from .rollout import generate
from .seeding import derived_seed, seed_everything
from .tasks import Example


def evaluate(accelerator, lm, tokenizer, reward_fn, examples: Sequence[Example], cfg: TrainConfig, *,
             temperature: Optional[float] = None, samples: Optional[int] = None,
             weights: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Mean CLEAN reward over ``samples`` completions per prompt (each process takes its shard of the
    prompts; results are gathered). Defaults: ``--eval-temperature`` and ``--eval-samples`` (1 when greedy).

    Not under ``no_grad`` as a whole (generation is): a reward may train something on first use.
    """
    r = cfg.rollout
    temperature = r.eval_temperature if temperature is None else temperature
    samples = 1 if temperature == 0 else (r.eval_samples if samples is None else samples)
    seed_everything(derived_seed(cfg.run.seed, 11, accelerator.process_index))
    # sample s of prompt i is keyed by (i, s): the same completions however the prompts are sharded
    mine = [(i, s) for i in range(len(examples))[accelerator.process_index::accelerator.num_processes]
            for s in range(samples)]
    rewards = []
    for start in range(0, len(mine), r.eval_batch_size):
        rows = mine[start:start + r.eval_batch_size]
        batch = [examples[i] for i, _ in rows]
        with weights(), accelerator.autocast():
            roll = generate(lm, tokenizer, [e.prompt for e in batch], max_new_tokens=r.max_new_tokens,
                            temperature=temperature, device=accelerator.device, seed=derived_seed(cfg.run.seed, 11),
                            row_keys=torch.tensor([i * samples + s for i, s in rows]))
        rewards.append(reward_fn(batch, roll.completions).float())
    local = torch.cat(rewards) if rewards else torch.zeros(0)
    total = accelerator.reduce(torch.tensor([local.sum().item(), float(len(local))], device=accelerator.device),
                               reduction="sum")
    return (total[0] / total[1].clamp_min(1)).item()
