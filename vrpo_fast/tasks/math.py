"""``math``: multi-step arithmetic word problems with exact numeric answers (rule reward).

Built-in problems are generated deterministically from ``seed``: short one-line word problems
(under ~80 characters at difficulty <= 2) with a short worked chain as the reference completion, e.g.

    prompt:    "Tom has 3 bags of 4 pens. Tom gets 5 more. How many pens?"
    reference: "3*4=12, 12+5=17. Answer: 17"

so that a tiny character-level model can learn the format in a short supervised warm-up and RL has
something to improve. ``difficulty`` sets the number of steps and the size of the numbers:

    0: one step, operands 1..9          2: two steps, operands 2..9, addends up to 20
    1: two steps, operands 2..6 (default) 3: three steps, operands 2..12, addends up to 50

The held-out split never shares a problem (template and numbers) with the train split, so the
eval reward measures arithmetic, not recall of a name -- except at difficulty 0, where a problem is
a single computation (3*9 cannot be inferred from the other products) and the eval split is made of
unseen prompts instead (``holdout="prompts"``; pass ``holdout=`` to choose).

``path=`` loads a GSM8K-format JSONL instead: one ``{"question": ..., "answer": ...}`` per line, the
answer ending with ``#### N``. ``eval_path=`` gives a separate held-out file; without it ``n_eval``
lines are held out (shuffled with ``seed``).
"""
from __future__ import annotations

import random
import re
from typing import Callable, Dict, List, Optional, Tuple


from .answers import grade_number, parse_number, format_number
from .base import Example, Task
from .jsonl import JsonlError, build_splits, iter_jsonl, require_str

NAMES = ["Tom", "Ann", "Max", "Eva", "Sam", "Mia", "Ben", "Zoe", "Ali", "Kim", "Leo", "Ivy"]
ITEMS = ["pens", "eggs", "cards", "books", "coins", "shells", "cups", "beads", "apples", "stamps"]

# difficulty -> (smallest factor, largest factor, largest addend)
_RANGES = {0: (1, 9, 9), 1: (2, 6, 12), 2: (2, 9, 20), 3: (2, 12, 50)}

Problem = Tuple[str, int, str, tuple]  # prompt, answer, reference chain, dedup key (template + numbers)


def _mul_add(rng, name, item, lo, hi, top):
    a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(1, top)
    x = a * b
    return f"{name} has {a} bags of {b} {item}. {name} gets {c} more. How many {item}?", x + c, [f"{a}*{b}={x}", f"{x}+{c}={x + c}"], (a, b, c)


def _sub_add(rng, name, item, lo, hi, top):
    a = rng.randint(lo + 1, max(lo + 1, hi * 3))
    b, c = rng.randint(1, a - 1), rng.randint(1, top)
    x = a - b
    return f"{name} had {a} {item}, gave away {b}, then got {c}. How many now?", x + c, [f"{a}-{b}={x}", f"{x}+{c}={x + c}"], (a, b, c)


def _mul_sub(rng, name, item, lo, hi, top):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    x = a * b
    c = rng.randint(1, max(1, min(top, x - 1)))
    return f"{a} boxes hold {b} {item} each. {c} are lost. How many are left?", x - c, [f"{a}*{b}={x}", f"{x}-{c}={x - c}"], (a, b, c)


def _change(rng, name, item, lo, hi, top):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    x = a * b
    c = x + rng.randint(1, top)
    return f"{name} buys {a} {item} at ${b} each and pays ${c}. Change?", c - x, [f"{a}*{b}={x}", f"{c}-{x}={c - x}"], (a, b, c)


def _div_add(rng, name, item, lo, hi, top):
    b, x = rng.randint(max(2, lo), hi), rng.randint(lo, hi)
    a, c = b * x, rng.randint(1, top)
    return f"{a} {item} are split among {b} kids. Each gets {c} more. How many each?", x + c, [f"{a}/{b}={x}", f"{x}+{c}={x + c}"], (a, b, c)


