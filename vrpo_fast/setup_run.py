"""Setting up a run: task and noise, the models (plain, LoRA, FSDP2, resumed), the supervised warm-up,
the frozen reference, the critic, optimisers and schedules, and checkpoints of all of it.

:func:`setup_run` returns a :class:`Run` that :mod:`vrpo_fast.trainer`'s RL step reads; nothing in
here is part of the RL method itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import evaluation
from .config import TrainConfig
from .distributed import (full_state_dict, gather_objects, generation_weights, is_sharded, load_optimizer_state,
                          optimizer_state)
from .errors import NonFiniteLossError
from .models.loading import (build_value_model, ensure_pad_token, frozen_copy, load_causal_lm, load_policy,
                             resolve_attn_implementation)
from .run_dir import RunDirError, RunDirectory, read_json
from .scoring import TokenScorer
from .seeding import derived_seed, seed_everything
from .tasks import Example, get_task
from .tasks.jsonl import line_limit
from .tasks.noise import make_noise
from .warmup import supervised_warmup, trainable_parameters

logger = logging.getLogger("vrpo_fast")

REFERENCE_DIR = "reference"  # the warmed-up policy = the frozen reference (written once)
WARMUP_FILE = "warmup.json"
BYTES_PER_TOKEN = 64  # no tokenizer's token is longer: the byte cap on a task-file line per token


@dataclasses.dataclass
class Run:
    """Everything the RL loop works with; built by :func:`setup_run`."""

    cfg: TrainConfig
    acc: Any                                   # accelerate.Accelerator
    dir: RunDirectory
    train_examples: List[Example]
    eval_examples: List[Example]
    reward_fn: Callable[[Sequence[Example], Sequence[str]], torch.Tensor]
    noise: Any                                 # tasks.noise.RewardNoise
    tokenizer: Any = None
    policy: Any = None                         # TokenScorer(policy_lm), prepared (DDP / FSDP2)
    policy_lm: Any = None                      # the unwrapped causal LM (for generate)
    policy_opt: Any = None
    policy_sched: Any = None
    ref: Any = None                            # TokenScorer of the frozen reference
    reference_mode: Callable[[], Any] = contextlib.nullcontext
    value_model: Any = None
    value_opt: Any = None
    value_sched: Any = None
    warmup: Dict[str, Any] = dataclasses.field(default_factory=dict)
    start_step: int = 0
    last_checkpoint: Optional[str] = None

    @property
    def has_critic(self) -> bool:
        return self.cfg.algo.algo in ("vrpo", "ppo")

    @property
    def use_lora(self) -> bool:
        return self.cfg.model.lora_r > 0

    @property
    def trained(self) -> list:
        return [self.policy] + ([self.value_model] if self.has_critic else [])

    def policy_weights(self):
        """Context in which ``policy_lm`` holds its full weights (FSDP2 gathers them around generate)."""
        return generation_weights(self.acc, self.policy)

    @property
    def reference_dir(self) -> str:
        return self.dir.file(REFERENCE_DIR)


# ----------------------------------------------------------------------------------------------
# task, reward, noise
# ----------------------------------------------------------------------------------------------
def make_reward_fn(cfg: TrainConfig, task) -> Callable[[Sequence[Example], Sequence[str]], torch.Tensor]:
    """Clean reward: the task's own rule, or a learned reward model (``--reward model:PATH``)."""
    if cfg.task.reward == "rule":
        return task.reward
    from .tasks.reward_model import load_reward_model

    scorer = load_reward_model(cfg.task.reward[len("model:"):])

    def reward(examples, completions):
        return scorer([e.prompt for e in examples], list(completions)).float().cpu()

    return reward


def setup_task(cfg: TrainConfig):
    """(train examples, eval examples, clean reward function, noise model)."""
    with line_limit(cfg.task.max_prompt_tokens * BYTES_PER_TOKEN):
        task = get_task(cfg.task.task, **cfg.task.task_kwargs)
    train_examples, eval_examples = task.train_examples(), task.eval_examples()[:cfg.task.num_eval]
    if not train_examples or not eval_examples:
        raise ValueError(f"task {cfg.task.task!r} has an empty train or eval split")
    noise = make_noise(cfg.task.noise_type, rate=cfg.task.noise_rate, std=cfg.task.noise_std,
                       seed=derived_seed(cfg.run.seed, 3), **cfg.task.noise_kwargs)
    return train_examples, eval_examples, make_reward_fn(cfg, task), noise


