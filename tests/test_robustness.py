"""The robustness study: the statistics against hand computations, the paired plan, resume, reports,
and a real smoke run (slow)."""
import csv
import math
import os

import pytest

from vrpo_fast.experiments import analysis as st
from vrpo_fast.experiments import robustness as rb


# ----------------------------------------------------------------------------------------------
# statistics, against values computed by hand (and tables of the t distribution)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, df, expected", [(0.975, 1, 12.7062), (0.975, 5, 2.5706), (0.975, 30, 2.0423),
                                             (0.8, 5, 0.9195), (0.995, 10, 3.1693), (0.5, 7, 0.0)])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert st.t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert st.t_cdf(st.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert st.t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)


def test_mean_ci_by_hand():
    values = [0.30, 0.34, 0.29, 0.35, 0.32, 0.31]
    m = sum(values) / 6
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / 5)
    ci = st.mean_ci(values)
    assert ci["mean"] == pytest.approx(m) and ci["sd"] == pytest.approx(sd) and ci["n"] == 6
    assert ci["half_width"] == pytest.approx(2.5706 * sd / math.sqrt(6), rel=1e-4)
    one = st.mean_ci([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["lo"])
    assert st.mean_ci([float("nan"), 0.2, 0.4])["n"] == 2  # NaN (failed) runs are left out


def test_paired_difference_mde_and_contrast_on_a_made_up_table():
    vrpo = {0: 0.40, 1: 0.35, 2: 0.38, 3: 0.42}
    ppo = {0: 0.37, 1: 0.34, 2: 0.33, 3: 0.40, 9: 0.99}  # seed 9 has no partner: left out
    d = st.paired_difference(vrpo, ppo)
    diffs = [0.03, 0.01, 0.05, 0.02]
    m = sum(diffs) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 3)
    assert d["n"] == 4 and d["mean"] == pytest.approx(m) and d["sd"] == pytest.approx(sd)
    assert d["lo"] == pytest.approx(m - 3.1824 * sd / 2, abs=1e-5)
    assert d["mde80"] == pytest.approx((3.1824 + 0.9785) * sd / 2, abs=1e-4)
    t = m / (sd / 2)
    assert d["p"] == pytest.approx(2 * (1 - st.t_cdf(t, 3)))
    assert 0.01 < d["p"] < 0.05  # t = 3.29 on 3 df
    clean_v, clean_p = {s: v - 0.01 for s, v in vrpo.items()}, dict(ppo)
    c = st.contrast(vrpo, ppo, clean_v, clean_p)
    assert c["mean"] == pytest.approx(0.01) and c["n"] == 4 and c["sd"] == pytest.approx(0.0, abs=1e-12)
    assert st.eval_standard_error(0.5, 1000, 4) == pytest.approx(math.sqrt(0.25 / 4000))
    assert st.eval_standard_error(0.5, 1000, 4, within_prompt_corr=1.0) == pytest.approx(math.sqrt(0.25 / 1000))


def test_the_standard_design_is_powered_as_the_issue_asks():
    text = rb.power_analysis(rb.STANDARD)
    se = st.eval_standard_error(0.35, 1000, 4)
    assert se < 0.01 and f"{se:.4f}" in text and "80% power" in text


