"""benchmarks/real_model_table.py: the real-model table comes from the runs' files, with correct SEs."""
import json
import math
import os

import pytest

from conftest import load_benchmark


@pytest.fixture()
def table_mod(tmp_path, monkeypatch):
    mod = load_benchmark("real_model_table")
    monkeypatch.setattr(mod, "OUT", str(tmp_path / "out"))
    return mod


def _fake_run(path, algo, noise, before, after, g_before, g_after, seed=0):
    os.makedirs(path)
    summary = {"algo": algo, "steps": 150, "eval_prompts": 200, "eval_samples": 4, "wall_time_s": 2400.0, "seed": seed,
               "eval_clean_reward_before": before, "eval_clean_reward_after": after,
               "eval_greedy_reward_before": g_before, "eval_greedy_reward_after": g_after}
    task = {"noise_type": noise, "noise_rate": 0.2 if noise == "flip" else 0.0, "noise_std": 0.0}
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"task": task}, f)
    with open(os.path.join(path, "curves.png"), "wb") as f:
        f.write(b"png")


def test_table_values_and_copies(table_mod, tmp_path, capsys):
    _fake_run(str(tmp_path / "vrpo-flip0.2"), "vrpo", "flip", 0.125, 0.25, 0.35, 0.4)
    _fake_run(str(tmp_path / "ppo-none"), "ppo", "none", 0.125, 0.2, 0.35, 0.3)
    assert table_mod.main([str(tmp_path / "vrpo-flip0.2"), str(tmp_path / "ppo-none")]) == 0
    text = capsys.readouterr().out
    se = math.sqrt(0.125 * 0.875 / 800)  # 200 prompts x 4 samples
    se_greedy = math.sqrt(0.35 * 0.65 / 200)
    assert f"| vrpo-flip0.2 | vrpo | flip 0.2 | 0 | 150 | 0.125 +- {se:.3f} | 0.250 +- {math.sqrt(0.25 * 0.75 / 800):.3f} " \
           f"| +0.125 | 0.350 +- {se_greedy:.3f} |" in text
    assert "| ppo-none | ppo | none |" in text and "| -0.050 | 40.0 |" in text
    assert open(tmp_path / "out" / "table.md").read().strip() == text.strip()
    assert os.path.isfile(tmp_path / "out" / "vrpo-flip0.2" / "curves.png")


def test_unfinished_run_is_one_line(table_mod, tmp_path, capsys):
    os.makedirs(tmp_path / "running")
    assert table_mod.main([str(tmp_path / "running")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def se(p):
    """The binomial SE of a sampled accuracy over the fake runs' 200 prompts x 4 samples."""
    return math.sqrt(p * (1 - p) / 800)


def _table_of(table_mod, tmp_path, capsys, runs) -> str:
    """What main() prints for fake runs ``{name: (algo, noise, sampled after, seed)}``."""
    for name, (algo, noise, after, seed) in runs.items():
        _fake_run(str(tmp_path / name), algo, noise, 0.125, after, 0.35, 0.4, seed=seed)
    assert table_mod.main([str(tmp_path / n) for n in runs]) == 0
    return capsys.readouterr().out


def test_comparison_differences_by_hand(table_mod, tmp_path, capsys):
    text = _table_of(table_mod, tmp_path, capsys, {
        "vrpo-none": ("vrpo", "none", 0.5, 0), "vrpo-flip0.2": ("vrpo", "flip", 0.375, 0),
        "ppo-none": ("ppo", "none", 0.625, 0), "ppo-flip0.2": ("ppo", "flip", 0.25, 0),
        "grpo-flip0.2": ("grpo", "flip", 0.125, 0)})
    # noise cost per algorithm; grpo has no noise-free run
    assert f"| vrpo | 0 | -0.125 +- {math.hypot(se(0.375), se(0.5)):.3f} |" in text
    assert f"| ppo | 0 | -0.375 +- {math.hypot(se(0.25), se(0.625)):.3f} |" in text
    assert "| grpo |" not in text.split("minus none")[1].split("minus vrpo")[0]  # no noise-free grpo run
    # others minus VRPO at each noise
    assert f"| none | 0 | +0.125 +- {math.hypot(se(0.625), se(0.5)):.3f} | - |" in text
    assert (f"| flip 0.2 | 0 | -0.125 +- {math.hypot(se(0.25), se(0.375)):.3f} | "
            f"-0.250 +- {math.hypot(se(0.125), se(0.375)):.3f} |") in text


def test_no_comparison_without_pairs(table_mod, tmp_path, capsys):
    _fake_run(str(tmp_path / "vrpo-flip0.2"), "vrpo", "flip", 0.125, 0.25, 0.35, 0.4)
    assert table_mod.main([str(tmp_path / "vrpo-flip0.2")]) == 0
    assert "minus" not in capsys.readouterr().out


def test_comparison_pairs_within_a_seed(table_mod, tmp_path, capsys):
    # seed 1 has VRPO and PPO under flips only: a minus-VRPO row for it, no noise-cost row
    text = _table_of(table_mod, tmp_path, capsys, {
        "vrpo-none": ("vrpo", "none", 0.5, 0), "vrpo-flip": ("vrpo", "flip", 0.375, 0),
        "ppo-flip": ("ppo", "flip", 0.25, 0), "vrpo-flip-s1": ("vrpo", "flip", 0.5, 1),
        "ppo-flip-s1": ("ppo", "flip", 0.625, 1)})
    assert f"| flip 0.2 | 0 | -0.125 +- {math.hypot(se(0.25), se(0.375)):.3f} |" in text
    assert f"| flip 0.2 | 1 | +0.125 +- {math.hypot(se(0.625), se(0.5)):.3f} |" in text
    noise_cost = text.split("minus none")[1].split("minus vrpo")[0]
    assert f"| vrpo | 0 | -0.125 +- {math.hypot(se(0.375), se(0.5)):.3f} |" in noise_cost
    assert "| vrpo | 1 |" not in noise_cost and "| ppo |" not in noise_cost
    assert "| none |" not in text.split("minus vrpo")[1]  # no noise-free PPO run: no row
    assert "| flip 0.2 | mean of 2 | +0.000 (range -0.125 to +0.125) |" in text