def check_lengths(tokenizer, examples: Sequence[Example], cap: int) -> None:
    """Refuse a prompt or reference answer longer than ``--max-prompt-tokens``, naming ``file:line``."""
    for i, e in enumerate(examples):
        for field, text in (("prompt", e.prompt), ("reference answer", e.reference)):
            if len(text.encode("utf-8")) <= cap:  # a byte-level token covers >= 1 byte: cannot exceed the cap
                continue
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > cap:
                where = f"{e.meta['source']}:{e.meta['line']}" if "source" in e.meta else f"example {i}"
                raise ValueError(f"{where}: the {field} has {n} tokens, more than --max-prompt-tokens {cap}")


# ----------------------------------------------------------------------------------------------
# where to resume from
# ----------------------------------------------------------------------------------------------
def find_resume_point(cfg: TrainConfig, acc, run: RunDirectory):
    """(checkpoint path or None, its trainer state or None). Never goes backwards silently:
    unusable newer checkpoints are named and set aside; none usable -> RunDirError."""
    if not cfg.run.resume:
        return None, None
    name, state = None, None
    if acc.is_main_process:
        path, state, skipped = ckpt.find_resume_checkpoint(run.path)
        for bad, reason in skipped:
            print(f"[vrpo_fast] skipping checkpoint {bad}: {reason}", flush=True)
        if path is None and skipped:
            raise RunDirError(f"--resume: no usable checkpoint in {run.file(ckpt.CHECKPOINTS)} "
                              f"({'; '.join(f'{n}: {r}' for n, r in skipped)}). Nothing was changed; to restart RL "
                              f"from the warm-up, move checkpoints/ away")
        if path is None:
            _check_no_lost_steps(run)
        moved = ckpt.set_aside(run.path, [n for n, _ in skipped])
        if moved:
            print(f"[vrpo_fast] set aside: {', '.join(moved)}", flush=True)
        name = None if path is None else os.path.basename(path)
    name = gather_objects(acc, [name])[0] if acc.num_processes > 1 else name
    if name is None:
        return None, None
    path = run.file(ckpt.CHECKPOINTS, name)
    # the main process keeps the state it loaded to check the checkpoint: read once (it holds the full
    # optimiser states, several GB for a real model)
    return path, state if state is not None else ckpt.load_trainer_state(path)


def _check_no_lost_steps(run: RunDirectory) -> None:
    """No checkpoint at all: resuming is starting RL over, which is fine only if no RL step was logged."""
    from .metrics import read_metrics

    path = run.file("metrics.jsonl")
    records = read_metrics(path, drop_torn_tail=True) if os.path.exists(path) else []
    if records:
        raise RunDirError(f"--resume: {path} records {len(records)} RL steps but {run.file(ckpt.CHECKPOINTS)} holds "
                          f"no checkpoint to continue them from. Nothing was changed; delete metrics.jsonl to "
                          f"restart RL from step 0")


def _warmup_is_saved(run: RunDirectory, resume_from: Optional[str]) -> bool:
    """True when reference/ and warmup.json hold a complete warm-up (checked against its manifest)."""
    if not os.path.isfile(run.file(WARMUP_FILE)):
        return False
    reason = ckpt.verify_manifest(run.file(REFERENCE_DIR))
    if reason is None:
        return True
    if resume_from is not None:
        raise RunDirError(f"{run.file(REFERENCE_DIR)} (the frozen reference of this run) is incomplete: {reason}")
    print(f"[vrpo_fast] the saved warm-up is incomplete ({reason}): warming up again", flush=True)
    return False


# ----------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------
def _lora_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    m = cfg.model
    return dict(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout, target_modules=m.lora_target_modules)


