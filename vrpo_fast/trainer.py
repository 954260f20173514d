"""The RL loop: warm-up, then rollout -> reward (+ noise) -> reference stats -> advantages -> PPO updates.

Thin by design: models come from :mod:`vrpo_fast.models`, token statistics from
:mod:`vrpo_fast.scoring` (fused ops), losses and advantages from :mod:`vrpo_fast.algorithms`.
Read :func:`run_training` top to bottom; it is the algorithm:

    warm up the policy on reference completions (supervised), freeze a copy as the reference
    for step in steps:
        sample completions for this step's prompts                     (rollout.generate)
        clean reward from the task, noisy reward = noise(clean)        (the learner sees only noisy)
        log pi_old, log pi_ref, H_ref, NLL_ref per token; V_old         (scoring, value model)
        vrpo/ppo: token rewards (noisy reward at the end - kl_coef * KL) -> GAE advantages, returns
        grpo:     group-normalised noisy rewards as advantages
        for epoch, mini-batch: clipped policy loss (+ clipped value loss + beta*KL + aux losses)

``accelerate`` places models, runs autocast, accumulates gradients and wraps the trained modules
in DDP, so ``accelerate launch -m vrpo_fast.train`` trains data-parallel with no change: every
process samples and scores its own shard of the step's prompts, the shards are gathered
(:mod:`vrpo_fast.distributed`) so that noise, advantages and mini-batches are those of the global
batch, each process trains on its slice of every mini-batch, and only the main process writes
files. Sampling and the VIB noise are keyed by global row, and losses are token means over the whole
mini-batch, so N processes match one process with the same global batch up to rounding.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from vrpo_fast.algorithms.advantages import gae_advantages, grpo_advantages, token_level_rewards
from vrpo_fast.algorithms.losses import explained_variance, grpo_policy_loss, policy_loss, vrpo_value_loss
from vrpo_fast.ops import masked_mean
from vrpo_fast.tasks import Example, get_task
from vrpo_fast.tasks.noise import make_noise

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import (check_distributed_support, full_state_dict, gather_objects, gather_rollout,
                          generation_weights, global_token_weight, is_sharded, load_optimizer_state,
                          mean_over_processes, optimizer_state, requested_processes)
from .metrics import MetricsWriter, plot_curves
from .models.loading import build_value_model, ensure_pad_token, frozen_copy, load_causal_lm, load_policy, \
    resolve_attn_implementation
from .rollout import Rollout, generate
from .scoring import ReferenceStats, TokenScorer, reference_stats, score

logger = logging.getLogger("vrpo_fast")

REFERENCE_DIR = "reference"  # the warmed-up policy = the frozen reference (written once)
WARMUP_FILE = "warmup.json"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN / inf. Training stopped before the bad update; checkpoints are untouched."""

    def __init__(self, loss_name: str, step: int, value: float, last_checkpoint: Optional[str] = None):
        self.loss_name, self.step, self.value, self.last_checkpoint = loss_name, step, value, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"the {loss_name} loss is {value} at RL step {step}: training stopped before applying "
                         f"it ({where}). Try a lower learning rate or --max-grad-norm.")


# ----------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------
def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...): the same on every run, distinct per tuple."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    m = cfg.model
    cpu = m.cpu or not torch.cuda.is_available()
    precision = m.mixed_precision or ("no" if cpu else "bf16")
    # AcceleratorState is a per-process singleton that refuses a new mixed-precision setting; several
    # runs in one process (the experiment runner, the tests) each get their own. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum_steps)


def make_reward_fn(cfg: TrainConfig, task) -> Callable[[Sequence[Example], Sequence[str]], torch.Tensor]:
    """Clean reward: the task's own rule, or a learned reward model (``--reward model:PATH``)."""
    if cfg.task.reward == "rule":
        return task.reward
    from vrpo_fast.tasks.reward_model import load_reward_model

    scorer = load_reward_model(cfg.task.reward[len("model:"):])

    def reward(examples, completions):
        return scorer([e.prompt for e in examples], list(completions)).float().cpu()

    return reward


