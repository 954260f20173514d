"""Task families: deterministic generation, held-out splits, and loading user JSONL (incl. bad lines)."""
import json

import pytest

from vrpo_fast.tasks import get_task
from vrpo_fast.tasks.answers import extract_number
from vrpo_fast.tasks.dialogue import TOPICS, DialogueTask, all_conversations, preference_pairs
from vrpo_fast.tasks.jsonl import JsonlError
from vrpo_fast.tasks.math import ITEMS, NAMES, MathTask, generate_problem
from vrpo_fast.tasks.sciqa import SciQATask, question_bank


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# generated tasks


@pytest.mark.parametrize("name", ["math", "sciqa", "dialogue"])
def test_registry_and_determinism(name):
    a = get_task(name, seed=3, n_train=50, n_eval=20)
    b = get_task(name, seed=3, n_train=50, n_eval=20)
    c = get_task(name, seed=4, n_train=50, n_eval=20)
    assert a.name == name and a.reward_kind == ("model" if name == "dialogue" else "rule")
    assert len(a.train_examples()) == 50 and len(a.eval_examples()) == 20
    assert a.train_examples() == b.train_examples() and a.eval_examples() == b.eval_examples()
    assert a.train_examples() != c.train_examples()
    # held out: no eval prompt is a training prompt
    assert not {e.prompt for e in a.eval_examples()} & {e.prompt for e in a.train_examples()}
    assert all(e.reference for e in a.train_examples() + a.eval_examples())


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_math_generation(difficulty):
    task = MathTask(seed=0, n_train=400, n_eval=100, difficulty=difficulty)
    ex = task.train_examples() + task.eval_examples()
    limit = 80 if difficulty <= 2 else 110
    assert max(len(e.prompt) for e in ex) < limit
    for e in ex:
        # the reference chain is correct arithmetic and ends with the gold answer
        for step in e.reference.split(". Answer:")[0].split(", "):
            lhs, rhs = step.split("=")
            assert eval(lhs.replace("/", "//")) == int(rhs), e
        assert extract_number(e.reference) == e.answer
    n_steps = {0: 1, 1: 2, 2: 2, 3: 3}[difficulty]
    assert all(e.reference.count("=") == n_steps for e in ex)


def test_math_eval_problems_are_new_problems():
    """No eval problem appears in training with only the name or the item changed."""
    task = MathTask(seed=1, n_train=1500, n_eval=200)

    def skeleton(e):
        words = [("N" if w.strip(".,?") in NAMES else "I" if w.strip(".,?") in ITEMS else w) for w in e.prompt.split()]
        return " ".join(words)

    train = {skeleton(e) for e in task.train_examples()}
    assert len(train) > 500
    assert not any(skeleton(e) in train for e in task.eval_examples())


def test_math_difficulty0_holds_out_prompts():
    """One-step problems: eval prompts are unseen, their computations are not (by default)."""
    task = MathTask(seed=0, n_train=1500, n_eval=100, difficulty=0)
    train_prompts = {e.prompt for e in task.train_examples()}
    assert not any(e.prompt in train_prompts for e in task.eval_examples())
    train_chains = {e.reference for e in task.train_examples()}
    assert sum(e.reference in train_chains for e in task.eval_examples()) > 50
    strict = MathTask(seed=0, n_train=200, n_eval=50, difficulty=0, holdout="problems")
    strict_chains = {e.reference for e in strict.train_examples()}
    assert not any(e.reference in strict_chains for e in strict.eval_examples())


def test_math_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        MathTask(difficulty=7)
    with pytest.raises(ValueError, match="n_eval"):
        MathTask(n_eval=0)
    with pytest.raises(ValueError, match="too few"):
        MathTask(difficulty=0, holdout="problems", n_train=10, n_eval=2000)
    with pytest.raises(ValueError, match="holdout"):
        MathTask(holdout="everything")
    with pytest.raises(ValueError, match="path"):
        MathTask(eval_path="x.jsonl")
    import random
    with pytest.raises(ValueError, match="difficulty"):
        generate_problem(random.Random(0), difficulty=-1)


