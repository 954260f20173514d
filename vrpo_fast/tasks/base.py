"""The task interface every task family implements (prompts, clean reward, held-out split)."""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch


@dataclass(frozen=True)
class Example:
    """One prompt of a task.

    prompt:    the user turn(s) as plain text, *before* any chat template (the trainer applies the
               tokenizer's chat template when it has one).
    answer:    the gold answer a rule reward compares against ("" for learned-reward tasks).
    reference: a good completion, used by the supervised warm-up phase.
    meta:      anything else a reward needs (choices, dialogue history, ...).
    """

    prompt: str
    answer: str = ""
    reference: str = ""
    meta: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def check_pairs(examples: Sequence[Example], completions: Sequence[str]) -> None:
    if len(examples) != len(completions):
        raise ValueError(f"got {len(examples)} examples but {len(completions)} completions")


class Task(ABC):
    """A task family: a train split, a held-out eval split and a *clean* (noise-free) reward.

    Subclasses fill ``self._train`` / ``self._eval`` and implement :meth:`grade` (one pair) or, for
    batched scorers such as a reward model, override :meth:`reward`.
    """

    name: str = "task"
    #: "rule" (exact check, noise model: flip) or "model" (learned reward, noise model: gaussian)
    reward_kind: str = "rule"
    _train: List[Example]
    _eval: List[Example]

    @classmethod
    def default_settings(cls, **task_kwargs) -> Dict[str, Any]:
        """Trainer options this task needs unless the user sets them (e.g. ``max_new_tokens``: long
        enough for the task's reference completions, in tokens of the embedded character tokenizer,
        which is the longest tokenization). ``task_kwargs`` are the task's constructor arguments."""
        return {}

    def train_examples(self) -> List[Example]:
        return list(self._train)

    def eval_examples(self) -> List[Example]:
        return list(self._eval)

    def grade(self, example: Example, completion: str) -> float:
        """Clean reward of one completion, in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} must implement grade() or reward()")

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> torch.Tensor:
        """Clean reward per (example, completion) pair: float32 tensor [len(examples)], in [0, 1]."""
        check_pairs(examples, completions)
        return torch.tensor([float(self.grade(e, c)) for e, c in zip(examples, completions)], dtype=torch.float32)
