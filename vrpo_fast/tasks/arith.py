"""Synthetic arithmetic with exact answers: the default task ("23+48=" -> "71").

Small enough that a 0.4M-parameter model learns it on a CPU in a minute, hard enough (carries) that a
short supervised warm-up leaves it clearly imperfect, so RL has something to improve. Deterministic
from ``seed``; the held-out split shares no (a, b, op) triple with the train split.
"""
from __future__ import annotations

import random

from .base import Example, Task

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithTask(Task):
    """``a <op> b =`` with ``a, b`` in ``[0, max_operand]``; reward 1 for the exact answer, else 0.

    ops:        which operators appear (any of "+-*"); "-" answers may be negative.
    num_eval:   size of the held-out split (drawn first, never trained on).
    num_train:  cap on the train split (None: every remaining triple).
    """

    name = "arith"
    reward_kind = "rule"

    @classmethod
    def default_settings(cls, **task_kwargs):
        return {"max_new_tokens": 6}  # "99+99=" -> "198" + EOS

    def __init__(self, *, seed: int = 0, max_operand: int = 99, ops: str = "+", num_eval: int = 256,
                 num_train: int | None = None):
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        if not ops or any(op not in _APPLY for op in ops):
            raise ValueError(f"ops must be a non-empty string over {''.join(_APPLY)!r}, got {ops!r}")
        triples = [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]
        if not 0 < num_eval < len(triples):
            raise ValueError(f"num_eval must be in [1, {len(triples) - 1}] for these operands, got {num_eval}")
        random.Random(seed).shuffle(triples)
        self._eval = [self._example(*t) for t in triples[:num_eval]]
        train = triples[num_eval:]
        self._train = [self._example(*t) for t in (train if num_train is None else train[:num_train])]

    @staticmethod
    def _example(a: int, op: str, b: int) -> Example:
        answer = str(_APPLY[op](a, b))
        return Example(prompt=f"{a}{op}{b}=", answer=answer, reference=answer)

    def grade(self, example: Example, completion: str) -> float:
        return float(completion.strip() == example.answer)
