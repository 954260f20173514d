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
from vrpo_fast.algorithms.diagnostics import (advantage_diagnostics, first_state, last_state, regression_slope,
                                              value_reward_corr)
from vrpo_fast.algorithms.losses import (aux_regression_loss, aux_token_weights, explained_variance, grpo_policy_loss,
                                         policy_loss, value_loss, vrpo_value_loss)
from vrpo_fast.ops import masked_mean

from .config import TrainConfig
from .distributed import (check_distributed_support, gather_rollout, global_token_weight, mean_over_processes,
                          requested_processes)
from .errors import NonFiniteLossError, TrainingInterrupted
from .metrics import MetricsWriter, plot_curves, read_metrics
from .rollout import Rollout, generate
from .run_dir import open_run_directory
from .scoring import ReferenceStats, reference_stats, score
from .seeding import derived_seed, progress_bar, prompts_for_step, seed_everything, shard
from .setup_run import Run, held_out_rewards, save_run_checkpoint, setup_run
from .checkpoint import atomic_write_json

logger = logging.getLogger("vrpo_fast")

# statistics of the rollout, not of a mini-batch: averaged over processes once, not per micro-batch
_ROLLOUT_STATS = ("explained_variance", "values_mean", "returns_mean")


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    m = cfg.model
    cpu = m.cpu or not torch.cuda.is_available()
    precision = m.mixed_precision
    if precision is None:
        if not cpu:
            precision = "bf16"
        elif m.model is not None:  # a real model on CPU: bf16 where this CPU multiplies it natively and fast
            from .precision import choose_cpu_mixed_precision

            choice = choose_cpu_mixed_precision()
            precision = choice.mixed_precision
            logger.info("--mixed-precision on CPU: %s (%s)", precision, choice.reason)
        else:
            precision = "no"  # the embedded tiny model: its ops are too small for autocast to pay
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
    aux: Dict[str, Optional[torch.Tensor]] = dataclasses.field(default_factory=dict)  # critic targets, weights
    values_after: Optional[torch.Tensor] = None  # [B] last-state value (z = mu) in the last PPO epoch

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

    # 1-4. rollouts, their clean reward, log pi_old / the reference's statistics / V_old, the noisy reward
    batch = collect_batch(run, step)
    # 5. advantages from the noisy reward; the frozen LM's entropy / surprisal for the critic
    batch.advantages, batch.returns = compute_advantages(run, batch, batch.noisy_reward)
    batch.aux = critic_targets(run, batch)
    # 6. PPO updates of the policy and the critic
    stats = ppo_update(run, step, batch)
    run.policy_sched.step()
    if run.has_critic:
        run.value_sched.step()
    # 7. metrics, with the diagnostics of how much noise the critic let through (they use the clean reward)
    t_diag = time.time()
    stats.update(diagnostics(run, step, batch))
    stats["diagnostics_time_s"] = time.time() - t_diag
    return step_record(run, step, batch, stats, time.time() - t0)


