"""The robustness experiment runner: plan, resume, failures, reports; and a real smoke run (slow)."""
import csv
import math
import os

import pytest

from vrpo_fast.experiments import robustness as rb


def _fake_run(calls):
    """A stand-in for run_training: reward falls with noise, VRPO falls least."""
    drop = {"vrpo": 0.2, "ppo": 0.5, "grpo": 0.8}

    def run(cfg):
        calls.append(cfg)
        level = cfg.task.noise_rate if cfg.task.noise_type == "flip" else cfg.task.noise_std
        os.makedirs(cfg.run_dir(), exist_ok=True)
        return {"eval_clean_reward_before": 0.3, "eval_clean_reward_after": 0.8 - drop[cfg.algo.algo] * level
                + 0.01 * cfg.run.seed, "steps": cfg.run.steps, "run_dir": cfg.run_dir(), "wall_time_s": 1.0,
                "train_clean_reward_last3": 0.5, "train_noisy_reward_last3": 0.45}

    return run


def test_noise_mapping():
    assert rb.noise_for("math", 0.2) == {"noise_type": "flip", "noise_rate": 0.2, "noise_std": 0.0}
    assert rb.noise_for("sciqa", 0.4)["noise_type"] == "flip"
    assert rb.noise_for("dialogue", 0.4, gaussian_scale=0.5) == {"noise_type": "gaussian", "noise_rate": 0.0,
                                                                  "noise_std": 0.2}
    bias = rb.noise_for("sciqa", 0.4, noise_model="bias")
    assert bias["noise_type"] == "bias" and bias["noise_kwargs"] == {"bias_coef": 0.4, "bias_kind": "length"}
    cfg = rb.run_overrides("dialogue", "ppo", 0.2, 1, out="o", quick=True, noise_model="bias")
    assert cfg["noise_type"] == "bias" and cfg["noise_kwargs"]["bias_coef"] == 0.2
    with pytest.raises(ValueError, match="noise_model"):
        rb.noise_for("math", 0.2, noise_model="salt")
    with pytest.raises(ValueError, match="flip rate"):
        rb.noise_for("math", 1.5)
    with pytest.raises(ValueError, match="task must be one of"):
        rb.noise_for("chess", 0.1)