def _load_tok(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def enable_gradient_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_policy_lm(run: Run, attn: str, resume_from: Optional[str], warmup_done: bool, lora_state):
    """The policy LM and tokenizer: from a checkpoint, from the saved warm-up, or fresh (LoRA applied)."""
    cfg = run.cfg
    if resume_from is not None and not run.use_lora:
        policy_lm = load_causal_lm(os.path.join(resume_from, "policy"), attn_implementation=attn, what="checkpoint")
        tokenizer = ensure_pad_token(_load_tok(os.path.join(resume_from, "policy")), policy_lm)
    elif warmup_done:  # under LoRA, the frozen base is the warmed-up policy; adapters load onto it
        policy_lm = load_causal_lm(run.reference_dir, attn_implementation=attn, what="reference")
        tokenizer = ensure_pad_token(_load_tok(run.reference_dir), policy_lm)
    else:
        policy_lm, tokenizer = load_policy(cfg.model.model, attn_implementation=attn, seed=cfg.run.seed,
                                           tiny_hidden_size=cfg.model.tiny_hidden_size,
                                           tiny_layers=cfg.model.tiny_layers, gguf_file=cfg.model.gguf_file)
    if run.use_lora:
        from .models.lora import apply_lora, count_parameters, load_lora_state_dict

        torch.manual_seed(derived_seed(cfg.run.seed, 6))  # the same adapter init on every process
        apply_lora(policy_lm, **_lora_kwargs(cfg))
        if lora_state is not None:
            load_lora_state_dict(policy_lm, lora_state["policy"])
        if run.acc.is_main_process:
            counts = count_parameters(policy_lm)
            print(f"[vrpo_fast] LoRA r={cfg.model.lora_r}: {counts['trainable']:,} of {counts['total']:,} policy "
                  f"parameters trained", flush=True)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy_lm)
    return policy_lm, tokenizer


def cpu_bf16_attention(run: Run, model) -> None:
    """On CPU under bf16 autocast, SDPA runs in fp32 (faster there, and exact-er; see vrpo_fast.precision)."""
    if run.acc.device.type == "cpu" and run.acc.mixed_precision == "bf16" and \
            getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa":
        from .precision import use_fp32_attention

        use_fp32_attention(model)


def adamw(run: Run, params, lr: float, weight_decay: float):
    """AdamW, fused (one kernel over all parameters) where the parameters are plain tensors."""
    fused = not is_sharded(run.acc) and run.acc.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def prepare_policy(run: Run, policy_lm) -> None:
    """Wrap the policy for accelerate; under FSDP2 the policy and its optimizer are prepared together."""
    o, acc = run.cfg.optim, run.acc
    cpu_bf16_attention(run, policy_lm)
    if is_sharded(acc):
        # FSDP2 shards the model in place and swaps its optimizer's parameters for the shards, so
        # both go through one prepare() call; the warm-up borrows this optimizer
        policy = TokenScorer(policy_lm)
        opt = torch.optim.AdamW(trainable_parameters(policy), lr=o.lr, weight_decay=o.weight_decay)
        run.policy, run.policy_opt = acc.prepare(policy, opt)
    else:
        run.policy = acc.prepare(TokenScorer(policy_lm))  # DDP-wrapped when distributed
    run.policy_lm = acc.unwrap_model(run.policy).lm


def held_out_rewards(run: Run):
    """(sampled, greedy or None): the policy's mean clean reward on the held-out prompts."""
    cfg, acc = run.cfg, run.acc
    sampled = evaluation.evaluate(acc, run.policy_lm, run.tokenizer, run.reward_fn, run.eval_examples, cfg,
                                  weights=run.policy_weights)
    greedy = evaluation.evaluate(acc, run.policy_lm, run.tokenizer, run.reward_fn, run.eval_examples, cfg,
                                 temperature=0.0, weights=run.policy_weights) if cfg.rollout.eval_greedy else None
    return sampled, greedy


