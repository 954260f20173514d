"""Rule rewards: numeric answer extraction (math) and choice-letter extraction (sciqa)."""
import pytest
import torch

from vrpo_fast.tasks.answers import (
    extract_choice,
    extract_number,
    grade_choice,
    grade_number,
    normalize_answer_letter,
    parse_number,
)
from vrpo_fast.tasks.base import Example
from vrpo_fast.tasks.math import MathTask
from vrpo_fast.tasks.sciqa import SciQATask

# ---------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12", "12"),
        ("  12  \n", "12"),
        ("1,234", "1234"),
        ("1,234,567 apples", "1234567"),
        ("-5", "-5"),
        ("It is -3.", "-3"),
        ("12.0", "12"),
        ("12.50", "12.5"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("$40", "40"),
        ("The answer is 12.", "12"),
        ("The answer is: 12", "12"),
        ("answer = 7", "7"),
        ("Answer: -3.50", "-3.5"),
        ("#### 72", "72"),
        ("####72", "72"),
        ("#### 1,000", "1000"),
        ("\\boxed{42}", "42"),
        # several numbers: a final-answer marker wins, even over numbers after it
        ("3*4=12, 12+5=17. Answer: 17", "17"),
        ("The answer is 17, since 3*4=12 and 12+5=17 took 2 steps", "17"),
        ("First 5, then #### 6 and later 9", "6"),
        ("answer is 5 ... actually the answer is 8", "8"),
        # no marker: the last number
        ("I had 3 then 4 then 10", "10"),
        ("10-3=7", "7"),  # "-3" here is a minus sign between numbers, not a negative number
        ("x-3", "3"),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "no numbers here", "!!!", "answer: ?", None])
def test_extract_number_none(text):
    assert extract_number(text) is None


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("Answer: 17", "17", 1.0),
        ("17", "17.0", 1.0),
        ("17.00", "17", 1.0),
        ("1,234", "1234", 1.0),
        ("The answer is 1234.", "1,234", 1.0),
        ("-4", "-4", 1.0),
        ("4", "-4", 0.0),
        ("-4", "4", 0.0),
        ("17.5", "17", 0.0),
        ("Answer: 16", "17", 0.0),
        ("17 is wrong, the answer is 18", "17", 0.0),
        ("", "17", 0.0),
        ("garbage ###", "17", 0.0),
        ("#### 17", "17", 1.0),
    ],
)
def test_grade_number(completion, gold, expected):
    assert grade_number(completion, gold) == expected


def test_parse_number():
    assert parse_number(" 1,234.50 ") == parse_number("1234.5")
    assert parse_number("12.") == 12
    assert parse_number("abc") is None and parse_number("") is None and parse_number("1.2.3") is None


def test_math_task_reward_tensor():
    task = MathTask(n_train=5, n_eval=5)
    ex = task.eval_examples()[:4]
    completions = [ex[0].reference, f"The answer is {ex[1].answer}.", "", "Answer: 999999"]
    r = task.reward(ex, completions)
    assert r.dtype == torch.float32 and r.shape == (4,)
    assert r.tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="completions"):
        task.reward(ex, completions[:2])


def test_math_reference_always_scores_one():
    task = MathTask(n_train=300, n_eval=100, difficulty=3)
    ex = task.train_examples() + task.eval_examples()
    assert task.reward(ex, [e.reference for e in ex]).min().item() == 1.0


# ---------------------------------------------------------------------------------------------
# choices

CHOICES = ["Mars", "Jupiter", "Venus", "Earth"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        (" b ", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("b)", "B"),
        ("B.", "B"),
        ("[b]", "B"),
        ("Answer: B", "B"),
        ("answer:b", "B"),
        ("The answer is (C).", "C"),
        ("The answer is d", "D"),
        ("B) Jupiter", "B"),
        ("(B) Jupiter is the largest", "B"),
        ("Jupiter", "B"),
        ("It is jupiter!", "B"),
        ("I think Answer: A. No wait, Answer: B", "B"),  # the last marker wins
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, CHOICES) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "E",  # not one of the 4 letters
        "Answer: E",
        "A B C D",  # every letter: not an answer
        "Mars or Jupiter",  # two choices' texts: ambiguous
        "A whale is big",  # a leading article is not a letter
        "zzzz",
    ],
)
def test_extract_choice_none(text):
    assert extract_choice(text, CHOICES) is None


def test_choice_text_contained_in_another_choice():
    choices = ["oxygen", "carbon dioxide", "helium", "dioxide"]
    assert extract_choice("carbon dioxide", choices) == "B"
    assert extract_choice("dioxide", choices) == "D"


@pytest.mark.parametrize(
    "completion, expected", [("Answer: B", 1.0), ("(b)", 1.0), ("Jupiter", 1.0), ("A", 0.0), ("Mars", 0.0), ("", 0.0)]
)
def test_grade_choice(completion, expected):
    assert grade_choice(completion, "B", CHOICES) == expected


def test_normalize_answer_letter():
    assert normalize_answer_letter("b", CHOICES) == "B"
    assert normalize_answer_letter("(C)", CHOICES) == "C"
    assert normalize_answer_letter(3, CHOICES) == "D"
    assert normalize_answer_letter("venus", CHOICES) == "C"
    for bad in ["E", 4, -1, "Pluto", True, 1.5, ""]:
        with pytest.raises(ValueError):
            normalize_answer_letter(bad, CHOICES)


def test_sciqa_task_reward_tensor():
    task = SciQATask(n_train=5, n_eval=8)
    ex = task.eval_examples()[:3]
    gold_text = ex[1].meta["choices"]["ABCD".index(ex[1].answer)]
    wrong = next(letter for letter in "ABCD" if letter != ex[2].answer)
    r = task.reward(ex, [ex[0].reference, gold_text, f"Answer: {wrong}"])
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 1.0, 0.0]


def test_sciqa_reward_not_gameable_by_listing_everything():
    task = SciQATask(n_train=5, n_eval=50)
    ex = task.eval_examples()
    listing = [" ".join(e.meta["choices"]) for e in ex]
    assert task.reward(ex, listing).sum().item() == 0.0
    assert task.reward(ex, ["A B C D"] * len(ex)).sum().item() == 0.0
    assert task.reward(ex, [e.reference for e in ex]).min().item() == 1.0


def test_reward_on_examples_built_by_hand():
    ex = [Example("2+2?", "4", "Answer: 4"), Example("3-5?", "-2", "Answer: -2")]
    assert MathTask(n_train=1, n_eval=1).reward(ex, ["4", "-2.0"]).tolist() == [1.0, 1.0]