def test_sweep_writes_csv_table_plot_and_resumes(tmp_path):
    calls = []
    out = str(tmp_path / "exp")
    kw = dict(tasks=["math", "dialogue"], algos=["vrpo", "ppo", "grpo"], noise_levels=[0.0, 0.4], seeds=[0, 1, 2],
              out=out, quick=True, run_fn=_fake_run(calls), log=lambda s: None)
    rows = rb.run_experiment(**kw)
    assert len(calls) == len(rows) == 2 * 3 * 2 * 3
    # every run got its own directory, the right noise and the quick preset
    assert len({c.run_dir() for c in calls}) == len(calls)
    dlg = [c for c in calls if c.task.task == "dialogue" and c.task.noise_std > 0]
    assert dlg and all(c.task.noise_type == "gaussian" and c.task.noise_std == 0.4 for c in dlg)
    assert all(c.run.steps == rb.QUICK["steps"] and c.rollout.max_new_tokens == rb.TASK_SETTINGS[c.task.task][
        "max_new_tokens"] for c in calls)

    with open(os.path.join(out, "results.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 36 and set(csv_rows[0]) == set(rb.CSV_FIELDS)
    md = open(os.path.join(out, "results.md")).read()
    assert "## math (flip rate p)" in md and "## dialogue (Gaussian std)" in md
    # mean +- sample std over the 3 seeds: 0.8 - 0.2*0.4 + {0, .01, .02} -> 0.730 +- 0.010, and it is the best
    assert "**0.730 +- 0.010**" in md
    assert "| 0.4 | 0.300 | **0.730 +- 0.010** | 0.610 +- 0.010 | 0.490 +- 0.010 |" in md
    assert os.path.getsize(os.path.join(out, "robustness.png")) > 1000

    # resume: nothing left to run
    calls.clear()
    rows2 = rb.run_experiment(**kw)
    assert calls == [] and len(rows2) == 36
    # a larger sweep runs only the new cells
    rb.run_experiment(**{**kw, "seeds": [0, 1, 2, 3]})
    assert len(calls) == 12 and {c.run.seed for c in calls} == {3}
    # other settings in the same output directory are refused
    with pytest.raises(ValueError, match="other settings"):
        rb.run_experiment(**{**kw, "quick": False})


def test_failed_runs_are_recorded_and_retried(tmp_path):
    out = str(tmp_path / "exp")
    calls = []
    good = _fake_run(calls)

    def flaky(cfg):
        if cfg.algo.algo == "ppo":
            raise RuntimeError("boom")
        return good(cfg)

    kw = dict(tasks=["sciqa"], algos=["vrpo", "ppo"], noise_levels=[0.2], seeds=[0, 1], out=out,
              quick=True, log=lambda s: None)
    rows = rb.run_experiment(run_fn=flaky, **kw)
    status = {(r["algo"], r["seed"]): r["status"] for r in rows}
    assert status[("vrpo", 0)] == "ok" and status[("ppo", 1)].startswith("error: RuntimeError: boom")
    md = open(os.path.join(out, "results.md")).read()
    assert "failed (0/2)" in md
    calls.clear()
    rows = rb.run_experiment(run_fn=good, **kw)  # only the failed ones run again
    assert sorted((c.algo.algo, c.run.seed) for c in calls) == [("ppo", 0), ("ppo", 1)]
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 4
    assert len(rb.read_rows(os.path.join(out, "results.csv"))) == 4


def test_bad_options_fail_before_any_run(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="unknown config option"):
        rb.run_experiment(tasks=["math"], algos=["vrpo"], noise_levels=[0.0], seeds=[0], out=str(tmp_path),
                          extra={"not_an_option": 1}, run_fn=_fake_run(calls), log=lambda s: None)
    with pytest.raises(ValueError, match="algorithms"):
        rb.run_experiment(algos=["dqn"], out=str(tmp_path), run_fn=_fake_run(calls), log=lambda s: None)
    assert calls == []
    assert rb.main(["--tasks", "math", "--algos", "vrpo", "--out", str(tmp_path), "--set", "nope=1"]) == 2


def test_aggregate_statistics():
    rows = [{"task": "math", "noise_level": "0.2", "algo": "vrpo", "eval_clean_reward_after": str(x), "status": "ok"}
            for x in (0.1, 0.2, 0.6)]
    rows.append({"task": "math", "noise_level": "0.2", "algo": "vrpo", "eval_clean_reward_after": "nan",
                 "status": "error: x"})
    m, s, n_ok, n = rb.aggregate(rows)[("math", "0.2", "vrpo")]
    assert m == pytest.approx(0.3) and s == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2))
    assert (n_ok, n) == (3, 4)


@pytest.mark.slow
def test_smoke_real_training(tmp_path):
    """1 task, 1 noise level, 2 algorithms, 1 seed, 1 RL step each, through the real trainer in-process."""
    out = str(tmp_path / "smoke")
    tiny = {"steps": 1, "warmup_steps": 3, "num_eval": 4, "rollout_batch_size": 8, "mini_batch_size": 4,
            "group_size": 2, "max_new_tokens": 6, "eval_batch_size": 4, "tiny_hidden_size": 32, "tiny_layers": 1,
            "warmup_batch_size": 8}
    lines = []
    rows = rb.run_experiment(tasks=["math"], algos=["vrpo", "grpo"], noise_levels=[0.2], seeds=[0], out=out,
                             quick=True, extra=tiny, log=lines.append)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert 0.0 <= float(r["eval_clean_reward_after"]) <= 1.0
        assert r["noise_type"] == "flip" and float(r["noise_rate"]) == 0.2
        assert os.path.isfile(os.path.join(r["run_dir"], "summary.json"))
    # the second algorithm started from the first one's warm-up
    assert "shared warm-up" not in lines[1] and "shared warm-up" in lines[2], lines
    assert rows[0]["eval_clean_reward_before"] == rows[1]["eval_clean_reward_before"]
    assert os.path.isdir(os.path.join(out, "warmups"))
    assert os.path.getsize(os.path.join(out, "robustness.png")) > 1000
    assert "| 0.2 |" in open(os.path.join(out, "results.md")).read()