def warm_up(run: Run) -> Dict[str, Any]:
    """Supervised warm-up, the held-out clean reward before RL, and the warmed-up policy saved as the
    frozen reference (``reference/``, with a manifest) with ``warmup.json``."""
    cfg, acc, o = run.cfg, run.acc, run.cfg.optim
    probe_examples = run.train_examples[:o.warmup_probe_size]

    def probe() -> float:
        return evaluation.evaluate(acc, run.policy_lm, run.tokenizer, run.reward_fn, probe_examples, cfg,
                                   temperature=0.0, weights=run.policy_weights)

    warmup = supervised_warmup(acc, run.policy, run.tokenizer, run.train_examples, cfg,
                               cfg.run.progress and acc.is_main_process, probe=probe, optimizer=run.policy_opt)
    if run.policy_opt is not None:  # the RL phase starts from fresh moments, as with a new optimiser
        run.policy_opt.state.clear()
        for group in run.policy_opt.param_groups:
            group.update(lr=o.lr, weight_decay=o.weight_decay)
    if run.use_lora and warmup["warmup_steps"]:
        from .models.lora import fold_lora_into_base

        # the warmed-up policy becomes the base (= the reference); the adapters restart at zero
        torch.manual_seed(derived_seed(cfg.run.seed, 6, 1))  # A re-initialised identically everywhere
        fold_lora_into_base(run.policy_lm)
    warmup["eval_clean_reward_before"], greedy = held_out_rewards(run)
    if greedy is not None:
        warmup["eval_greedy_reward_before"] = greedy
    policy_state = full_state_dict(acc, run.policy, prefix="lm.")  # FSDP: gathered on the main process
    if acc.is_main_process:
        saved_lm = _plain_model(run.policy_lm) if run.use_lora else run.policy_lm
        ckpt.atomic_directory(run.reference_dir, lambda d: (saved_lm.save_pretrained(d, state_dict=policy_state),
                                                            run.tokenizer.save_pretrained(d)))
        del saved_lm
        ckpt.atomic_write_json(run.dir.file(WARMUP_FILE), warmup)
    acc.wait_for_everyone()
    return warmup


# ----------------------------------------------------------------------------------------------
# the frozen reference and the critic
# ----------------------------------------------------------------------------------------------
def _plain_model(model):
    """``model`` with its LoRA adapters merged in and removed (a copy), for saving and for the critic."""
    from .models.lora import merged_copy

    return merged_copy(model)


def build_reference(run: Run, attn: str, reload: bool) -> None:
    """The frozen reference = the warmed-up policy (under LoRA: the policy with its adapters off)."""
    acc = run.acc
    if run.use_lora:
        # LoRA: the reference shares every weight with the policy, so no second copy is held
        from .models.lora import adapters_disabled

        run.ref = TokenScorer(run.policy_lm)
        run.reference_mode = lambda: adapters_disabled(run.policy_lm)
        return
    if os.path.isdir(run.reference_dir) and (reload or is_sharded(acc)):
        ref_lm = load_causal_lm(run.reference_dir, attn_implementation=attn, what="reference")
        ref_lm.requires_grad_(False).eval()
    else:
        ref_lm = frozen_copy(run.policy_lm)
    if acc.mixed_precision in ("bf16", "fp16"):
        ref_lm.to(torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16)
    cpu_bf16_attention(run, ref_lm)
    run.ref = TokenScorer(ref_lm).to(acc.device)
    run.reference_mode = contextlib.nullcontext


def _load_heads(value_model, heads: Dict[str, torch.Tensor]) -> None:
    missing, unexpected = value_model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"the checkpoint's value heads do not fit the critic: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written with other --latent-dim / --algo?)")


def build_critic(run: Run, attn: str, resume_from: Optional[str], lora_state) -> None:
    """The value model: from the checkpoint, from ``--critic``, or on the warmed-up policy's body."""
    cfg, a = run.cfg, run.cfg.algo
    seed_everything(derived_seed(cfg.run.seed, 4))  # the same fresh heads however we got here
    resumed_critic = resume_from is not None and not run.use_lora
    critic_path = os.path.join(resume_from, "value") if resumed_critic else cfg.model.critic
    # under LoRA the critic's backbone starts from the policy's plain weights (adapters merged: the
    # warmed-up policy) and gets adapters of its own; its heads are trained in full
    source_lm = _plain_model(run.policy_lm) if run.use_lora and critic_path is None else run.policy_lm
    if (is_sharded(run.acc) or lora_state is not None) and critic_path is None:
        # the warmed-up policy's full weights: not the FSDP shards, not the resumed policy's adapters
        source_lm = load_causal_lm(run.reference_dir, attn_implementation=attn, what="reference")
    value_model = build_value_model(source_lm, algo=a.algo, critic_path=critic_path, latent_dim=a.latent_dim,
                                    beta=a.beta, aux_input=a.aux_input, attn_implementation=attn,
                                    aux_heads=cfg.uses_aux_regression, logvar_init=a.vib_logvar_init)
    del source_lm  # the merged copy's body now lives in the critic; drop its LM head
    if run.use_lora:
        from .models.lora import apply_lora, load_lora_state_dict

        apply_lora(value_model.backbone, **_lora_kwargs(cfg))
        if lora_state is not None:
            load_lora_state_dict(value_model.backbone, lora_state["value_adapters"])
            _load_heads(value_model, lora_state["value_heads"])
    if cfg.model.gradient_checkpointing:
        value_model.gradient_checkpointing_enable()
    cpu_bf16_attention(run, value_model.backbone)
    run.value_model = value_model