def test_sciqa_bank_and_generation():
    bank = question_bank()
    assert 60 <= len(bank) <= 150
    assert len({q for q, _, _ in bank}) == len(bank)  # no duplicate question
    task = SciQATask(seed=0, n_train=600, n_eval=150)
    ex = task.train_examples() + task.eval_examples()
    for e in ex:
        choices = e.meta["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        question, answer, _ = bank[e.meta["fact"]]
        assert e.prompt.startswith(question) and choices["ABCD".index(e.answer)] == answer
        assert e.reference == answer  # default reference style: the answer's text
    assert max(len(e.prompt) for e in ex) <= 90
    # the gold letter is spread over the positions (choices really are shuffled)
    counts = {letter: sum(e.answer == letter for e in ex) for letter in "ABCD"}
    assert min(counts.values()) > len(ex) / 8
    # every fact of the bank is used in both splits by default
    assert {e.meta["fact"] for e in task.eval_examples()} == set(range(len(bank)))


@pytest.mark.parametrize("style, example", [("text", "Jupiter"), ("letter", "Answer: B"), ("both", "Jupiter. Answer: B")])
def test_sciqa_reference_styles_and_n_facts(style, example):
    task = SciQATask(seed=0, n_train=400, n_eval=100, reference_style=style, n_facts=20)
    ex = task.train_examples() + task.eval_examples()
    assert len({e.meta["fact"] for e in ex}) == 20
    assert task.reward(ex, [e.reference for e in ex]).min().item() == 1.0  # every reference is graded correct
    e = ex[0]
    text = e.meta["choices"]["ABCD".index(e.answer)]
    expected = {"text": text, "letter": f"Answer: {e.answer}", "both": f"{text}. Answer: {e.answer}"}[style]
    assert e.reference == expected and example  # (example: the docstring's illustration of the style)
    with pytest.raises(ValueError, match="reference_style"):
        SciQATask(reference_style="essay")
    with pytest.raises(ValueError, match="n_facts"):
        SciQATask(n_facts=0)


def test_sciqa_holdout_facts():
    task = SciQATask(seed=0, n_train=300, n_eval=40, holdout="facts")
    train_facts = {e.meta["fact"] for e in task.train_examples()}
    eval_facts = {e.meta["fact"] for e in task.eval_examples()}
    assert eval_facts and not train_facts & eval_facts
    with pytest.raises(ValueError, match="holdout"):
        SciQATask(holdout="nope")


def test_dialogue_generation():
    convs = all_conversations()
    assert max(len(p) for p, _, _ in convs) <= 85
    assert any(p.count("User:") == 3 for p, _, _ in convs)  # multi-turn
    task = DialogueTask(seed=0, n_train=300, n_eval=50)
    for e in task.train_examples() + task.eval_examples():
        assert e.prompt.startswith("User: ") and e.prompt.endswith("\nBot: ")
        assert e.reference in TOPICS[e.meta["topic"]][1]
    p, c, r, kinds = preference_pairs(200, seed=0)
    assert len(p) == len(c) == len(r) == 200 and all(x != y for x, y in zip(c, r))
    assert {"rude", "off_topic", "empty", "repetitive"} <= set(kinds)


# ---------------------------------------------------------------------------------------------
# user JSONL


def test_math_gsm8k_jsonl(tmp_path):
    rows = [{"question": f"Q{i}: what is {i}+{i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i:,}"}
            for i in range(1, 1001, 100)]
    path = _write(tmp_path / "gsm.jsonl", rows[:5] + [""] + rows[5:])  # a blank line is skipped
    task = MathTask(path=path, n_eval=3, seed=0)
    train, held = task.train_examples(), task.eval_examples()
    assert len(train) == 7 and len(held) == 3
    assert {e.prompt for e in train + held} == {r["question"] for r in rows}
    e = next(x for x in train + held if x.prompt.startswith("Q901"))
    assert e.answer == "1802" and "<<" not in e.reference and e.reference.endswith("#### 1802")
    assert task.reward([e], ["so the answer is 1,802."]).item() == 1.0
    # a separate eval file
    eval_path = _write(tmp_path / "gsm_eval.jsonl", rows[:2])
    task2 = MathTask(path=path, eval_path=eval_path)
    assert len(task2.train_examples()) == 10 and len(task2.eval_examples()) == 2


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"question": "q"}', "missing key.*'answer'"),
        ('{"answer": "#### 3"}', "missing key.*'question'"),
        ('{"question": "q", "answer": "no final marker"}', "####"),
        ('{"question": "q", "answer": "#### three"}', "not a number"),
        ('{"question": 5, "answer": "#### 3"}', "'question' must be a string"),
    ],
)
def test_math_jsonl_malformed(tmp_path, bad_line, match):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = _write(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{match}") as info:
        MathTask(path=path)
    assert isinstance(info.value, JsonlError) and info.value.lineno == 3


def test_jsonl_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MathTask(path=str(tmp_path / "nope.jsonl"))
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl.*no examples"):
        SciQATask(path=empty)


def test_sciqa_jsonl(tmp_path):
    rows = [
        {"question": "Which is a gas?", "choices": ["iron", "helium", "wood"], "answer": "B"},
        {"question": "Which is a liquid?", "choices": ["milk", "salt", "ice", "sand"], "answer": 0},
        {"question": "What is H2O?", "choices": ["salt", "water"], "answer": "water"},
        {"question": "Which is red?", "choices": ["sky", "grass", "blood"], "answer": "(c)"},
    ]
    path = _write(tmp_path / "sci.jsonl", rows)
    task = SciQATask(path=path, n_eval=2, seed=1)
    ex = {e.prompt.split(" A)")[0]: e for e in task.train_examples() + task.eval_examples()}
    assert len(task.train_examples()) == 2 and len(task.eval_examples()) == 2
    assert [ex[r["question"]].answer for r in rows] == ["B", "A", "B", "C"]
    assert ex["Which is a gas?"].prompt == "Which is a gas? A) iron B) helium C) wood"
    assert ex["Which is a gas?"].meta["choices"] == ["iron", "helium", "wood"]  # user order kept
    assert ex["Which is a gas?"].reference == "Answer: B"  # user files: letter references by default
    e = ex["What is H2O?"]
    assert task.reward([e, e, e], ["B", "water", "A"]).tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "not one of the letters A, B"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
        ({"question": "q", "choices": ["a", "b"], "answer": "zebra"}, "not one of the letters"),
        ({"question": "q", "choices": ["a"], "answer": "A"}, "between 2 and"),
        ({"question": "q", "choices": "a, b", "answer": "A"}, "list of non-empty strings"),
        ({"question": "q", "choices": ["a", ""], "answer": "A"}, "list of non-empty strings"),
        ({"question": "q", "answer": "A"}, "missing key.*'choices'"),
        ({"question": "q", "choices": ["a", "b"]}, "missing key.*'answer'"),
        ("{'single': 'quotes'}", "invalid JSON"),
    ],
)
def test_sciqa_jsonl_malformed(tmp_path, bad, match):
    good = {"question": "q", "choices": ["a", "b"], "answer": "A"}
    path = _write(tmp_path / "sci_bad.jsonl", [good, good, bad])
    with pytest.raises(ValueError, match=rf"sci_bad\.jsonl:3: .*{match}"):
        SciQATask(path=path)


def test_dialogue_jsonl(tmp_path):
    rows = [{"prompt": f"User: hi {i}\nBot: ", "reference": "Hello!"} for i in range(6)] + [{"prompt": "User: yo\nBot: "}]
    path = _write(tmp_path / "dlg.jsonl", rows)
    task = DialogueTask(path=path, n_eval=2, reward_model="/nonexistent")  # the model loads lazily
    assert len(task.train_examples()) == 5 and len(task.eval_examples()) == 2
    with pytest.raises(ValueError, match=r"dlg_bad\.jsonl:2: .*missing key.*'prompt'"):
        DialogueTask(path=_write(tmp_path / "dlg_bad.jsonl", [rows[0], {"text": "x"}]))
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        task.reward(task.eval_examples(), ["hi", "hi"])
