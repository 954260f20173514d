"""``sciqa``: multiple-choice elementary-science questions (rule reward on the choice letter).

The built-in bank (:func:`question_bank`, ~130 items) is written from textbook facts: states of
matter, the planets, animal classes, SI units, chemical symbols, the human body and simple
physics, chemistry and biology. Each item is a question, its correct answer and a pool of wrong
answers; a prompt draws 3 distractors and shuffles the 4 choices with a seeded RNG:

    prompt:    "Which planet is the largest? A) Mars B) Jupiter C) Venus D) Earth"
    reference: "Jupiter"

The grader accepts the letter ("B", "(B)", "Answer: B", ...) or the text of exactly one choice.
``reference_style`` picks the warm-up completion: ``"text"`` ("Jupiter", the default for the
built-in bank: a tiny model learns the facts quickly, while copying the letter that sits next to
the answer in the prompt takes it far longer), ``"letter"`` ("Answer: B", the default for user
files) or ``"both"`` ("Jupiter. Answer: B"). ``n_facts`` restricts the bank to a fixed subset
(the size knob for very small models).

Held-out split. ``holdout="variants"`` (default) keeps every fact in both splits but the eval
prompts are (distractor set, choice order) combinations that never appear in training: a model
must know the fact, not the letter position, and a tiny model trained from scratch can still
improve on it. ``holdout="facts"`` holds out whole facts instead (for a pretrained model, which
can answer facts it was never tuned on).

``path=`` loads a user JSONL instead: ``{"question": str, "choices": [str, ...], "answer": ...}``
per line, the answer a letter ("B"), a 0-based index (1) or the text of a choice.
"""
from __future__ import annotations

import random
from itertools import combinations, permutations
from typing import Dict, List, Optional, Sequence, Tuple


from .answers import LETTERS, choice_letters, format_choices, grade_choice, normalize_answer_letter
from .base import Example, Task
from .jsonl import JsonlError, build_splits, iter_jsonl, require_str

Fact = Tuple[str, str, Tuple[str, ...]]  # question, correct answer, wrong answers (>= 3)

STATES = ("solid", "liquid", "gas", "plasma")
CLASSES = ("mammal", "bird", "fish", "reptile", "amphibian", "insect")


def _category(template: str, pairs: Sequence[Tuple[str, str]], pool: Sequence[str]) -> List[Fact]:
    """Facts from one template: each subject's answer, wrong answers from the rest of the pool."""
    return [(template.format(s), a, tuple(p for p in pool if p != a)) for s, a in pairs]