# ----------------------------------------------------------------------------------------------
# optimisers, schedules, resumed state
# ----------------------------------------------------------------------------------------------
def _schedule(cfg: TrainConfig, optimizer):
    steps = max(cfg.run.steps, 1)
    if cfg.optim.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def build_optimizers(run: Run) -> None:
    """AdamW + LR schedule per trained model. The schedules step once per RL step on every process
    (the accelerator is made with ``step_scheduler_with_optimizer=False``)."""
    o, acc = run.cfg.optim, run.acc
    if run.policy_opt is None:
        opt = adamw(run, trainable_parameters(run.policy), o.lr, o.weight_decay)
        run.policy_opt, run.policy_sched = acc.prepare(opt, _schedule(run.cfg, opt))
    else:  # FSDP2: prepared with the policy
        run.policy_sched = acc.prepare(_schedule(run.cfg, run.policy_opt))
    if run.has_critic:
        opt = adamw(run, trainable_parameters(run.value_model), o.critic_lr, o.weight_decay)
        run.value_model, run.value_opt, run.value_sched = acc.prepare(run.value_model, opt, _schedule(run.cfg, opt))


def restore(run: Run, state: Dict[str, Any], path: str) -> None:
    """Optimiser, schedule, scaler, noise and RNG states of a checkpoint (names the file on failure)."""
    acc = run.acc
    try:
        load_optimizer_state(acc, run.policy, run.policy_opt, state["policy_optimizer"])
        run.policy_sched.load_state_dict(state["policy_scheduler"])
        if run.has_critic:
            load_optimizer_state(acc, run.value_model, run.value_opt, state["value_optimizer"])
            run.value_sched.load_state_dict(state["value_scheduler"])
        if acc.scaler is not None and state.get("scaler") is not None:
            acc.scaler.load_state_dict(state["scaler"])
        run.noise.load_state_dict(state["noise"])
        ckpt.set_rng_state(state["rng"][acc.process_index])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise ckpt.CheckpointError(f"{os.path.join(path, ckpt.TRAINER_STATE)}: does not fit this run "
                                   f"({type(err).__name__}: {err})") from None
    run.start_step = state["step"]
    run.last_checkpoint = path


def setup_run(cfg: TrainConfig, acc, run_dir: RunDirectory) -> Run:
    """Build everything for the RL loop, resuming from the newest usable checkpoint with ``--resume``."""
    train_examples, eval_examples, reward_fn, noise = setup_task(cfg)
    run = Run(cfg, acc, run_dir, train_examples, eval_examples, reward_fn, noise)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, acc.device)
    resume_from, state = find_resume_point(cfg, acc, run_dir)
    warmup_done = cfg.run.resume and _warmup_is_saved(run_dir, resume_from)
    lora_state = state.get("lora") if state is not None and run.use_lora else None
    if resume_from is not None and run.use_lora and lora_state is None:
        raise ValueError(f"{resume_from} was not written by a --lora-r run (it holds no adapter state): resume "
                         f"it without --lora-r")
    policy_lm, run.tokenizer = load_policy_lm(run, attn, resume_from, warmup_done, lora_state)
    check_lengths(run.tokenizer, run.train_examples + run.eval_examples, cfg.task.max_prompt_tokens)
    run_dir.commit_config(cfg)  # from here on the directory holds this run
    prepare_policy(run, policy_lm)
    del policy_lm
    if warmup_done or resume_from is not None:
        run.warmup = read_json(run_dir.file(WARMUP_FILE))
    else:
        run.warmup = warm_up(run)
    if acc.is_main_process:
        greedy = run.warmup.get("eval_greedy_reward_before")
        print(f"[vrpo_fast] warm-up: {run.warmup['warmup_steps']} supervised steps; held-out clean reward before "
              f"RL: {run.warmup['eval_clean_reward_before']:.3f}" + ("" if greedy is None else f" (greedy {greedy:.3f})"),
              flush=True)
    build_reference(run, attn, reload=resume_from is not None or warmup_done)
    if run.has_critic:
        build_critic(run, attn, resume_from, lora_state)
    build_optimizers(run)
    if state is not None:
        restore(run, state, resume_from)
        if acc.is_main_process:
            print(f"[vrpo_fast] resumed from {resume_from} at step {run.start_step}", flush=True)
    return run


