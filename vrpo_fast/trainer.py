"""The RL loop. :func:`rl_step` is the method (``../shared/METHOD.md``), top to bottom:

    1. rollout: sample completions for this step's prompts                  (rollout.generate)
    2. clean reward from the task (measured only; the learner never sees it)
    3. log pi_old; the frozen reference's log-probs, entropy and surprisal; V_old (z = mu)
    4. noise: the reward the learner sees = noise(clean reward)
    5. advantages: vrpo/ppo: token rewards (noisy reward at the end - kl_coef * KL) -> GAE on V_old;
                   grpo: group-normalised noisy rewards
    6. PPO epochs over mini-batches: clipped policy loss (+ clipped value loss + beta * VIB KL + aux)
    7. metrics

Everything else -- the task, models (plain / LoRA / FSDP2 / resumed), the supervised warm-up,
optimisers, checkpoints -- is set up by :mod:`vrpo_fast.setup_run`; the run directory (lock, one
configuration per run) by :mod:`vrpo_fast.run_dir`.

``accelerate`` places models, runs autocast, accumulates gradients and wraps the trained modules in
DDP, so ``accelerate launch -m vrpo_fast.train`` trains data-parallel with no change: every process
samples and scores its own shard of the step's prompts, the shards are gathered
(:mod:`vrpo_fast.distributed`) so that noise, advantages and mini-batches are those of the global
batch, each process trains on its slice of every mini-batch, and only the main process writes files.
Sampling and the VIB noise are keyed by global row, and losses are token means over the whole
mini-batch, so N processes match one process with the same global batch up to rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import torch

from vrpo_fast.algorithms.advantages import gae_advantages, grpo_advantages, token_level_rewards
from vrpo_fast.algorithms.losses import explained_variance, grpo_policy_loss, policy_loss, vrpo_value_loss
from vrpo_fast.ops import masked_mean

from . import evaluation
from .config import TrainConfig
from .distributed import (check_distributed_support, gather_rollout, global_token_weight, is_sharded,
                          mean_over_processes, requested_processes)
from .errors import NonFiniteLossError, TrainingInterrupted
from .metrics import MetricsWriter, plot_curves, read_metrics
from .rollout import Rollout, generate
from .run_dir import open_run_directory
from .scoring import ReferenceStats, reference_stats, score
from .seeding import derived_seed, progress_bar, prompts_for_step, seed_everything, shard
from .setup_run import REFERENCE_DIR, WARMUP_FILE, Run, save_run_checkpoint, setup_run  # noqa: F401 (re-exported)
from .checkpoint import atomic_write_json

logger = logging.getLogger("vrpo_fast")
evaluate = evaluation.evaluate  # re-exported

# statistics of the rollout, not of a mini-batch: averaged over processes once, not per micro-batch
_ROLLOUT_STATS = ("explained_variance", "values_mean", "returns_mean")


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
    # step_scheduler_with_optimizer=False: the LR schedules step once per RL step; accelerate's default
    # steps a prepared scheduler once per process, decaying N times too fast on N processes
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                       step_scheduler_with_optimizer=False)


@dataclasses.dataclass
class Batch:
    """One RL step's global batch: rollouts and everything computed from them before the updates."""

    rollout: Rollout
    clean_reward: torch.Tensor      # [B] the task's reward: measured, never seen by the learner
    noisy_reward: torch.Tensor      # [B] what the learner sees
    old_logprobs: torch.Tensor      # [B, T] log pi_old
    ref: ReferenceStats             # [B, T] the frozen reference's log-probs, entropy, surprisal
    old_values: Optional[torch.Tensor] = None   # [B, T] V_old (z = mu), vrpo / ppo
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.action_mask