# ----------------------------------------------------------------------------------------------
# the plan: paired, GRPO once per noise, every run its own directory
# ----------------------------------------------------------------------------------------------
def test_plan_of_the_standard_setting():
    runs = rb.plan(["arith"], rb.STANDARD)
    seeds, noises, lams = len(rb.STANDARD["seeds"]), len(rb.STANDARD["noises"]), len(rb.STANDARD["lams"])
    critic_arms = len(rb.ARMS) - 1
    assert len(runs) == seeds * noises * (lams * critic_arms + 1)
    assert len({rb.run_dir_name(r) for r in runs}) == len(runs)
    assert {r["arm"] for r in runs} == set(rb.ARMS) and len(rb.STANDARD["seeds"]) >= 6
    cfg = rb.run_config({"task": "math", "noise": "flip", "lam": 0.8, "arm": "vrpo-no-vib", "seed": 3}, rb.STANDARD, "o")
    assert cfg["beta"] == 0.0 and cfg["lam"] == 0.8 and cfg["noise_rate"] == 0.3 and cfg["task_kwargs"]["difficulty"] == 3
    from vrpo_fast.config import TrainConfig

    resolved = TrainConfig.from_flat(**cfg).resolved()
    assert resolved.rollout.max_new_tokens >= 40  # the long-response regime
    assert rb.noise_for("dialogue", "flip")["noise_type"] == "gaussian"
    # math's compute-limited cells: 6 seeds x (none, flip) x (2 lambdas x 2 critic arms + GRPO)
    math_runs = rb.plan(["math"], rb.STANDARD)
    assert len(math_runs) == 6 * 2 * (2 * 2 + 1) and {r["arm"] for r in math_runs} == {"vrpo", "ppo", "grpo"}
    assert {r["noise"] for r in math_runs} == {"none", "flip"} and {r["lam"] for r in math_runs} == {0.95, 0.8}
    math_cfg = rb.run_config(math_runs[0], rb.STANDARD, "o")
    assert math_cfg["steps"] == 60 and math_cfg["rollout_batch_size"] == 64 and math_cfg["num_eval"] == 1000
    # cells named on the command line win over the task's own
    given = {**rb.STANDARD, "arms": ("vrpo", "vrpo-no-vib"), "given": ["arms"]}
    assert {r["arm"] for r in rb.plan(["math"], given)} == {"vrpo", "vrpo-no-vib"}
    assert len(rb.plan(["arith", "math"], rb.STANDARD)) == len(runs) + len(math_runs)
    with pytest.raises(ValueError, match="noise must be one of"):
        rb.noise_for("math", "salt")
    with pytest.raises(ValueError, match="task must be one of"):
        rb.plan(["chess"], rb.STANDARD)


def _fake_run(calls):
    """A stand-in for run_training: VRPO gains 0.02 under noise, seeds shift every arm alike."""
    def run(cfg):
        calls.append(cfg)
        os.makedirs(cfg.run_dir(), exist_ok=True)
        noisy = cfg.task.noise_type != "none"
        gain = {"vrpo": 0.02 if noisy else 0.0}.get(cfg.algo.algo, 0.0) if cfg.algo.beta > 0 else 0.0
        after = 0.3 + 0.01 * cfg.run.seed + gain - (0.05 if noisy else 0.0)
        return {"eval_clean_reward_before": 0.25, "eval_clean_reward_after": after, "eval_greedy_reward_after": after,
                "eval_greedy_reward_before": 0.3, "steps": cfg.run.steps, "run_dir": cfg.run_dir(),
                "metrics_path": os.path.join(cfg.run_dir(), "missing.jsonl")}
    return run