def sample_rollouts(run: Run, step: int, stream: int = 2):
    """This process's shard of the step's prompts, G samples each. Sampling is keyed by the global row,
    so a row's tokens do not depend on which process generated it. ``stream`` keys the prompt order and
    the sampling (2: RL steps; the critic warm-up draws its own)."""
    cfg, acc, r = run.cfg, run.acc, run.cfg.rollout
    G, world, rank = cfg.samples_per_prompt, acc.num_processes, acc.process_index
    order_seed = cfg.run.seed if stream == 2 else derived_seed(cfg.run.seed, stream)
    idx = shard(prompts_for_step(len(run.train_examples), step, r.rollout_batch_size // G, order_seed), rank, world)
    examples = [run.train_examples[i] for i in idx for _ in range(G)]
    local = r.rollout_batch_size // world
    with run.policy_weights(), acc.autocast():
        rollout = generate(run.policy_lm, run.tokenizer, [e.prompt for e in examples], max_new_tokens=r.max_new_tokens,
                           temperature=r.temperature, device=acc.device, seed=derived_seed(cfg.run.seed, stream, step),
                           row_keys=torch.arange(rank * local, (rank + 1) * local))
    return examples, rollout


def collect_batch(run: Run, step: int, stream: int = 2) -> Batch:
    """Steps 1-4 of the method: rollouts, clean reward, pi_old / reference statistics / V_old, noise."""
    acc = run.acc
    examples, rollout = sample_rollouts(run, step, stream)                           # 1. rollout
    clean = run.reward_fn(examples, rollout.completions).float().to(acc.device)      # 2. clean reward
    per_row = {"clean_reward": clean, **score_rollout(run, rollout)}                 # 3. pi_old, ref, V_old
    rollout, per_row = gather_rollout(acc, rollout, per_row, pad_token_id=run.tokenizer.pad_token_id)
    clean = per_row["clean_reward"].cpu()
    noisy = run.noise(clean, rollout.completions).float()                            # 4. noise
    return Batch(rollout, clean, noisy, per_row["old_logprobs"],
                 ReferenceStats(per_row["ref_logprobs"], per_row["ref_entropy"], per_row["ref_perplexity"]),
                 per_row.get("old_values"))


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


def compute_advantages(run: Run, batch: Batch, reward: torch.Tensor):
    """(advantages, returns) from a sequence reward: GAE on V_old over KL-shaped token rewards, or
    GRPO's group advantages. The learner's are from the noisy reward; the diagnostics recompute them
    from the clean one with the same values and KL terms."""
    a, reward = run.cfg.algo, reward.to(run.acc.device)
    if not run.has_critic:
        return grpo_advantages(reward, batch.mask, run.cfg.samples_per_prompt), None
    token_rewards = token_level_rewards(reward, batch.mask, batch.old_logprobs, batch.ref.logprobs,
                                        kl_coef=run.cfg.kl_coef, kl_kind=a.kl_kind)
    return gae_advantages(token_rewards, batch.old_values, batch.mask, gamma=a.gamma, lam=a.lam,
                          whiten=a.whiten_advantages)


def critic_targets(run: Run, batch: Batch) -> Dict[str, Optional[torch.Tensor]]:
    """What VRPO's critic is given from the frozen LM: regression targets at each state (entropy H_t,
    the surprisal of the token just read or the read prefix's log-perplexity) and/or value-loss token
    weights ``n * softmax(signal / T)`` over each response (mean 1)."""
    cfg, a, mask = run.cfg, run.cfg.algo, batch.mask
    out: Dict[str, Optional[torch.Tensor]] = {"ent_target": batch.ref.entropy, "nll_target": None, "nll_mask": None,
                                              "token_weights": None}
    surprisal, surprisal_mask = batch.ref.surprisal(mask)  # 0 where undefined (nothing scored there)
    if a.ppl_target == "sequence":
        out["nll_target"], out["nll_mask"] = batch.ref.sequence_surprisal(mask)
    else:
        out["nll_target"], out["nll_mask"] = surprisal, surprisal_mask
    if cfg.uses_aux_weights:
        signal = {"entropy": batch.ref.entropy, "surprisal": surprisal,
                  "sum": batch.ref.entropy + surprisal}[a.aux_weight_signal]
        out["token_weights"] = aux_token_weights(signal, mask, a.aux_weight_temperature)
    return out


def ppo_update(run: Run, step: int, batch: Batch, train_policy: bool = True) -> Dict[str, float]:
    """PPO epochs over global mini-batches. Each process takes its slice of a mini-batch, split into
    micro-batches that accumulate into one optimiser step; losses are token means over the whole
    mini-batch (global_token_weight); the VIB noise is keyed by (global row, position).
    ``train_policy=False``: value-only updates (the critic warm-up)."""
    cfg, acc, o = run.cfg, run.acc, run.cfg.optim
    world, rank = acc.num_processes, acc.process_index
    micro_size = o.mini_batch_size // world // o.grad_accum_steps
    sums: Dict[str, float] = {}
    norms: Dict[str, List[float]] = {"policy_grad_norm": [], "value_grad_norm": []}
    after = torch.zeros(batch.mask.shape[0], dtype=torch.float64, device=acc.device)
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
                    losses, stats, values_mean = micro_losses(run, batch, micro, vib_seed, train_policy)
                    check_finite(losses, step + 1, acc, run.last_checkpoint)
                    acc.backward(sum(losses.values()) * weight)
                    optimizer_step(run, step, norms, train_policy)
                if values_mean is not None and epoch == o.ppo_epochs - 1:
                    after[micro] = last_state(values_mean, batch.mask[micro]).to(after.device)
                share = float(weight) / (world * o.grad_accum_steps)  # token means, summed over processes below
                for name, v in stats.items():
                    if name not in _ROLLOUT_STATS:
                        sums[name] = sums.get(name, 0.0) + float(v) * share
            n_mini += 1
    if run.has_critic:  # every process filled its rows: the sum is the global [B] vector
        batch.values_after = acc.reduce(after, reduction="sum") if world > 1 else after
    out = {k: v * world / max(n_mini, 1) for k, v in sums.items()}  # x world: the all-reduce averages
    out.update({k: sum(v) / len(v) for k, v in norms.items() if v})
    return out


def micro_losses(run: Run, batch: Batch, micro: torch.Tensor, vib_seed: int, train_policy: bool = True):
    """({"policy": ..., "value": ...}, stats, values at z = mu) on the rows ``micro`` of the batch."""
    a = run.cfg.algo
    mb, m = batch.rollout.select(micro), batch.mask[micro]
    losses, stats, values_mean = {}, {}, None
    if train_policy:
        logprobs, entropy = score(run.policy, mb, temperature=run.cfg.rollout.temperature)
        if a.algo == "grpo":
            losses["policy"], stats = grpo_policy_loss(logprobs, batch.old_logprobs[micro], batch.advantages[micro], m,
                                                       batch.ref.logprobs[micro], clip=a.clip, kl_coef=run.cfg.kl_coef,
                                                       entropy=entropy, entropy_coef=a.entropy_coef)
        else:
            losses["policy"], stats = policy_loss(logprobs, batch.old_logprobs[micro], batch.advantages[micro], m,
                                                  clip=a.clip, entropy=entropy, entropy_coef=a.entropy_coef)
    if run.has_critic:
        losses["value"], vstats, values_mean = critic_loss(run, batch, micro, mb, vib_seed)
        stats.update(vstats)
    return losses, stats, values_mean


def critic_loss(run: Run, batch: Batch, micro: torch.Tensor, mb: Rollout, vib_seed: int):
    """The critic's loss on rows ``micro`` (``mb``: those rows of the rollout): clipped value loss (V and
    V_old compared at z = mu) + beta * VIB KL + the auxiliary terms (vrpo); plain clipped value loss (ppo)."""
    a, aux = run.cfg.algo, batch.aux
    m, T = batch.mask[micro], batch.mask.shape[1]
    out = run.value_model(mb.input_ids, mb.attention_mask, response_mask=mb.response_mask, seed=vib_seed,
                          noise_ids=micro[:, None] * T + torch.arange(T, device=m.device))
    vrpo = a.algo == "vrpo"
    weights = aux.get("token_weights")
    nll_mask = aux.get("nll_mask")
    loss, stats = vrpo_value_loss(
        out.values, batch.old_values[micro], batch.returns[micro], m,
        kl=out.kl if vrpo else None,
        ent_pred=out.ent_pred if vrpo else None, ent_target=aux["ent_target"][micro],
        nll_pred=out.nll_pred if vrpo else None, nll_target=aux["nll_target"][micro],
        nll_mask=None if nll_mask is None else nll_mask[micro],
        clip=a.value_clip, beta=a.beta, alpha_ent=a.alpha_ent, alpha_ppl=a.alpha_ppl,
        values_mean=out.values_mean, token_weights=None if weights is None else weights[micro],
    )
    return loss, stats, out.values_mean.detach()


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


def optimizer_step(run: Run, step: int, norms: Dict[str, List[float]], train_policy: bool = True) -> None:
    """Clip and step each trained model once its gradients are accumulated, never on a non-finite
    gradient norm (the same on every process: it is computed from the all-reduced gradients)."""
    acc, o = run.acc, run.cfg.optim
    models = [("policy", run.policy, run.policy_opt)] if train_policy else []
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


# ----------------------------------------------------------------------------------------------
# diagnostics: does the critic absorb the reward noise? (the learner never sees the clean reward)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def diagnostics(run: Run, step: int, batch: Batch) -> Dict[str, float]:
    """adv_clean_corr / adv_noise_frac (all algorithms); value_clean_corr / value_noisy_corr /
    value_noise_slope (critics); aux_value_grad_ratio every ``--diagnostics-every`` steps (vrpo)."""
    mask = batch.mask
    clean_adv, _ = compute_advantages(run, batch, batch.clean_reward)
    out = advantage_diagnostics(batch.advantages, clean_adv, mask)
    if not run.has_critic:
        return out
    first = first_state(batch.old_values, mask)
    out["value_clean_corr"] = value_reward_corr(first, batch.clean_reward)
    out["value_noisy_corr"] = value_reward_corr(first, batch.noisy_reward)
    if batch.values_after is not None:
        delta = batch.values_after - last_state(batch.old_values, mask)
        out["value_noise_slope"] = regression_slope(delta, batch.noisy_reward - batch.clean_reward)
    every = run.cfg.run.diagnostics_every
    if run.cfg.uses_aux_regression and every and step % every == 0:
        with torch.enable_grad():
            out["aux_value_grad_ratio"] = aux_value_grad_ratio(run, batch)
    return out


def aux_value_grad_ratio(run: Run, batch: Batch) -> float:
    """||d(aux losses)/d backbone|| / ||d(value loss)/d backbone|| on the first micro-batch (unwrapped
    model, no optimiser step): how much the auxiliary heads pull on the critic's features."""
    model = run.acc.unwrap_model(run.value_model)
    a, aux = run.cfg.algo, batch.aux
    # the same few rows on every process and for every process count (so N processes log what one does)
    micro = torch.arange(min(batch.mask.shape[0], 8), device=batch.mask.device)
    mb, m = batch.rollout.select(micro), batch.mask[micro]
    with run.acc.autocast():
        out = model(mb.input_ids, mb.attention_mask, response_mask=mb.response_mask, seed=0)
    value, _ = value_loss(out.values, batch.old_values[micro], batch.returns[micro], m, clip=a.value_clip,
                          values_mean=out.values_mean)
    nll_mask = aux["nll_mask"][micro]
    aux_loss = a.alpha_ent * aux_regression_loss(out.ent_pred, aux["ent_target"][micro], m) + \
        a.alpha_ppl * aux_regression_loss(out.nll_pred, aux["nll_target"][micro], nll_mask)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    g_value = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(aux_loss, params, allow_unused=True)

    def norm(grads):
        return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))

    denom = norm(g_value)
    return norm(g_aux) / denom if denom > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# critic warm-up
