"""Reward-noise models applied between the clean reward and the learner.

Every model is seeded (its own ``torch.Generator``, so the noise never depends on, nor perturbs, the
global RNG), resumable (``state_dict()`` / ``load_state_dict()`` carry the generator and running
statistics) and self-describing (``describe()`` -> a flat dict for logs: type, parameters, seed and
what it has done so far, e.g. the realised flip rate).

* ``flip``     -- a binary rule reward r in {0, 1} becomes 1 - r with probability ``rate``.
* ``gaussian`` -- r + N(0, std^2), for learned (real-valued) rewards.
* ``bias``     -- a *systematic* error: r + coef * min(len(completion) / length_scale, 1) (rewards
  verbosity), or r + coef when the completion contains ``pattern`` (rewards a surface cue). It is
  deterministic, showing that reward noise is not only random.
* ``none``     -- identity.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch


class RewardNoise:
    """Base: identity. ``__call__(rewards [N] float32, completions) -> noisy rewards [N]``."""

    name = "none"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.n_rewards = 0  # rewards seen so far (for the logged statistics)

    def __call__(self, rewards: torch.Tensor, completions: Sequence[str] = ()) -> torch.Tensor:
        self.n_rewards += rewards.numel()
        return rewards.clone()

    def params(self) -> Dict[str, Any]:
        """The model's parameters (subclasses add theirs)."""
        return {}

    def stats(self) -> Dict[str, Any]:
        """What the model has done so far (subclasses add theirs)."""
        return {"n_rewards": self.n_rewards}

    def describe(self) -> Dict[str, Any]:
        """Flat dict for logging: type, parameters, seed and running statistics."""
        return {"type": self.name, **self.params(), "seed": self.seed, **self.stats()}

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "type": self.name, "seed": self.seed, "stats": self._counters()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("type", self.name) != self.name:
            raise ValueError(f"state_dict is for noise type {state['type']!r}, not {self.name!r}")
        self.generator.set_state(state["generator"])
        for k, v in state.get("stats", {}).items():  # older states carry only the generator
            setattr(self, k, v)

    def _counters(self) -> Dict[str, Any]:
        return {"n_rewards": self.n_rewards}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self.params(), "seed": self.seed}.items())
        return f"{type(self).__name__}({args})"