# ----------------------------------------------------------------------------------------------
# the RL step
# ----------------------------------------------------------------------------------------------
def rl_step(run: Run, step: int) -> Dict[str, Any]:
    """One RL step (0-based ``step``); returns its metrics record."""
    cfg, acc = run.cfg, run.acc
    t0 = time.time()
    # every step is seeded from (seed, step, rank): a resumed run samples exactly what the
    # uninterrupted one did, whatever happened before (evaluation, a restart)
    seed_everything(derived_seed(cfg.run.seed, 2, step, acc.process_index))

    examples, rollout = sample_rollouts(run, step)                                   # 1. rollout
    clean = run.reward_fn(examples, rollout.completions).float().to(acc.device)      # 2. clean reward
    per_row = {"clean_reward": clean, **score_rollout(run, rollout)}                 # 3. pi_old, ref, V_old
    rollout, per_row = gather_rollout(acc, rollout, per_row, pad_token_id=run.tokenizer.pad_token_id)
    clean = per_row["clean_reward"].cpu()
    noisy = run.noise(clean, rollout.completions).float()                            # 4. noise
    batch = Batch(rollout, clean, noisy, per_row["old_logprobs"],
                  ReferenceStats(per_row["ref_logprobs"], per_row["ref_entropy"], per_row["ref_perplexity"]),
                  per_row.get("old_values"))
    batch.advantages, batch.returns = compute_advantages(run, batch)                 # 5. advantages
    stats = ppo_update(run, step, batch)                                             # 6. updates
    run.policy_sched.step()
    if run.has_critic:
        run.value_sched.step()
    return step_record(run, step, batch, stats, time.time() - t0)                    # 7. metrics