def question_bank() -> List[Fact]:
    """The built-in question bank (deterministic order)."""
    facts: List[Fact] = []
    # states of matter at room temperature (about 20 C)
    facts += _category("At room temperature, {} is a what?", [
        ("ice", "solid"), ("iron", "solid"), ("salt", "solid"), ("wood", "solid"), ("sand", "solid"),
        ("water", "liquid"), ("milk", "liquid"), ("oil", "liquid"), ("mercury", "liquid"),
        ("oxygen", "gas"), ("helium", "gas"), ("steam", "gas"), ("nitrogen", "gas"),
    ], STATES)
    # planets, in order from the Sun
    planets = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
    ordinals = ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th")
    facts += _category("Which is the {} planet from the Sun?", list(zip(ordinals, planets)), planets)
    facts += [
        ("Which planet is the largest?", "Jupiter", ("Mars", "Venus", "Earth", "Mercury")),
        ("Which planet is the smallest?", "Mercury", ("Jupiter", "Saturn", "Earth", "Neptune")),
        ("Which planet is the hottest?", "Venus", ("Mercury", "Mars", "Jupiter", "Earth")),
        ("Which planet is called the Red Planet?", "Mars", ("Venus", "Jupiter", "Neptune", "Earth")),
        ("Which planet has the biggest rings?", "Saturn", ("Mars", "Mercury", "Venus", "Earth")),
        ("Which planet spins on its side?", "Uranus", ("Mars", "Earth", "Venus", "Mercury")),
        ("Which planet has life we know of?", "Earth", ("Mars", "Venus", "Jupiter", "Neptune")),
        ("What does the Earth orbit?", "the Sun", ("the Moon", "Mars", "Jupiter", "Polaris")),
        ("What does the Moon orbit?", "the Earth", ("the Sun", "Mars", "Venus", "Jupiter")),
        ("What is the Sun?", "a star", ("a planet", "a moon", "a comet", "a galaxy")),
    ]
    # animal classes
    facts += _category("{} is a kind of what?", [
        ("whale", "mammal"), ("bat", "mammal"), ("dolphin", "mammal"), ("horse", "mammal"), ("mouse", "mammal"),
        ("eagle", "bird"), ("penguin", "bird"), ("owl", "bird"), ("ostrich", "bird"),
        ("shark", "fish"), ("salmon", "fish"), ("trout", "fish"),
        ("snake", "reptile"), ("turtle", "reptile"), ("lizard", "reptile"), ("crocodile", "reptile"),
        ("frog", "amphibian"), ("toad", "amphibian"), ("newt", "amphibian"),
        ("bee", "insect"), ("ant", "insect"), ("beetle", "insect"),
    ], CLASSES)
    facts = [(("An " if q[0] in "aeiou" else "A ") + q, a, w) if q.endswith("kind of what?") else (q, a, w)
             for q, a, w in facts]
    # SI units
    units = ("metre", "kilogram", "second", "kelvin", "ampere", "newton", "joule", "watt", "pascal",
             "hertz", "volt", "ohm")
    facts += _category("What is the SI unit of {}?", [
        ("length", "metre"), ("mass", "kilogram"), ("time", "second"), ("temperature", "kelvin"),
        ("current", "ampere"), ("force", "newton"), ("energy", "joule"), ("power", "watt"),
        ("pressure", "pascal"), ("frequency", "hertz"), ("voltage", "volt"), ("resistance", "ohm"),
    ], units)
    # chemical symbols
    elements = ("gold", "silver", "iron", "sodium", "potassium", "oxygen", "hydrogen", "carbon", "helium",
                "copper", "lead", "nitrogen")
    facts += _category("Which element has the symbol {}?", [
        ("Au", "gold"), ("Ag", "silver"), ("Fe", "iron"), ("Na", "sodium"), ("K", "potassium"),
        ("O", "oxygen"), ("H", "hydrogen"), ("C", "carbon"), ("He", "helium"), ("Cu", "copper"),
        ("Pb", "lead"), ("N", "nitrogen"),
    ], elements)
    # the human body
    organs = ("heart", "lungs", "brain", "stomach", "kidneys", "skin", "liver", "bones")
    facts += [
        ("Which organ pumps blood?", "heart", organs),
        ("Which organ takes in air?", "lungs", organs),
        ("Which organ controls the body?", "brain", organs),
        ("Which organs filter blood into urine?", "kidneys", organs),
        ("What is the largest organ of the body?", "skin", organs),
        ("How many bones does an adult have?", "206", ("106", "150", "300", "412")),
        ("Which blood cells carry oxygen?", "red cells", ("white cells", "platelets", "plasma", "nerves")),
        ("Which sense uses the nose?", "smell", ("sight", "touch", "taste", "hearing")),
        ("Which sense uses the ears?", "hearing", ("sight", "touch", "taste", "smell")),
    ]
    facts = [(q, a, tuple(w for w in wrong if w != a)) for q, a, wrong in facts]
    # physics, chemistry, biology, earth science
    facts += [
        ("At what temperature does water boil at sea level?", "100 C", ("0 C", "50 C", "212 C", "37 C")),
        ("At what temperature does water freeze?", "0 C", ("100 C", "-40 C", "10 C", "32 C")),
        ("What pulls objects toward the Earth?", "gravity", ("magnetism", "friction", "light", "sound")),
        ("Which force slows a sliding box?", "friction", ("gravity", "magnetism", "buoyancy", "lift")),
        ("What does a magnet attract?", "iron", ("wood", "glass", "plastic", "paper")),
        ("Sound cannot travel through a what?", "vacuum", ("solid", "liquid", "gas", "metal")),
        ("Which travels faster?", "light", ("sound", "a car", "a jet", "wind")),
        ("What is the speed of light, roughly?", "300,000 km/s", ("300 km/s", "3,000 km/s", "30 km/s", "3 km/s")),
        ("What splits white light into colours?", "a prism", ("a mirror", "a magnet", "a lens cap", "a wire")),
        ("Which colour of light bends the most?", "violet", ("red", "orange", "yellow", "green")),
        ("What energy does a moving car have?", "kinetic", ("nuclear", "chemical", "elastic", "magnetic")),
        ("What energy is stored in food?", "chemical", ("kinetic", "nuclear", "sound", "magnetic")),
        ("What energy does a battery store?", "chemical", ("sound", "light", "nuclear", "kinetic")),
        ("Which metal conducts electricity best?", "silver", ("lead", "iron", "tin", "zinc")),
        ("Which is an electrical insulator?", "rubber", ("copper", "silver", "iron", "gold")),
        ("What is the chemical formula of water?", "H2O", ("CO2", "O2", "NaCl", "CH4")),
        ("What is the formula of carbon dioxide?", "CO2", ("H2O", "CO", "O2", "CH4")),
        ("What is table salt made of?", "NaCl", ("KCl", "H2O", "CO2", "CaCO3")),
        ("What is the pH of pure water?", "7", ("1", "5", "10", "14")),
        ("Lemon juice is a what?", "acid", ("base", "salt", "metal", "gas")),
        ("Which gas do plants take in?", "carbon dioxide", ("oxygen", "helium", "nitrogen", "hydrogen")),
        ("Which gas do plants give out?", "oxygen", ("carbon dioxide", "helium", "methane", "hydrogen")),
        ("Which gas do we need to breathe?", "oxygen", ("carbon dioxide", "helium", "methane", "neon")),
        ("Which gas makes up most of the air?", "nitrogen", ("oxygen", "carbon dioxide", "argon", "helium")),
        ("What makes plants green?", "chlorophyll", ("sugar", "water", "salt", "starch")),
        ("How do plants make food?", "photosynthesis", ("digestion", "erosion", "melting", "respiration")),
        ("Which part of a plant takes in water?", "roots", ("leaves", "flowers", "seeds", "fruit")),
        ("What do bees make?", "honey", ("milk", "silk", "wax paper", "sugar cane")),
        ("What do caterpillars become?", "butterflies", ("beetles", "spiders", "worms", "bees")),
        ("What do tadpoles become?", "frogs", ("fish", "snakes", "newts", "turtles")),
        ("How many legs does an insect have?", "6", ("4", "8", "10", "12")),
        ("How many legs does a spider have?", "8", ("4", "6", "10", "12")),
        ("What does a herbivore eat?", "plants", ("meat", "rocks", "insects only", "fish only")),
        ("What does a carnivore eat?", "meat", ("plants", "rocks", "seeds only", "grass")),
        ("Which animal lays eggs?", "chicken", ("cow", "dog", "cat", "horse")),
        ("What is the hardest natural material?", "diamond", ("gold", "iron", "quartz", "granite")),
        ("Which rock forms from cooled lava?", "basalt", ("chalk", "marble", "sandstone", "limestone")),
        ("What causes day and night?", "Earth spinning", ("the Moon", "clouds", "Earth orbiting", "the tides")),
        ("How long is one Earth year?", "365 days", ("24 hours", "30 days", "100 days", "7 days")),
        ("What mainly causes ocean tides?", "the Moon", ("wind", "fish", "rain", "volcanoes")),
        ("What falls as balls of ice in storms?", "hail", ("fog", "dew", "mist", "smog")),
        ("What is vapour turning to liquid?", "condensation", ("melting", "freezing", "boiling", "erosion")),
        ("What is a liquid turning to gas?", "evaporation", ("melting", "freezing", "condensation", "rusting")),
        ("What is a solid turning to liquid?", "melting", ("freezing", "boiling", "condensation", "rusting")),
        ("What forms when iron reacts with air and water?", "rust", ("salt", "sugar", "sand", "glass")),
    ]
    for q, a, wrong in facts:  # guard the bank itself
        assert len(set(wrong)) >= 3 and a not in wrong, q
    return facts