def _as_float_cpu(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    return rewards.detach().cpu().float()


class FlipNoise(RewardNoise):
    """Binary rule reward r in {0, 1}: replaced by 1 - r with probability ``rate``."""

    name = "flip"

    def __init__(self, rate: float, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"noise rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.n_flipped = 0

    def __call__(self, rewards, completions=()):
        r = _as_float_cpu(rewards)
        flip = torch.rand(r.shape, generator=self.generator) < self.rate
        self.n_rewards += r.numel()
        self.n_flipped += int(flip.sum())
        return torch.where(flip, 1.0 - r, r).to(rewards.device)

    def params(self):
        return {"rate": self.rate}

    def stats(self):
        realised = self.n_flipped / self.n_rewards if self.n_rewards else 0.0
        return {"n_rewards": self.n_rewards, "n_flipped": self.n_flipped, "realised_flip_rate": realised}

    def _counters(self):
        return {"n_rewards": self.n_rewards, "n_flipped": self.n_flipped}


class GaussianNoise(RewardNoise):
    """Additive N(0, std^2) noise (learned rewards)."""

    name = "gaussian"

    def __init__(self, std: float, seed: int = 0):
        super().__init__(seed)
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = float(std)
        self.sum_sq = 0.0  # sum of squared noise draws, for the realised std

    def __call__(self, rewards, completions=()):
        r = _as_float_cpu(rewards)
        n = torch.randn(r.shape, generator=self.generator) * self.std
        self.n_rewards += r.numel()
        self.sum_sq += float((n.double() ** 2).sum())
        return (r + n).to(rewards.device)

    def params(self):
        return {"std": self.std}

    def stats(self):
        realised = (self.sum_sq / self.n_rewards) ** 0.5 if self.n_rewards else 0.0
        return {"n_rewards": self.n_rewards, "realised_std": realised}

    def _counters(self):
        return {"n_rewards": self.n_rewards, "sum_sq": self.sum_sq}


class BiasNoise(RewardNoise):
    """Systematic reward bias (deterministic given the completions).

    ``kind="length"``:  r + coef * min(len(completion) / length_scale, 1), a verbosity bias, monotone
    non-decreasing in the completion length (characters after stripping whitespace).
    ``kind="pattern"``: r + coef if ``pattern`` occurs in the completion (a surface cue, e.g. "!").
    """

    name = "bias"
    KINDS = ("length", "pattern")

    def __init__(self, coef: float, kind: str = "length", length_scale: float = 64.0,
                 pattern: Optional[str] = None, seed: int = 0):
        super().__init__(seed)
        if kind not in self.KINDS:
            raise ValueError(f"bias kind must be one of {self.KINDS}, got {kind!r}")
        if not length_scale > 0:
            raise ValueError(f"length_scale must be > 0, got {length_scale}")
        if kind == "pattern" and not pattern:
            raise ValueError("bias kind 'pattern' needs a non-empty pattern")
        self.coef, self.kind = float(coef), kind
        self.length_scale, self.pattern = float(length_scale), pattern
        self.sum_bias = 0.0

    def bias(self, completions: Sequence[str]) -> torch.Tensor:
        """The additive term for each completion, float32 [N]."""
        if self.kind == "length":
            feats = [min(len(str(c).strip()) / self.length_scale, 1.0) for c in completions]
        else:
            feats = [1.0 if self.pattern in str(c) else 0.0 for c in completions]
        return torch.tensor(feats, dtype=torch.float32) * self.coef

    def __call__(self, rewards, completions=()):
        r = _as_float_cpu(rewards)
        if len(completions) != r.numel():
            raise ValueError(
                f"bias noise needs one completion per reward: got {r.numel()} rewards and {len(completions)} completions"
            )
        b = self.bias(completions).reshape(r.shape)
        self.n_rewards += r.numel()
        self.sum_bias += float(b.double().sum())
        return (r + b).to(rewards.device)

    def params(self):
        p = {"coef": self.coef, "kind": self.kind}
        p.update({"length_scale": self.length_scale} if self.kind == "length" else {"pattern": self.pattern})
        return p

    def stats(self):
        return {"n_rewards": self.n_rewards, "mean_bias": self.sum_bias / self.n_rewards if self.n_rewards else 0.0}

    def _counters(self):
        return {"n_rewards": self.n_rewards, "sum_bias": self.sum_bias}


NOISE_TYPES = ("none", "flip", "gaussian", "bias")


def make_noise(
    noise_type: str,
    *,
    rate: float = 0.0,
    std: float = 0.0,
    seed: int = 0,
    bias_coef: float = 0.0,
    bias_kind: str = "length",
    bias_length_scale: float = 64.0,
    bias_pattern: Optional[str] = None,
) -> RewardNoise:
    """Build a noise model by name: ``none`` | ``flip`` (``rate``) | ``gaussian`` (``std``) |
    ``bias`` (``bias_coef``, ``bias_kind``, ``bias_length_scale``, ``bias_pattern``)."""
    if noise_type == "none":
        return RewardNoise(seed)
    if noise_type == "flip":
        return FlipNoise(rate, seed)
    if noise_type == "gaussian":
        return GaussianNoise(std, seed)
    if noise_type == "bias":
        return BiasNoise(bias_coef, bias_kind, bias_length_scale, bias_pattern, seed)
    raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")


__all__ = ["RewardNoise", "FlipNoise", "GaussianNoise", "BiasNoise", "NOISE_TYPES", "make_noise"]