def test_study_writes_csv_tables_plots_and_resumes(tmp_path):
    design = {**rb.STANDARD, "seeds": (0, 1, 2), "lams": (0.95,), "noises": ("none", "flip"),
              "arms": ("vrpo", "ppo", "grpo")}
    out, calls = str(tmp_path / "study"), []
    rows = rb.run_study(["arith"], design, out, run_fn=_fake_run(calls), log=lambda s: None)
    assert len(calls) == len(rows) == 3 * 2 * 3
    with open(os.path.join(out, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 18
    md = open(os.path.join(out, "results.md")).read()
    assert "| flip | 0.95 | vrpo - ppo | 3 | +0.020 [+0.020, +0.020]" in md  # the paired difference is exact
    assert "| flip | 0.95 | 3 | +0.020" in md  # the robustness contrast
    assert os.path.getsize(os.path.join(out, "robustness.png")) > 1000
    assert os.path.getsize(os.path.join(out, "diagnostics.png")) > 1000
    again = []
    rb.run_study(["arith"], design, out, run_fn=_fake_run(again), log=lambda s: None)
    assert again == []  # everything was in results.csv


def fake_run_picklable(cfg):
    """_fake_run at module level, so that --jobs' spawned workers can import it."""
    return _fake_run([])(cfg)


def test_parallel_jobs_give_the_same_table_as_one_job(tmp_path):
    design = {**rb.STANDARD, "seeds": (0, 1, 2), "lams": (0.95, 0.8), "noises": ("none", "flip"),
              "arms": ("vrpo", "ppo", "grpo")}
    one = rb.run_study(["arith"], design, str(tmp_path / "one"), run_fn=fake_run_picklable, log=lambda s: None)
    lines = []
    two = rb.run_study(["arith"], design, str(tmp_path / "two"), run_fn=fake_run_picklable, log=lines.append, jobs=2)
    assert len(two) == len(one) == len(rb.plan(["arith"], design)) == 3 * 2 * 5
    assert len({rb._key(r) for r in two}) == len(two)  # every run once, none lost or doubled by the lock
    with open(tmp_path / "two" / "results.csv") as f:
        assert f.read().count("task,noise,lam") == 1  # one header although several processes appended
    md = lambda d: open(tmp_path / d / "results.md").read()  # noqa: E731
    shuffled = list(reversed(rb.read_rows(str(tmp_path / "one" / "results.csv"))))
    assert rb.markdown_report(rb.canonical_order(shuffled), design) in md("one")  # finishing order does not matter
    assert md("one") == md("two") and "2 at a time" in lines[0] and "30/30 runs done" in lines[-1]
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        rb.run_study(["arith"], design, str(tmp_path / "z"), run_fn=fake_run_picklable, jobs=0)


def test_failed_runs_are_recorded_and_retried(tmp_path):
    design = {**rb.STANDARD, "seeds": (0,), "lams": (0.95,), "noises": ("flip",), "arms": ("vrpo", "ppo")}
    out, calls = str(tmp_path / "s"), []

    def flaky(cfg):
        if cfg.algo.algo == "ppo" and not calls:
            calls.append("failed")
            raise RuntimeError("boom")
        return _fake_run([])(cfg)

    rb.run_study(["arith"], design, out, run_fn=flaky, log=lambda s: None)
    rows = rb.read_rows(os.path.join(out, "results.csv"))
    assert [r["status"] for r in rows].count("ok") == 1 and "boom" in rows[-1]["status"]
    rb.run_study(["arith"], design, out, run_fn=flaky, log=lambda s: None)
    assert [r["status"] for r in rb.read_rows(os.path.join(out, "results.csv"))].count("ok") == 2


def test_bad_options_fail_before_any_run(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="--rollout-batch-size"):
        rb.run_study(["arith"], {**rb.QUICK, "seeds": (0,)}, str(tmp_path), extra={"rollout_batch_size": 7},
                     run_fn=_fake_run(calls), log=lambda s: None)
    assert calls == []


@pytest.mark.slow
def test_quick_study_runs_for_real(tmp_path):
    design = {**rb.QUICK, "seeds": (0,), "noises": ("flip",), "arms": ("vrpo", "grpo"),
              "train": {**rb.QUICK["train"], "steps": 2, "num_eval": 8, "critic_warmup_steps": 1}}
    extra = dict(tiny_hidden_size=32, tiny_layers=1, warmup_steps=3, warmup_batch_size=8, rollout_batch_size=8,
                 mini_batch_size=4, eval_batch_size=8, task_kwargs={"max_operand": 20, "num_eval": 16})
    rows = rb.run_study(["arith"], design, str(tmp_path), extra=extra, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert os.path.isdir(os.path.join(str(tmp_path), "warmups", "arith-seed0"))  # shared with the second arm
    assert all(0.0 <= float(r["eval_clean_reward_after"]) <= 1.0 for r in rows)