def sample_rollouts(run: Run, step: int):
    """This process's shard of the step's prompts, G samples each. Sampling is keyed by the global row,
    so a row's tokens do not depend on which process generated it."""
    cfg, acc, r = run.cfg, run.acc, run.cfg.rollout
    G, world, rank = cfg.samples_per_prompt, acc.num_processes, acc.process_index
    idx = shard(prompts_for_step(len(run.train_examples), step, r.rollout_batch_size // G, cfg.run.seed), rank, world)
    examples = [run.train_examples[i] for i in idx for _ in range(G)]
    local = r.rollout_batch_size // world
    with run.policy_weights(), acc.autocast():
        rollout = generate(run.policy_lm, run.tokenizer, [e.prompt for e in examples], max_new_tokens=r.max_new_tokens,
                           temperature=r.temperature, device=acc.device, seed=derived_seed(cfg.run.seed, 2, step),
                           row_keys=torch.arange(rank * local, (rank + 1) * local))
    return examples, rollout


@torch.no_grad()
def score_rollout(run: Run, rollout: Rollout) -> Dict[str, torch.Tensor]:
    """log pi_old, the reference's statistics and (vrpo / ppo) V_old from the VIB mean."""
    acc, T = run.acc, run.cfg.rollout.temperature
    out = {}
    with acc.autocast():
        out["old_logprobs"], _ = score(run.policy, rollout, temperature=T, compute_entropy=False)
        with run.reference_mode():
            ref = reference_stats(run.ref, rollout, temperature=T)
        out.update(ref_logprobs=ref.logprobs, ref_entropy=ref.entropy, ref_perplexity=ref.perplexity)
        if run.has_critic:
            run.value_model.eval()  # V_old from z = mu: no sampling noise in the targets
            out["old_values"] = run.value_model(rollout.input_ids, rollout.attention_mask,
                                                response_mask=rollout.response_mask).values
            run.value_model.train()
    return out


def compute_advantages(run: Run, batch: Batch):
    """(advantages, returns): GAE on V_old over KL-shaped token rewards, or GRPO's group advantages."""
    a, noisy = run.cfg.algo, batch.noisy_reward.to(run.acc.device)
    if not run.has_critic:
        return grpo_advantages(noisy, batch.mask, run.cfg.samples_per_prompt), None
    token_rewards = token_level_rewards(noisy, batch.mask, batch.old_logprobs, batch.ref.logprobs,
                                        kl_coef=run.cfg.kl_coef, kl_kind=a.kl_kind)
    return gae_advantages(token_rewards, batch.old_values, batch.mask, gamma=a.gamma, lam=a.lam,
                          whiten=a.whiten_advantages)


def ppo_update(run: Run, step: int, batch: Batch) -> Dict[str, float]:
    """PPO epochs over global mini-batches. Each process takes its slice of a mini-batch, split into
    micro-batches that accumulate into one optimiser step; losses are token means over the whole
    mini-batch (global_token_weight); the VIB noise is keyed by (global row, position)."""
    cfg, acc, o = run.cfg, run.acc, run.cfg.optim
    world, rank = acc.num_processes, acc.process_index
    micro_size = o.mini_batch_size // world // o.grad_accum_steps
    sums: Dict[str, float] = {}
    norms: Dict[str, List[float]] = {"policy_grad_norm": [], "value_grad_norm": []}
    n_mini = 0
    for epoch in range(o.ppo_epochs):
        order = torch.randperm(cfg.rollout.rollout_batch_size,
                               generator=torch.Generator().manual_seed(derived_seed(cfg.run.seed, 8, step, epoch)))
        for k, rows in enumerate(order.to(acc.device).split(o.mini_batch_size)):
            mini_tokens = batch.mask[rows].sum().to(torch.float64)
            vib_seed = derived_seed(cfg.run.seed, 9, step, epoch, k)
            for micro in rows.view(world, -1)[rank].split(micro_size):
                weight = global_token_weight(acc, batch.mask[micro], mini_tokens, o.grad_accum_steps)
                with acc.accumulate(*run.trained), acc.autocast():
                    losses, stats = micro_losses(run, batch, micro, vib_seed)
                    check_finite(losses, step + 1, acc, run.last_checkpoint)
                    acc.backward(sum(losses.values()) * weight)
                    optimizer_step(run, step, norms)
                share = float(weight) / (world * o.grad_accum_steps)  # token means, summed over processes below
                for name, v in stats.items():
                    if name not in _ROLLOUT_STATS:
                        sums[name] = sums.get(name, 0.0) + float(v) * share
            n_mini += 1
    out = {k: v * world / max(n_mini, 1) for k, v in sums.items()}  # x world: the all-reduce averages
    out.update({k: sum(v) / len(v) for k, v in norms.items() if v})
    return out


def micro_losses(run: Run, batch: Batch, micro: torch.Tensor, vib_seed: int):
    """({"policy": ..., "value": ...}, stats) on the rows ``micro`` of the batch."""
    a = run.cfg.algo
    mb, m = batch.rollout.select(micro), batch.mask[micro]
    logprobs, entropy = score(run.policy, mb, temperature=run.cfg.rollout.temperature)
    if a.algo == "grpo":
        loss_p, stats = grpo_policy_loss(logprobs, batch.old_logprobs[micro], batch.advantages[micro], m,
                                         batch.ref.logprobs[micro], clip=a.clip, kl_coef=run.cfg.kl_coef,
                                         entropy=entropy, entropy_coef=a.entropy_coef)
    else:
        loss_p, stats = policy_loss(logprobs, batch.old_logprobs[micro], batch.advantages[micro], m,
                                    clip=a.clip, entropy=entropy, entropy_coef=a.entropy_coef)
    losses = {"policy": loss_p}
    if run.has_critic:
        vrpo = a.algo == "vrpo"
        positions = torch.arange(m.shape[1], device=m.device)
        out = run.value_model(mb.input_ids, mb.attention_mask, response_mask=mb.response_mask, seed=vib_seed,
                              noise_ids=micro[:, None] * batch.mask.shape[1] + positions)
        losses["value"], vstats = vrpo_value_loss(
            out.values, batch.old_values[micro], batch.returns[micro], m,
            kl=out.kl if vrpo else None,
            ent_pred=out.ent_pred if vrpo else None, ent_target=batch.ref.entropy[micro],
            nll_pred=out.nll_pred if vrpo else None, nll_target=batch.ref.nll[micro],
            clip=a.value_clip, beta=a.beta, alpha_ent=a.alpha_ent, alpha_ppl=a.alpha_ppl,
        )
        stats.update(vstats)
    return losses, stats


def check_finite(losses: Dict[str, torch.Tensor], step: int, accelerator, last_checkpoint: Optional[str]) -> None:
    """Stop (on every process together) before the backward of a non-finite loss."""
    bad = {name: float(v.detach()) for name, v in losses.items() if not torch.isfinite(v.detach()).all()}
    if accelerator.num_processes > 1:
        # every process must stop together, or the others would wait forever in the next all-reduce
        flag = torch.tensor([float(bool(bad))], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0 and not bad:
            raise NonFiniteLossError("(another process's)", step, math.nan, last_checkpoint)
    if bad:
        name, value = next(iter(bad.items()))
        raise NonFiniteLossError(name, step, value, last_checkpoint)


def optimizer_step(run: Run, step: int, norms: Dict[str, List[float]]) -> None:
    """Clip and step each trained model once its gradients are accumulated, never on a non-finite
    gradient norm (the same on every process: it is computed from the all-reduced gradients)."""
    acc, o = run.acc, run.cfg.optim
    models = [("policy", run.policy, run.policy_opt)]
    if run.has_critic:
        models.append(("value", run.value_model, run.value_opt))
    if acc.sync_gradients:
        for name, model, _ in models:
            norm = float(acc.clip_grad_norm_(model.parameters(), o.max_grad_norm))
            if not math.isfinite(norm):
                raise NonFiniteLossError(name, step + 1, norm, run.last_checkpoint, quantity="gradient norm")
            norms[f"{name}_grad_norm"].append(norm)
    for _, _, opt in models:
        opt.step()  # a no-op until the last micro-batch of the mini-batch (accelerate's accumulation)
        opt.zero_grad(set_to_none=True)


def step_record(run: Run, step: int, batch: Batch, stats: Dict[str, float], step_time: float) -> Dict[str, Any]:
    """The step's metrics: rollout statistics (global already) and update statistics, averaged over
    the processes in one all-reduce."""
    acc, mask, rollout = run.acc, batch.mask, batch.rollout
    local = {
        "clean_reward": batch.clean_reward.mean(),
        "noisy_reward": batch.noisy_reward.mean(),
        "kl_ref": masked_mean(batch.old_logprobs - batch.ref.logprobs, mask),
        "ref_entropy": masked_mean(batch.ref.entropy, mask),
        "ref_perplexity": batch.ref.perplexity.mean(),
        "response_length": rollout.response_lengths.float().mean(),
        "tokens": rollout.attention_mask.sum(),
        **stats,
    }
    if run.has_critic:
        local["explained_variance"] = explained_variance(batch.old_values, batch.returns, mask)
        local["value_mean"] = masked_mean(batch.old_values, mask)
    record = {"step": step + 1, **mean_over_processes(acc, local)}
    n_tokens = record.pop("tokens")
    record["lr"] = run.policy_sched.get_last_lr()[0]
    record["step_time_s"] = step_time
    record["tokens_per_s"] = n_tokens / max(step_time, 1e-9)
    return record


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, accelerator=None) -> Dict[str, Any]:
    """Train as configured; returns a summary (see the README). Only the main process writes files.

    Summary keys: ``eval_clean_reward_before`` / ``eval_clean_reward_after`` (held-out, noise-free),
    ``steps``, ``run_dir``, ``metrics_path``, ``checkpoint``, ``wall_time_s``, the train rewards of the
    last steps, and the run's algo / task / noise / seed. Raises :class:`TrainingInterrupted` on
    SIGINT / SIGTERM and :class:`NonFiniteLossError` before applying a non-finite update.
    """
    threads = torch.get_num_threads()
    try:
        with _signals_raise():
            return _run_training(cfg, accelerator)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM raises like Ctrl-C (KeyboardInterrupt), remembering which signal it was."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


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
    run_dir = open_run_directory(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    run, step = None, 0
    try:
        for note in run_dir.notes:
            print(f"[vrpo_fast] {note}", flush=True)
        seed_everything(derived_seed(cfg.run.seed, 1, acc.process_index))
        if acc.device.type == "cpu" and (cfg.model.num_threads or cfg.model.model is None):
            torch.set_num_threads(cfg.model.num_threads or 1)
        run = setup_run(cfg, acc, run_dir)
        step = run.start_step
        metrics = MetricsWriter(run_dir.file("metrics.jsonl"), resume_step=step if cfg.run.resume else None) \
            if acc.is_main_process else None
        bar = progress_bar(cfg.run.steps, cfg.algo.algo, cfg.run.progress and acc.is_main_process)
        if bar is not None:
            bar.update(step)
        for step in range(run.start_step, cfg.run.steps):
            record = rl_step(run, step)
            if metrics is not None:
                metrics.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(clean=f"{record['clean_reward']:.2f}", noisy=f"{record['noisy_reward']:.2f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.run.steps:
                save_run_checkpoint(run, step + 1)
        if bar is not None:
            bar.close()
        final_step = max(cfg.run.steps, run.start_step)
        if run.start_step == 0 or final_step > run.start_step:
            save_run_checkpoint(run, final_step)
        return finish(run, final_step, t_start)
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(getattr(err, "signum", signal.SIGINT), step + 1,
                                  run.last_checkpoint if run is not None else None) from None
    finally:
        run_dir.close(failed_setup=run is None)


def finish(run: Run, final_step: int, t_start: float) -> Dict[str, Any]:
    """Held-out clean reward after RL, curves and ``summary.json``."""
    cfg, acc, r = run.cfg, run.acc, run.cfg.rollout
    after = evaluation.evaluate(acc, run.policy_lm, run.tokenizer, run.reward_fn, run.eval_examples, cfg,
                                weights=run.policy_weights)
    greedy_after = evaluation.evaluate(acc, run.policy_lm, run.tokenizer, run.reward_fn, run.eval_examples, cfg,
                                       temperature=0.0, weights=run.policy_weights) if r.eval_greedy else None
    metrics_path = run.dir.file("metrics.jsonl")
    summary = {
        "algo": cfg.algo.algo,
        "task": cfg.task.task,
        "noise": {"type": cfg.task.noise_type, "rate": cfg.task.noise_rate, "std": cfg.task.noise_std},
        "seed": cfg.run.seed,
        "eval_clean_reward_before": run.warmup["eval_clean_reward_before"],
        "eval_clean_reward_after": after,
        "eval_greedy_reward_before": run.warmup.get("eval_greedy_reward_before"),
        "eval_greedy_reward_after": greedy_after,
        "eval_prompts": len(run.eval_examples),
        "eval_temperature": r.eval_temperature,
        "eval_samples": 1 if r.eval_temperature == 0 else r.eval_samples,
        "steps": final_step,
        "run_dir": run.dir.path,
        "metrics_path": metrics_path,
        "checkpoint": run.last_checkpoint,
        "wall_time_s": time.time() - t_start,
    }
    if acc.is_main_process:
        summary.update(_recent_train_rewards(metrics_path))
        plot_curves(metrics_path, run.dir.file("curves.png"),
                    title=f"{cfg.algo.algo} on {cfg.task.task}, noise {cfg.task.noise_type}")
        atomic_write_json(run.dir.file("summary.json"), summary)
    acc.wait_for_everyone()
    return summary


def _recent_train_rewards(metrics_path: str, last: int = 10) -> Dict[str, float]:
    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    tail = records[-last:]
    if not tail:
        return {}
    return {f"train_clean_reward_last{len(tail)}": sum(x["clean_reward"] for x in tail) / len(tail),
            f"train_noisy_reward_last{len(tail)}": sum(x["noisy_reward"] for x in tail) / len(tail)}