def _rate_add(rng, name, item, lo, hi, top):
    a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(1, top)
    x = a * b
    return f"{name} reads {a} pages a day for {b} days, then {c} more. Total pages?", x + c, [f"{a}*{b}={x}", f"{x}+{c}={x + c}"], (a, b, c)


def _add_one(rng, name, item, lo, hi, top):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{name} has {a} {item} and gets {b} more. How many {item}?", a + b, [f"{a}+{b}={a + b}"], (a, b)


def _sub_one(rng, name, item, lo, hi, top):
    a = rng.randint(lo + 1, hi + 9)
    b = rng.randint(1, a - 1)
    return f"{name} has {a} {item} and loses {b}. How many are left?", a - b, [f"{a}-{b}={a - b}"], (a, b)


def _mul_one(rng, name, item, lo, hi, top):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{name} has {a} bags of {b} {item}. How many {item}?", a * b, [f"{a}*{b}={a * b}"], (a, b)


ONE_STEP: List[Callable] = [_add_one, _sub_one, _mul_one]
TWO_STEP: List[Callable] = [_mul_add, _sub_add, _mul_sub, _change, _div_add, _rate_add]


def _third_step(rng, prompt, answer, steps, key, top):
    """Difficulty 3: one more operation on the two-step result."""
    d = rng.randint(1, top)
    head, question = prompt.rsplit(". ", 1)  # the extra step goes before the question
    if answer > d and rng.random() < 0.5:
        return f"{head}. Then {d} are used. {question}", answer - d, steps + [f"{answer}-{d}={answer - d}"], key + ("-", d)
    return f"{head}. Then {d} more come. {question}", answer + d, steps + [f"{answer}+{d}={answer + d}"], key + ("+", d)


def generate_problem(rng: random.Random, difficulty: int = 1) -> Problem:
    """One word problem at ``difficulty`` (see the module docstring)."""
    if difficulty not in _RANGES:
        raise ValueError(f"difficulty must be one of {sorted(_RANGES)}, got {difficulty!r}")
    lo, hi, top = _RANGES[difficulty]
    templates = ONE_STEP if difficulty == 0 else TWO_STEP
    if difficulty >= 3:  # "pays $c. Change?" has no sensible third step
        templates = [t for t in TWO_STEP if t is not _change]
    t = rng.randrange(len(templates))
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    prompt, answer, steps, numbers = templates[t](rng, name, item, lo, hi, top)
    key = (difficulty, templates[t].__name__) + tuple(numbers)
    if difficulty >= 3:
        prompt, answer, steps, key = _third_step(rng, prompt, answer, steps, key, top)
    reference = ", ".join(steps) + f". Answer: {answer}"
    return prompt, answer, reference, key


HOLDOUTS = ("problems", "prompts")


def generate_problems(seed: int, n_train: int, n_eval: int, difficulty: int = 1,
                      holdout: Optional[str] = None) -> Tuple[List[Example], List[Example]]:
    """Deterministic train/eval problems.

    ``holdout="problems"``: no eval problem (template + numbers) appears in train under another
    name. ``holdout="prompts"``: eval prompts are unseen strings, but their computation may appear
    in train with another name or item. Default: "prompts" at difficulty 0 (a one-step problem *is*
    its computation, and 3*9 cannot be inferred from other products), else "problems".
    """
    holdout = holdout or ("prompts" if difficulty == 0 else "problems")
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    rng = random.Random(f"vrpo_fast.math:{seed}:{difficulty}")
    # give up once thousands of draws in a row bring nothing new: the problem space is exhausted
    max_misses = 5000
    eval_keys, evals, misses = set(), [], 0
    while len(evals) < n_eval:
        prompt, answer, reference, key = generate_problem(rng, difficulty)
        if holdout == "prompts":
            key = prompt
        if key in eval_keys:
            misses += 1
            if misses > max_misses:
                raise ValueError(f"difficulty {difficulty} has too few distinct problems for n_eval={n_eval}")
            continue
        misses = 0
        eval_keys.add(key)
        evals.append(Example(prompt, str(answer), reference, {"difficulty": difficulty}))
    seen, train, misses = {e.prompt for e in evals}, [], 0
    while len(train) < n_train:
        prompt, answer, reference, key = generate_problem(rng, difficulty)
        if holdout == "prompts":
            key = prompt
        if key in eval_keys or prompt in seen:
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"difficulty {difficulty} has too few distinct problems for n_train={n_train} "
                    f"(got {len(train)}); lower n_train or raise difficulty"
                )
            continue
        misses = 0
        seen.add(prompt)
        train.append(Example(prompt, str(answer), reference, {"difficulty": difficulty}))
    return train, evals