def prompts_for_step(num_examples: int, step: int, prompts_per_step: int, seed: int) -> List[int]:
    """Indices of the global batch of prompts of an RL step: epochs of seeded permutations, in order.

    Stateless: the data-order position after step s is (s + 1) * prompts_per_step, so resuming at a
    step reproduces the order exactly.
    """
    out = []
    pos = step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(pos, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(derived_seed(seed, 7, epoch)))
        take = min(prompts_per_step - len(out), num_examples - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def shard(items: Sequence, rank: int, world: int) -> list:
    """Contiguous slice ``rank`` of ``world`` (groups of consecutive items stay together)."""
    n = len(items) // world
    return list(items[rank * n:(rank + 1) * n])


def check_finite(losses: Dict[str, torch.Tensor], step: int, accelerator, last_checkpoint: Optional[str]) -> None:
    bad = {name: float(v.detach()) for name, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if accelerator.num_processes > 1:
        # every process must stop together, or the others would wait forever in the next all-reduce
        flag = torch.tensor([float(bool(bad))], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0 and not bad:
            raise NonFiniteLossError("(another process's)", step, math.nan, last_checkpoint)
    if bad:
        name, value = next(iter(bad.items()))
        raise NonFiniteLossError(name, step, value, last_checkpoint)


def trainable_parameters(model) -> List[torch.nn.Parameter]:
    """What the optimiser updates: every parameter, or only the adapters (and value heads) under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def _lora_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    m = cfg.model
    return dict(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout, target_modules=m.lora_target_modules)


def enable_gradient_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------------------------
# evaluation and supervised warm-up
# ----------------------------------------------------------------------------------------------
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
    bar = _progress(o.warmup_steps, "warm-up", progress and accelerator.is_main_process)
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
        accelerator.clip_grad_norm_(policy.parameters(), o.max_grad_norm)
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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def _prepare_run_dir(cfg: TrainConfig, accelerator) -> str:
    run_dir = cfg.run_dir()
    if accelerator.is_main_process:
        has_run = os.path.exists(os.path.join(run_dir, "config.json"))
        if has_run and not cfg.run.resume:
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another "
                                  f"--output-dir")
        os.makedirs(run_dir, exist_ok=True)
        if cfg.run.resume and has_run:
            saved = TrainConfig.load(os.path.join(run_dir, "config.json")).flat()
            changed = {k: (saved.get(k), v) for k, v in cfg.flat().items()
                       if saved.get(k) != v and k not in ("steps", "resume", "progress", "save_every")}
            if changed:
                logger.warning("resuming %s with options that differ from the saved run: %s", run_dir, changed)
        cfg.save(os.path.join(run_dir, "config.json"))
    accelerator.wait_for_everyone()
    return run_dir


def run_training(cfg: TrainConfig, accelerator=None) -> Dict[str, Any]:
    """Train as configured; returns a summary (see the README). Only the main process writes files.

    Summary keys: ``eval_clean_reward_before`` / ``eval_clean_reward_after`` (held-out, noise-free),
    ``steps``, ``run_dir``, ``metrics_path``, ``checkpoint``, ``wall_time_s``, the train rewards of the
    last steps, and the run's algo / task / noise / seed.
    """
    threads = torch.get_num_threads()
    try:
        return _run_training(cfg, accelerator)
    finally:
        torch.set_num_threads(threads)


def _run_training(cfg: TrainConfig, accelerator=None) -> Dict[str, Any]:
    t_start = time.time()
    acc = accelerator or make_accelerator(cfg)
    cfg.validate(acc.num_processes)
    check_distributed_support(cfg, acc)
    wanted = requested_processes() if acc.num_processes == 1 else None
    if wanted and wanted > 1:
        logger.warning("accelerate launch was given --num_processes %d but started ONE process (on a machine "
                       "without GPUs it needs --multi_gpu; see the README). Training continues in one process: "
                       "the same results, without the parallel speed-up.", wanted)
    sharded = is_sharded(acc)
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process
    show_progress = cfg.run.progress and main
    run_dir = _prepare_run_dir(cfg, acc)
    seed_everything(derived_seed(cfg.run.seed, 1, rank))
    a, r, o = cfg.algo, cfg.rollout, cfg.optim
    has_critic = a.algo in ("vrpo", "ppo")
    attn = resolve_attn_implementation(cfg.model.attn_implementation, acc.device)
    if acc.device.type == "cpu" and (cfg.model.num_threads or cfg.model.model is None):
        torch.set_num_threads(cfg.model.num_threads or 1)

    # ---- task, clean reward, reward noise -----------------------------------------------------
    task = get_task(cfg.task.task, **cfg.task.task_kwargs)
    train_examples, eval_examples = task.train_examples(), task.eval_examples()[:cfg.task.num_eval]
    if not train_examples or not eval_examples:
        raise ValueError(f"task {cfg.task.task!r} has an empty train or eval split")
    reward_fn = make_reward_fn(cfg, task)
    noise = make_noise(cfg.task.noise_type, rate=cfg.task.noise_rate, std=cfg.task.noise_std,
                       seed=derived_seed(cfg.run.seed, 3), **cfg.task.noise_kwargs)

    # ---- policy: from the latest checkpoint, from the saved warm-up, or fresh + warm-up ---------
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.run.resume else None
    reference_dir = os.path.join(run_dir, REFERENCE_DIR)
    warmup_done = cfg.run.resume and os.path.isfile(os.path.join(run_dir, WARMUP_FILE))
    use_lora = cfg.model.lora_r > 0
    # under LoRA a checkpoint's trained state is its adapters (and the critic's heads): the frozen base
    # is the warmed-up policy in reference/, and the adapters are loaded onto it below
    # read once: it holds the full optimizer states (several GB for a real model)
    resume_state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
    lora_state = resume_state.get("lora") if resume_state is not None and use_lora else None
    if resume_from is not None and use_lora and lora_state is None:
        raise ValueError(f"{resume_from} was not written by a --lora-r run (it holds no adapter state): resume "
                         f"it without --lora-r")
    if resume_from is not None and not use_lora:
        policy_lm = load_causal_lm(os.path.join(resume_from, "policy"), attn_implementation=attn, what="checkpoint")
        tokenizer = ensure_pad_token(_load_tok(os.path.join(resume_from, "policy")), policy_lm)
    elif warmup_done:
        policy_lm = load_causal_lm(reference_dir, attn_implementation=attn, what="reference")
        tokenizer = ensure_pad_token(_load_tok(reference_dir), policy_lm)
    else:
        policy_lm, tokenizer = load_policy(cfg.model.model, attn_implementation=attn, seed=cfg.run.seed,
                                           tiny_hidden_size=cfg.model.tiny_hidden_size,
                                           tiny_layers=cfg.model.tiny_layers, gguf_file=cfg.model.gguf_file)
    if use_lora:
        from .models.lora import apply_lora, count_parameters, load_lora_state_dict

        torch.manual_seed(derived_seed(cfg.run.seed, 6))  # the same adapter init on every process
        apply_lora(policy_lm, **_lora_kwargs(cfg))
        if lora_state is not None:
            load_lora_state_dict(policy_lm, lora_state["policy"])
        if main:
            counts = count_parameters(policy_lm)
            print(f"[vrpo_fast] LoRA r={cfg.model.lora_r}: {counts['trainable']:,} of {counts['total']:,} policy "
                  f"parameters trained", flush=True)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy_lm)
    policy_opt = None
    if sharded:
        # FSDP2 shards the model in place and swaps its optimizer's parameters for the shards, so
        # both go through one prepare() call; the warm-up borrows this optimizer
        policy = TokenScorer(policy_lm)
        policy_opt = torch.optim.AdamW(trainable_parameters(policy), lr=o.lr, weight_decay=o.weight_decay)
        policy, policy_opt = acc.prepare(policy, policy_opt)
    else:
        policy = acc.prepare(TokenScorer(policy_lm))  # DDP-wrapped when distributed
    policy_weights = lambda: generation_weights(acc, policy)  # noqa: E731
    policy_lm = acc.unwrap_model(policy).lm

    if warmup_done or resume_from is not None:
        warmup = _read_json(os.path.join(run_dir, WARMUP_FILE))
    else:
        probe_examples = train_examples[:o.warmup_probe_size]
        warmup = supervised_warmup(acc, policy, tokenizer, train_examples, cfg, show_progress,
                                   probe=lambda: evaluate(acc, policy_lm, tokenizer, reward_fn, probe_examples, cfg,
                                                          temperature=0.0, weights=policy_weights),
                                   optimizer=policy_opt)
        if policy_opt is not None:  # the RL phase starts from fresh moments, as with a new optimiser
            policy_opt.state.clear()
            for group in policy_opt.param_groups:
                group.update(lr=o.lr, weight_decay=o.weight_decay)
        if use_lora and warmup["warmup_steps"]:
            from .models.lora import fold_lora_into_base

            # the warmed-up policy becomes the base (= the reference); the adapters restart at zero
            torch.manual_seed(derived_seed(cfg.run.seed, 6, 1))  # A re-initialised identically everywhere
            fold_lora_into_base(policy_lm)
        warmup["eval_clean_reward_before"] = evaluate(acc, policy_lm, tokenizer, reward_fn, eval_examples, cfg,
                                                      weights=policy_weights)
        if r.eval_greedy:
            warmup["eval_greedy_reward_before"] = evaluate(acc, policy_lm, tokenizer, reward_fn, eval_examples, cfg,
                                                           temperature=0.0, weights=policy_weights)
        policy_state = full_state_dict(acc, policy, prefix="lm.")  # FSDP: gathered on the main process
        if main:
            saved_lm = _plain_model(policy_lm) if use_lora else policy_lm
            ckpt.atomic_directory(reference_dir, lambda d: (saved_lm.save_pretrained(d, state_dict=policy_state),
                                                            tokenizer.save_pretrained(d)))
            del saved_lm
            ckpt.atomic_write_json(os.path.join(run_dir, WARMUP_FILE), warmup)
        acc.wait_for_everyone()
    if main:
        greedy = warmup.get("eval_greedy_reward_before")
        print(f"[vrpo_fast] warm-up: {warmup['warmup_steps']} supervised steps; held-out clean reward before RL: "
              f"{warmup['eval_clean_reward_before']:.3f}" + ("" if greedy is None else f" (greedy {greedy:.3f})"),
              flush=True)

    # ---- frozen reference (= the warmed-up policy) and critic ---------------------------------
    if use_lora:
        # LoRA: the reference shares every weight with the policy; it is the policy with its adapters
        # switched off (the frozen base = the warmed-up policy), so no second copy is held
        from .models.lora import adapters_disabled

        ref = TokenScorer(policy_lm)
        reference_mode = lambda: adapters_disabled(policy_lm)  # noqa: E731
    else:
        if os.path.isdir(reference_dir) and (resume_from is not None or warmup_done or sharded):
            ref_lm = load_causal_lm(reference_dir, attn_implementation=attn, what="reference")
            ref_lm.requires_grad_(False).eval()
        else:
            ref_lm = frozen_copy(policy_lm)
        if acc.mixed_precision in ("bf16", "fp16"):
            ref_lm.to(torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16)
        ref = TokenScorer(ref_lm).to(acc.device)
        reference_mode = contextlib.nullcontext

    value_model = None
    if has_critic:
        seed_everything(derived_seed(cfg.run.seed, 4))  # the same fresh heads however we got here
        resumed_critic = resume_from is not None and not use_lora
        critic_path = os.path.join(resume_from, "value") if resumed_critic else cfg.model.critic
        # under LoRA the critic's backbone starts from the policy's plain weights (adapters merged: the
        # warmed-up policy) and gets adapters of its own; its heads are trained in full
        source_lm = _plain_model(policy_lm) if use_lora and critic_path is None else policy_lm
        if (sharded or lora_state is not None) and critic_path is None:
            # the warmed-up policy's full weights: not the FSDP shards, not the resumed policy's adapters
            source_lm = load_causal_lm(reference_dir, attn_implementation=attn, what="reference")
        value_model = build_value_model(source_lm, algo=a.algo,
                                        critic_path=critic_path, latent_dim=a.latent_dim, beta=a.beta,
                                        aux_input=a.aux_input, attn_implementation=attn)
        del source_lm  # the merged copy's body now lives in the critic; drop its LM head
        if use_lora:
            from .models.lora import apply_lora

            apply_lora(value_model.backbone, **_lora_kwargs(cfg))
            if lora_state is not None:
                load_lora_state_dict(value_model.backbone, lora_state["value_adapters"])
                _load_heads(value_model, lora_state["value_heads"])
        if cfg.model.gradient_checkpointing:
            value_model.gradient_checkpointing_enable()

    # ---- optimisers, schedules -----------------------------------------------------------------
    def schedule(optimizer):
        if o.lr_schedule == "linear":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(cfg.run.steps, 1)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    if policy_opt is None:
        policy_opt = torch.optim.AdamW(trainable_parameters(policy), lr=o.lr, weight_decay=o.weight_decay)
        policy_sched = schedule(policy_opt)
        policy_opt, policy_sched = acc.prepare(policy_opt, policy_sched)
    else:  # FSDP2: prepared with the policy above
        policy_sched = acc.prepare(schedule(policy_opt))
    if has_critic:
        value_opt = torch.optim.AdamW(trainable_parameters(value_model), lr=o.critic_lr, weight_decay=o.weight_decay)
        value_sched = schedule(value_opt)
        value_model, value_opt, value_sched = acc.prepare(value_model, value_opt, value_sched)
    trained = [policy] + ([value_model] if has_critic else [])

    start_step = 0
    if resume_state is not None:
        start_step = resume_state["step"]
        load_optimizer_state(acc, policy, policy_opt, resume_state["policy_optimizer"])
        policy_sched.load_state_dict(resume_state["policy_scheduler"])
        if has_critic:
            load_optimizer_state(acc, value_model, value_opt, resume_state["value_optimizer"])
            value_sched.load_state_dict(resume_state["value_scheduler"])
        if acc.scaler is not None and resume_state.get("scaler") is not None:
            acc.scaler.load_state_dict(resume_state["scaler"])
        noise.load_state_dict(resume_state["noise"])
        ckpt.set_rng_state(resume_state["rng"][rank])
        if main:
            print(f"[vrpo_fast] resumed from {resume_from} at step {start_step}", flush=True)
        resume_state = lora_state = None  # the optimizer states now live in the optimizers: free the copy

    metrics = MetricsWriter(os.path.join(run_dir, "metrics.jsonl"),
                            resume_step=start_step if cfg.run.resume else None) if main else None
    last_checkpoint = resume_from

    def save(step: int) -> str:
        state = {
            "step": step,
            "data_position": step * (r.rollout_batch_size // cfg.samples_per_prompt),
            # full states (gathered under FSDP: collectives, so every process builds this dict)
            "policy_optimizer": optimizer_state(acc, policy, policy_opt),
            "policy_scheduler": policy_sched.state_dict(),
            "value_optimizer": optimizer_state(acc, value_model, value_opt) if has_critic else None,
            "value_scheduler": value_sched.state_dict() if has_critic else None,
            "noise": noise.state_dict(),  # the same on every process (it acts on the global batch)
            "rng": gather_objects(acc, [ckpt.rng_state()]),  # one per process
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "lora": _lora_checkpoint(acc.unwrap_model(policy).lm,
                                     acc.unwrap_model(value_model) if has_critic else None) if use_lora else None,
        }
        path = None
        policy_state = full_state_dict(acc, policy, prefix="lm.")  # collectives: every process
        value_state = full_state_dict(acc, value_model) if has_critic else None
        if main:
            # under LoRA, merged copies: plain models that --model / --critic load like any other
            saved_policy = acc.unwrap_model(policy).lm
            saved_value = acc.unwrap_model(value_model) if has_critic else None
            if use_lora:
                saved_policy = _plain_model(saved_policy)
                saved_value = _plain_model(saved_value) if has_critic else None
            path = ckpt.save_checkpoint(run_dir, step, policy=saved_policy, tokenizer=tokenizer,
                                        value_model=saved_value, policy_state=policy_state, value_state=value_state,
                                        trainer_state=state, keep=cfg.run.keep_checkpoints)
        acc.wait_for_everyone()
        return path or os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.checkpoint_name(step))

    # ---- RL ------------------------------------------------------------------------------------
    G = cfg.samples_per_prompt
    prompts_per_step = r.rollout_batch_size // G
    local_rollouts = r.rollout_batch_size // world
    micro_size = o.mini_batch_size // world // o.grad_accum_steps
    kl_coef = cfg.kl_coef
    bar = _progress(cfg.run.steps, f"{a.algo}", show_progress)
    if bar is not None:
        bar.update(start_step)
    step = start_step
    for step in range(start_step, cfg.run.steps):
        t0 = time.time()
        # every step is seeded from (seed, step, rank): a resumed run samples exactly what the
        # uninterrupted one did, whatever happened before (evaluation, a restart)
        seed_everything(derived_seed(cfg.run.seed, 2, step, rank))

        # 1. rollouts: this process's shard of the step's prompts, G samples each. Sampling is keyed by
        # the global row, so a row's tokens do not depend on which process generated it
        idx = shard(prompts_for_step(len(train_examples), step, prompts_per_step, cfg.run.seed), rank, world)
        examples = [train_examples[i] for i in idx for _ in range(G)]
        first_row = rank * local_rollouts
        with policy_weights(), acc.autocast():
            rollout = generate(policy_lm, tokenizer, [e.prompt for e in examples], max_new_tokens=r.max_new_tokens,
                               temperature=r.temperature, device=acc.device, seed=derived_seed(cfg.run.seed, 2, step),
                               row_keys=torch.arange(first_row, first_row + local_rollouts))

        # 2. clean rewards and per-token statistics of the shard under pi_old, pi_ref and the critic
        per_row = {"clean_reward": reward_fn(examples, rollout.completions).float().to(acc.device)}
        with torch.no_grad(), acc.autocast():
            per_row["old_logprobs"], _ = score(policy, rollout, temperature=r.temperature, compute_entropy=False)
            with reference_mode():
                ref_stats = reference_stats(ref, rollout, temperature=r.temperature)
            per_row.update(ref_logprobs=ref_stats.logprobs, ref_entropy=ref_stats.entropy,
                           ref_perplexity=ref_stats.perplexity)
            if has_critic:
                value_model.eval()  # V_old from the VIB mean (no sampling noise in the targets)
                per_row["old_values"] = value_model(rollout.input_ids, rollout.attention_mask,
                                                    response_mask=rollout.response_mask).values
                value_model.train()

        # 3. the global batch on every process: the same noise, advantages and mini-batches everywhere
        rollout, per_row = gather_rollout(acc, rollout, per_row, pad_token_id=tokenizer.pad_token_id)
        mask = rollout.action_mask
        old_logprobs, old_values = per_row["old_logprobs"], per_row.get("old_values")
        ref_stats = ReferenceStats(per_row["ref_logprobs"], per_row["ref_entropy"], per_row["ref_perplexity"])
        clean_reward = per_row["clean_reward"].cpu()
        noisy_reward = noise(clean_reward, rollout.completions).float()  # the learner only ever sees this
        noisy = noisy_reward.to(acc.device)

        # 4. advantages
        if has_critic:
            token_rewards = token_level_rewards(noisy, mask, old_logprobs, ref_stats.logprobs, kl_coef=kl_coef,
                                                kl_kind=a.kl_kind)
            advantages, returns = gae_advantages(token_rewards, old_values, mask, gamma=a.gamma, lam=a.lam,
                                                 whiten=a.whiten_advantages)
        else:
            advantages = grpo_advantages(noisy, mask, G)

        # 5. PPO epochs over global mini-batches: each process takes its slice of a mini-batch, split into
        # micro-batches that accumulate into one optimiser step; losses are token means over the
        # whole mini-batch (global_token_weight); the VIB noise is keyed by (global row, position)
        sums: Dict[str, float] = {}
        n_mini = 0
        grad_norms: Dict[str, List[float]] = {"policy_grad_norm": [], "value_grad_norm": []}
        positions = torch.arange(mask.shape[1], device=acc.device)
        for epoch in range(o.ppo_epochs):
            order = torch.randperm(r.rollout_batch_size,
                                   generator=torch.Generator().manual_seed(derived_seed(cfg.run.seed, 8, step, epoch)))
            for k, rows in enumerate(order.to(acc.device).split(o.mini_batch_size)):
                mini_tokens = mask[rows].sum().to(torch.float64)
                vib_seed = derived_seed(cfg.run.seed, 9, step, epoch, k)
                for micro in rows.view(world, -1)[rank].split(micro_size):
                    mb = rollout.select(micro)
                    m = mask[micro]
                    weight = global_token_weight(acc, m, mini_tokens, o.grad_accum_steps)
                    with acc.accumulate(*trained), acc.autocast():
                        logprobs, entropy = score(policy, mb, temperature=r.temperature)
                        if a.algo == "grpo":
                            loss_p, stats = grpo_policy_loss(logprobs, old_logprobs[micro], advantages[micro], m,
                                                             ref_stats.logprobs[micro], clip=a.clip, kl_coef=kl_coef,
                                                             entropy=entropy, entropy_coef=a.entropy_coef)
                        else:
                            loss_p, stats = policy_loss(logprobs, old_logprobs[micro], advantages[micro], m,
                                                        clip=a.clip, entropy=entropy, entropy_coef=a.entropy_coef)
                        losses = {"policy": loss_p}
                        loss = loss_p
                        if has_critic:
                            vrpo = a.algo == "vrpo"
                            out = value_model(mb.input_ids, mb.attention_mask, response_mask=mb.response_mask,
                                              seed=vib_seed, noise_ids=micro[:, None] * mask.shape[1] + positions)
                            loss_v, vstats = vrpo_value_loss(
                                out.values, old_values[micro], returns[micro], m,
                                kl=out.kl if vrpo else None,
                                ent_pred=out.ent_pred if vrpo else None, ent_target=ref_stats.entropy[micro],
                                nll_pred=out.nll_pred if vrpo else None, nll_target=ref_stats.nll[micro],
                                clip=a.value_clip, beta=a.beta, alpha_ent=a.alpha_ent, alpha_ppl=a.alpha_ppl,
                            )
                            stats.update(vstats)
                            losses["value"] = loss_v
                            loss = loss + loss_v
                        check_finite(losses, step + 1, acc, last_checkpoint)
                        acc.backward(loss * weight)
                        if acc.sync_gradients:
                            grad_norms["policy_grad_norm"].append(
                                float(acc.clip_grad_norm_(policy.parameters(), o.max_grad_norm)))
                            if has_critic:
                                grad_norms["value_grad_norm"].append(
                                    float(acc.clip_grad_norm_(value_model.parameters(), o.max_grad_norm)))
                        policy_opt.step()
                        policy_opt.zero_grad(set_to_none=True)
                        if has_critic:
                            value_opt.step()
                            value_opt.zero_grad(set_to_none=True)
                    # token means over the mini-batch, like the losses (summed over processes below)
                    share = float(weight) / (world * o.grad_accum_steps)
                    for name, v in stats.items():
                        if name not in ("explained_variance", "values_mean", "returns_mean"):  # from the rollout
                            sums[name] = sums.get(name, 0.0) + float(v) * share
                n_mini += 1
        policy_sched.step()
        if has_critic:
            value_sched.step()

        # 6. metrics: rollout statistics are global already; loss statistics are averaged over the
        # processes (one all-reduce for all of them)
        step_time = time.time() - t0
        local = {
            "clean_reward": clean_reward.mean(),
            "noisy_reward": noisy_reward.mean(),
            "kl_ref": masked_mean(old_logprobs - ref_stats.logprobs, mask),
            "ref_entropy": masked_mean(ref_stats.entropy, mask),
            "ref_perplexity": ref_stats.perplexity.mean(),
            "response_length": rollout.response_lengths.float().mean(),
            "tokens": rollout.attention_mask.sum(),
            **{k: v * world / max(n_mini, 1) for k, v in sums.items()},  # x world: the all-reduce averages
            **{k: sum(v) / len(v) for k, v in grad_norms.items() if v},
        }
        if has_critic:
            local["explained_variance"] = explained_variance(old_values, returns, mask)
            local["value_mean"] = masked_mean(old_values, mask)
        record = {"step": step + 1, **mean_over_processes(acc, local)}
        n_tokens = record.pop("tokens")
        record["lr"] = policy_sched.get_last_lr()[0]
        record["step_time_s"] = step_time
        record["tokens_per_s"] = n_tokens / max(step_time, 1e-9)
        if main:
            metrics.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(clean=f"{record['clean_reward']:.2f}", noisy=f"{record['noisy_reward']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.run.steps:
            last_checkpoint = save(step + 1)
    if bar is not None:
        bar.close()

    # ---- the end: checkpoint, held-out clean reward, curves ------------------------------------
    final_step = max(cfg.run.steps, start_step)
    if resume_from is None or final_step > start_step:
        last_checkpoint = save(final_step)
    after = evaluate(acc, policy_lm, tokenizer, reward_fn, eval_examples, cfg, weights=policy_weights)
    greedy_after = evaluate(acc, policy_lm, tokenizer, reward_fn, eval_examples, cfg, temperature=0.0,
                            weights=policy_weights) \
        if r.eval_greedy else None
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    summary = {
        "algo": a.algo,
        "task": cfg.task.task,
        "noise": {"type": cfg.task.noise_type, "rate": cfg.task.noise_rate, "std": cfg.task.noise_std},
        "seed": cfg.run.seed,
        "eval_clean_reward_before": warmup["eval_clean_reward_before"],
        "eval_clean_reward_after": after,
        "eval_greedy_reward_before": warmup.get("eval_greedy_reward_before"),
        "eval_greedy_reward_after": greedy_after,
        "eval_prompts": len(eval_examples),
        "eval_temperature": r.eval_temperature,
        "eval_samples": 1 if r.eval_temperature == 0 else r.eval_samples,
        "steps": final_step,
        "run_dir": run_dir,
        "metrics_path": metrics_path,
        "checkpoint": last_checkpoint,
        "wall_time_s": time.time() - t_start,
    }
    if main:
        recent = _recent_train_rewards(metrics_path)
        summary.update(recent)
        plot_curves(metrics_path, os.path.join(run_dir, "curves.png"),
                    title=f"{a.algo} on {cfg.task.task}, noise {cfg.task.noise_type}")
        ckpt.atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    acc.wait_for_everyone()
    return summary


def _recent_train_rewards(metrics_path: str, last: int = 10) -> Dict[str, float]:
    from .metrics import read_metrics

    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    tail = records[-last:]
    if not tail:
        return {}
    return {f"train_clean_reward_last{len(tail)}": sum(x["clean_reward"] for x in tail) / len(tail),
            f"train_noisy_reward_last{len(tail)}": sum(x["noisy_reward"] for x in tail) / len(tail)}


def _lora_checkpoint(policy_lm, value_model) -> Dict[str, Any]:
    """What a LoRA run trains (policy adapters; critic adapters and heads): enough to resume on the base."""
    from .models.lora import lora_state_dict

    out = {"policy": lora_state_dict(policy_lm)}
    if value_model is not None:
        out["value_adapters"] = lora_state_dict(value_model.backbone)
        out["value_heads"] = {k: v.detach().cpu().clone() for k, v in value_model.head_state_dict().items()}
    return out


def _load_heads(value_model, heads: Dict[str, torch.Tensor]) -> None:
    missing, unexpected = value_model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"the checkpoint's value heads do not fit the critic: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written with other --latent-dim / --algo?)")


def _plain_model(model):
    """``model`` with its LoRA adapters merged in and removed (a copy), for saving and for the critic."""
    from .models.lora import merged_copy

    return merged_copy(model)


def _load_tok(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _read_json(path: str) -> Dict[str, Any]:
    import json

    with open(path) as f:
        return json.load(f)