def _variants(fact: Fact, rng: random.Random, n_choices: int = 4) -> List[Tuple[str, ...]]:
    """All choice lists for a fact (3 distractors + answer, in every order), shuffled by ``rng``."""
    _, answer, wrong = fact
    out = [order for distractors in combinations(sorted(set(wrong)), n_choices - 1)
           for order in permutations(distractors + (answer,))]
    rng.shuffle(out)
    return out


REFERENCE_STYLES = ("text", "letter", "both")


def _make_example(question: str, choices: Sequence[str], answer_letter: str, meta: dict,
                  style: str = "text") -> Example:
    prompt = f"{question} {format_choices(choices)}"
    answer_text = choices[LETTERS.index(answer_letter)]
    reference = {"text": answer_text, "letter": f"Answer: {answer_letter}",
                 "both": f"{answer_text}. Answer: {answer_letter}"}[style]
    return Example(prompt, answer_letter, reference, {"choices": list(choices), **meta})


def generate_questions(seed: int, n_train: int, n_eval: int, holdout: str = "variants",
                       n_facts: Optional[int] = None, reference_style: str = "text"
                       ) -> Tuple[List[Example], List[Example]]:
    """Deterministic train/eval prompts from the bank (see the module docstring for ``holdout``).

    ``n_facts``: use only that many facts of the bank (a fixed, seed-independent subset spread over
    the topics), the task's size knob for very small models.
    """
    bank = question_bank()
    rng = random.Random(f"vrpo_fast.sciqa:{seed}")
    fact_ids = list(range(len(bank)))
    if n_facts is not None:
        if not 1 <= n_facts <= len(bank):
            raise ValueError(f"n_facts must be in [1, {len(bank)}], got {n_facts}")
        random.Random("vrpo_fast.sciqa:facts").shuffle(fact_ids)
        fact_ids = sorted(fact_ids[:n_facts])
    if holdout == "facts":
        rng.shuffle(fact_ids)
        k = max(1, min(len(bank) // 4, n_eval))
        pools = {"eval": fact_ids[:k], "train": fact_ids[k:]}
    elif holdout == "variants":
        pools = {"eval": fact_ids, "train": fact_ids}
    else:
        raise ValueError(f"holdout must be 'variants' or 'facts', got {holdout!r}")

    # one queue of (choice order) variants per fact; eval takes from the front, train from the back,
    # so the two splits never share a prompt (and with 'variants' never a distractor set + order)
    queues = {i: _variants(bank[i], random.Random(f"vrpo_fast.sciqa:{seed}:{i}")) for i in fact_ids}

    def draw(split: str, n: int, from_front: bool) -> List[Example]:
        ids, out, round_ = list(pools[split]), [], 0
        while len(out) < n:
            rng.shuffle(ids)
            progressed = False
            for i in ids:
                if len(out) >= n:
                    break
                if not queues[i]:
                    continue
                choices = queues[i].pop(0 if from_front else -1)
                question, answer, _ = bank[i]
                letter = LETTERS[choices.index(answer)]
                out.append(_make_example(question, choices, letter, {"fact": i}, reference_style))
                progressed = True
            round_ += 1
            if not progressed:
                raise ValueError(f"the question bank has only {len(out)} distinct {split} prompts; asked for {n}")
        return out

    evals = draw("eval", n_eval, True)
    train = draw("train", n_train, False)
    return train, evals


def load_sciqa_jsonl(path: str, reference_style: str = "letter") -> List[Example]:
    """``{"question", "choices", "answer"}`` per line -> examples (choices kept in the given order)."""
    examples = []
    for lineno, rec in iter_jsonl(path, required=("question", "choices", "answer")):
        question = require_str(path, lineno, rec, "question").strip()
        choices = rec["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise JsonlError(path, lineno, "'choices' must be a list of non-empty strings")
        try:
            choice_letters(len(choices))
            letter = normalize_answer_letter(rec["answer"], choices)
        except ValueError as e:
            raise JsonlError(path, lineno, str(e)) from None
        examples.append(_make_example(question, [c.strip() for c in choices], letter,
                                      {"source": str(path), "line": lineno}, reference_style))
    return examples


class SciQATask(Task):
    """Multiple-choice science questions; reward 1 if the output picks the right letter (or the
    right choice's text), see :func:`vrpo_fast.tasks.answers.extract_choice`."""

    name = "sciqa"
    reward_kind = "rule"

    @classmethod
    def default_settings(cls, **task_kwargs):
        return {"max_new_tokens": 20}  # the answer's name (at most 14 characters) + EOS

    def __init__(
        self,
        seed: int = 0,
        n_train: Optional[int] = None,
        n_eval: Optional[int] = None,
        holdout: str = "variants",
        n_facts: Optional[int] = None,
        reference_style: Optional[str] = None,
        path: Optional[str] = None,
        eval_path: Optional[str] = None,
        num_train: Optional[int] = None,
        num_eval: Optional[int] = None,
    ):
        self.seed, self.holdout, self.path, self.n_facts = int(seed), holdout, path, n_facts
        style = reference_style or ("letter" if path is not None else "text")
        if style not in REFERENCE_STYLES:
            raise ValueError(f"reference_style must be one of {REFERENCE_STYLES}, got {reference_style!r}")
        self.reference_style = style
        self._train, self._eval = build_splits(
            path=path, eval_path=eval_path, load=lambda f: load_sciqa_jsonl(f, style),
            generate=lambda nt, ne: generate_questions(self.seed, nt, ne, holdout, n_facts, style),
            n_train=n_train, n_eval=n_eval, num_train=num_train, num_eval=num_eval, seed=self.seed, default_n_eval=200,
        )

    def grade(self, example: Example, completion: str) -> float:
        return grade_choice(completion, example.answer, example.meta["choices"])

    def describe(self) -> Dict[str, object]:
        return {"task": self.name, "seed": self.seed, "holdout": self.holdout, "n_facts": self.n_facts,
                "reference_style": self.reference_style, "path": self.path,
                "n_train": len(self._train), "n_eval": len(self._eval)}


__all__ = ["SciQATask", "question_bank", "generate_questions", "load_sciqa_jsonl"]