_CALC_ANNOTATION = re.compile(r"<<[^>]*>>")


def load_gsm8k_jsonl(path: str) -> List[Example]:
    """GSM8K-format JSONL -> examples (answer: the number after the last ``####``)."""
    examples = []
    for lineno, rec in iter_jsonl(path, required=("question", "answer")):
        question = require_str(path, lineno, rec, "question").strip()
        solution = require_str(path, lineno, rec, "answer")
        if "####" not in solution:
            raise JsonlError(path, lineno, "'answer' has no final answer: it must end with '#### N'")
        final = solution.rsplit("####", 1)[1].strip()
        value = parse_number(final)
        if value is None:
            raise JsonlError(path, lineno, f"final answer after '####' is not a number: {final!r}")
        # the calculator annotations "<<3*4=12>>" are tool calls, not text a model should imitate
        reference = _CALC_ANNOTATION.sub("", solution.rsplit("####", 1)[0]).strip()
        reference = (reference + "\n" if reference else "") + f"#### {format_number(value)}"
        examples.append(Example(question, format_number(value), reference, {"source": str(path), "line": lineno}))
    return examples


class MathTask(Task):
    """Arithmetic word problems (generated, or a GSM8K JSONL via ``path``); reward 1 if the final
    number equals the gold answer (see :func:`vrpo_fast.tasks.answers.extract_number`)."""

    name = "math"
    reward_kind = "rule"

    @classmethod
    def default_settings(cls, **task_kwargs):
        # the worked chain "4*2=8, 8-6=2. Answer: 2" grows with the number of steps: references are at
        # most 19 / 28 / 30 / 46 characters at difficulty 0 / 1 / 2 / 3, plus EOS and some slack
        difficulty = task_kwargs.get("difficulty", 1)
        return {"max_new_tokens": {0: 24, 1: 32, 2: 36, 3: 52}.get(difficulty, 52)}

    def __init__(
        self,
        seed: int = 0,
        n_train: Optional[int] = None,
        n_eval: Optional[int] = None,
        difficulty: int = 1,
        holdout: Optional[str] = None,
        path: Optional[str] = None,
        eval_path: Optional[str] = None,
        num_train: Optional[int] = None,
        num_eval: Optional[int] = None,
    ):
        self.seed, self.difficulty, self.path = int(seed), int(difficulty), path
        self._train, self._eval = build_splits(
            path=path, eval_path=eval_path, load=load_gsm8k_jsonl,
            generate=lambda nt, ne: generate_problems(self.seed, nt, ne, self.difficulty, holdout),
            n_train=n_train, n_eval=n_eval, num_train=num_train, num_eval=num_eval, seed=self.seed, default_n_eval=200,
        )

    def grade(self, example: Example, completion: str) -> float:
        return grade_number(completion, example.answer)

    def describe(self) -> Dict[str, object]:
        return {"task": self.name, "seed": self.seed, "difficulty": self.difficulty, "path": self.path,
                "n_train": len(self._train), "n_eval": len(self._eval)}


__all__ = ["MathTask", "generate_problem", "generate_problems", "load_gsm8k_jsonl"]