# ----------------------------------------------------------------------------------------------
# checkpoints of a run
# ----------------------------------------------------------------------------------------------
def _lora_checkpoint(policy_lm, value_model) -> Dict[str, Any]:
    """What a LoRA run trains (policy adapters; critic adapters and heads): enough to resume on the base."""
    from .models.lora import lora_state_dict

    out = {"policy": lora_state_dict(policy_lm)}
    if value_model is not None:
        out["value_adapters"] = lora_state_dict(value_model.backbone)
        out["value_heads"] = {k: v.detach().cpu().clone() for k, v in value_model.head_state_dict().items()}
    return out


def check_finite_weights(run: Run, step: int) -> None:
    """Refuse to checkpoint non-finite weights (they would become the run's 'latest')."""
    for name, model in (("policy", run.policy), ("value", run.value_model)):
        if model is None:
            continue
        for pname, p in model.named_parameters():
            if not torch.isfinite(p.detach()).all():
                raise NonFiniteLossError(f"{name} weight {pname}", step, math.nan, run.last_checkpoint,
                                         quantity="value")


def save_run_checkpoint(run: Run, step: int, extra: Optional[Dict[str, Any]] = None) -> str:
    """Checkpoint ``step``: weights (merged copies under LoRA), optimiser / schedule / noise / RNG states
    (and ``extra``, e.g. the critic warm-up's report at step 0)."""
    cfg, acc, r = run.cfg, run.acc, run.cfg.rollout
    check_finite_weights(run, step)
    state = {
        "step": step,
        "data_position": step * (r.rollout_batch_size // cfg.samples_per_prompt),
        # full states (gathered under FSDP: collectives, so every process builds this dict)
        "policy_optimizer": optimizer_state(acc, run.policy, run.policy_opt),
        "policy_scheduler": run.policy_sched.state_dict(),
        "value_optimizer": optimizer_state(acc, run.value_model, run.value_opt) if run.has_critic else None,
        "value_scheduler": run.value_sched.state_dict() if run.has_critic else None,
        "noise": run.noise.state_dict(),  # the same on every process (it acts on the global batch)
        "rng": gather_objects(acc, [ckpt.rng_state()]),  # one per process
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "lora": _lora_checkpoint(acc.unwrap_model(run.policy).lm,
                                 acc.unwrap_model(run.value_model) if run.has_critic else None)
        if run.use_lora else None,
        **(extra or {}),
    }
    path = None
    policy_state = full_state_dict(acc, run.policy, prefix="lm.")  # collectives: every process
    value_state = full_state_dict(acc, run.value_model) if run.has_critic else None
    if acc.is_main_process:
        # under LoRA, merged copies: plain models that --model / --critic load like any other
        saved_policy = acc.unwrap_model(run.policy).lm
        saved_value = acc.unwrap_model(run.value_model) if run.has_critic else None
        if run.use_lora:
            saved_policy = _plain_model(saved_policy)
            saved_value = _plain_model(saved_value) if run.has_critic else None
        path = ckpt.save_checkpoint(run.dir.path, step, policy=saved_policy, tokenizer=run.tokenizer,
                                    value_model=saved_value, policy_state=policy_state, value_state=value_state,
                                    trainer_state=state, keep=cfg.run.keep_checkpoints)
    acc.wait_for_everyone()
    run.last_checkpoint = path or os.path.join(run.dir.path, ckpt.CHECKPOINTS, ckpt.checkpoint_name(step))
    return run.last_checkpoint