# ----------------------------------------------------------------------------------------------
def critic_warmup(run: Run) -> Dict[str, Any]:
    """``--critic-warmup-steps`` value-only updates (vrpo and ppo alike) on rollouts of the warmed-up
    policy with the noisy reward, before the first policy update, so that the first advantages come
    from a critic that has learnt something. Its rollouts use their own prompt order and sampling keys."""
    steps = run.cfg.optim.critic_warmup_steps
    history = []
    for k in range(steps):
        seed_everything(derived_seed(run.cfg.run.seed, 14, k, run.acc.process_index))
        batch = collect_batch(run, k, stream=13)
        batch.advantages, batch.returns = compute_advantages(run, batch, batch.noisy_reward)
        batch.aux = critic_targets(run, batch)
        try:
            stats = ppo_update(run, -1 - k, batch, train_policy=False)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(err.loss_name, k + 1, err.value, err.last_checkpoint, quantity=err.quantity,
                                     phase="critic warm-up step") from None
        run.value_sched.step()
        history.append({"step": k + 1, "value_mean": float(masked_mean(batch.old_values, batch.mask)),
                        "noisy_return_mean": float(masked_mean(batch.returns, batch.mask)),
                        "explained_variance": explained_variance(batch.old_values, batch.returns, batch.mask),
                        **mean_over_processes(run.acc, {k2: v for k2, v in stats.items()
                                                        if k2 in ("value_loss", "vib_kl", "critic_loss")})})
    return {"critic_warmup_steps": steps, "history": history}


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
        local["return_mean"] = masked_mean(batch.returns, mask)
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
    cfg = cfg.resolved()  # the task's own defaults where an option is unset
    if cfg.model.mixed_precision is None and cfg.model.model is not None and acc.device.type == "cpu":
        # recorded: a --resume on a CPU that would choose otherwise is refused, not silently switched
        cfg = cfg.replace(mixed_precision=acc.mixed_precision)
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
        if run.has_critic and cfg.optim.critic_warmup_steps and run.last_checkpoint is None:
            report = critic_warmup(run)
            save_run_checkpoint(run, 0, extra={"critic_warmup": report})  # a resume never redoes it
            if acc.is_main_process:
                last = report["history"][-1]
                print(f"[vrpo_fast] critic warm-up: {report['critic_warmup_steps']} value-only steps; value mean "
                      f"{last['value_mean']:.3f} vs noisy return mean {last['noisy_return_mean']:.3f} (explained "
                      f"variance {last['explained_variance']:.2f})", flush=True)
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
    after, greedy_after = held_out_rewards(run)
    metrics_path = run.dir.file("metrics.jsonl")
    summary = {
        "algo": cfg.algo.algo,
        "variant": cfg.variant,
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
