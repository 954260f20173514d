"""benchmarks/real_model_answers.py: how a completion answers, and the refusal to mix settings."""
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def ans():
    return load_benchmark("real_model_answers")


@pytest.mark.parametrize("text,marker,bare", [
    ("17", False, True), (" 17.", False, True), ("-3", False, True), ("1,234", False, True),
    ("Answer: 17", True, False), ("3*4=12, 12+5=17. Answer: 17", True, False), ("#### 9", True, False),
    ("The answer is 5 pens", True, False), ("\\boxed{8}", True, False),
    ("Tom has 3 bags of 4 pens", False, False), ("", False, False), ("17 pens", False, False),
])
def test_classify(ans, text, marker, bare):
    row = ans.classify(text, ended=True, correct=False)
    assert (row["marker"], row["bare"]) == (marker, bare)


def test_stats_by_hand(ans):
    rows = [dict(correct=True, ended=True, marker=True, bare=False, tokens=4),
            dict(correct=False, ended=False, marker=False, bare=False, tokens=24),
            dict(correct=True, ended=True, marker=False, bare=True, tokens=2),
            dict(correct=False, ended=True, marker=False, bare=True, tokens=2)]
    s = ans.stats(rows)
    assert s == {"accuracy": 0.5, "ended": 0.75, "marker": 0.25, "bare": 0.5, "acc_ended": pytest.approx(2 / 3),
                 "tokens": 8.0}


def _run(name, num_eval=200, max_new=24):
    cfg = {"model": {"model": "smollm2-135m"}, "task": {"task": "math", "task_kwargs": {"difficulty": 0},
                                                         "num_eval": num_eval},
           "rollout": {"max_new_tokens": max_new}}
    return {"name": name, "cfg": cfg}


def test_runs_of_different_settings_are_refused(ans):
    ans.same_setting([_run("a"), _run("b")])
    with pytest.raises(SystemExit, match="b: model / task"):
        ans.same_setting([_run("a"), _run("b", num_eval=100)])
    with pytest.raises(SystemExit, match="c: model / task"):
        ans.same_setting([_run("a"), _run("c", max_new=32)])


def test_run_without_its_checkpoint_is_one_clear_error(ans, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "summary.json").write_text('{"checkpoint": "%s"}' % (tmp_path / "gone"))
    with pytest.raises(SystemExit, match="has no policy model"):
        ans.load_run(str(tmp_path))
