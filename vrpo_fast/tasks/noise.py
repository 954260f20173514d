"""Reward-noise models applied between the clean reward and the learner (seeded; issue [5 of 6] extends)."""
from __future__ import annotations

from typing import Sequence

import torch


class RewardNoise:
    """Base: identity. ``__call__(rewards [N] float32, completions) -> noisy rewards [N]``."""

    name = "none"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, rewards: torch.Tensor, completions: Sequence[str] = ()) -> torch.Tensor:
        return rewards.clone()

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class FlipNoise(RewardNoise):
    """Binary rule reward r in {0, 1}: replaced by 1 - r with probability ``rate``."""

    name = "flip"

    def __init__(self, rate: float, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"noise rate must be in [0, 1], got {rate}")
        self.rate = float(rate)

    def __call__(self, rewards, completions=()):
        flip = torch.rand(rewards.shape, generator=self.generator) < self.rate
        r = rewards.detach().cpu().float()
        return torch.where(flip, 1.0 - r, r).to(rewards.device)


class GaussianNoise(RewardNoise):
    """Additive N(0, std^2) noise (learned rewards)."""

    name = "gaussian"

    def __init__(self, std: float, seed: int = 0):
        super().__init__(seed)
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = float(std)

    def __call__(self, rewards, completions=()):
        n = torch.randn(rewards.shape, generator=self.generator) * self.std
        return (rewards.detach().cpu().float() + n).to(rewards.device)


def make_noise(noise_type: str, *, rate: float = 0.0, std: float = 0.0, seed: int = 0) -> RewardNoise:
    if noise_type == "none":
        return RewardNoise(seed)
    if noise_type == "flip":
        return FlipNoise(rate, seed)
    if noise_type == "gaussian":
        return GaussianNoise(std, seed)
    raise ValueError(f"noise_type must be one of ('none', 'flip', 'gaussian'), got {noise_type!r}")
