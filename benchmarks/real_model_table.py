"""Collect real-model runs into ``benchmarks/real_model/``: one table from their ``summary.json``, never typed.

    python benchmarks/real_model_table.py runs/real_model/vrpo-flip0.2 runs/real_model/ppo-flip0.2 ...

For each run directory it copies ``summary.json``, ``config.json`` and ``curves.png`` into
``benchmarks/real_model/<name>/`` and prints (and writes to ``benchmarks/real_model/table.md``) a table of
the held-out clean accuracy before and after RL, sampled and greedy, with binomial standard errors:
``sqrt(p (1 - p) / n)`` over the prompts x samples (samples of one prompt treated as independent, so the
sampled SE is a lower bound) and over the prompts for greedy. One seed per run: say so where it is quoted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_model")


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else math.nan


def row(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    n_prompts, samples = int(s["eval_prompts"]), int(s["eval_samples"])
    task = cfg.get("task", {})
    noise = task.get("noise_type", "none")
    out = {"name": os.path.basename(os.path.normpath(run_dir)), "algo": s["algo"], "steps": s["steps"],
           "noise": {"none": "none", "flip": f"flip {task.get('noise_rate')}",
                     "gaussian": f"gaussian {task.get('noise_std')}"}.get(noise, noise),
           "n_prompts": n_prompts, "samples": samples, "wall_min": s["wall_time_s"] / 60, "seed": s["seed"],
           "threads": cfg.get("model", {}).get("num_threads"), "precision": cfg.get("model", {}).get("mixed_precision")}
    for k, n in (("eval_clean_reward", n_prompts * samples), ("eval_greedy_reward", n_prompts)):
        for when in ("before", "after"):
            p = s.get(f"{k}_{when}")
            out[f"{k}_{when}"] = p
            out[f"{k}_{when}_se"] = standard_error(p, n) if p is not None else math.nan
    return out


def fmt(p, se) -> str:
    return "-" if p is None else f"{p:.3f} +- {se:.3f}"


def table(rows) -> str:
    lines = ["| run | algo | train noise | seed | RL steps | sampled before | sampled after | change | "
             "greedy before | greedy after | change | wall (min) |",
             "|---|---|---|---:|---:|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        ds = r["eval_clean_reward_after"] - r["eval_clean_reward_before"]
        dg = (r["eval_greedy_reward_after"] - r["eval_greedy_reward_before"]
              if r["eval_greedy_reward_after"] is not None else math.nan)
        lines.append(
            f"| {r['name']} | {r['algo']} | {r['noise']} | {r['seed']} | {r['steps']} | "
            f"{fmt(r['eval_clean_reward_before'], r['eval_clean_reward_before_se'])} | "
            f"{fmt(r['eval_clean_reward_after'], r['eval_clean_reward_after_se'])} | {ds:+.3f} | "
            f"{fmt(r['eval_greedy_reward_before'], r['eval_greedy_reward_before_se'])} | "
            f"{fmt(r['eval_greedy_reward_after'], r['eval_greedy_reward_after_se'])} | {dg:+.3f} | "
            f"{r['wall_min']:.1f} |")
    first = rows[0]
    lines += ["", f"Held-out clean accuracy on {first['n_prompts']} prompts ({first['samples']} samples each at T = 1 "
              f"for 'sampled'); +- one binomial standard error. One seed per run; each run used --num-threads "
              f"{first['threads']} and mixed precision {first['precision']}. "
              f"Machine: {machine()}."]
    return "\n".join(lines)


def _diff(a: dict, b: dict, key: str = "eval_clean_reward_after"):
    """``(a - b, SE)`` of a held-out figure; the SE of the difference takes the evaluations as independent."""
    return a[key] - b[key], math.hypot(a[key + "_se"], b[key + "_se"])


def _fmt_diff(d) -> str:
    return "-" if d is None else f"{d[0]:+.3f} +- {d[1]:.3f}"


def _fmt_mean(ds) -> str:
    """Mean over seeds of one column's differences, with their range (no interval from so few seeds)."""
    vals = [d[0] for d in ds if d is not None]
    if len(vals) < 2:
        return "-"
    return f"{sum(vals) / len(vals):+.3f} (range {min(vals):+.3f} to {max(vals):+.3f})"


def comparison(rows) -> str:
    """The issue's comparison from the table's rows, within each seed (runs of one seed are paired: same
    seed, same prompts): for each algorithm the cost of the training noise (sampled after at the noise minus
    after without it), and at each noise the other algorithms minus VRPO. A row appears only where a pair
    exists; empty when there is none."""
    by = {(r["algo"], r["noise"], r["seed"]): r for r in rows}
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    noises = list(dict.fromkeys(r["noise"] for r in rows))
    seeds = sorted(set(r["seed"] for r in rows))

    def cell(x, y):
        return _diff(by[x], by[y]) if x in by and y in by else None

    def subtable(first, columns, body):
        body = [(k, sd, cells) for k, sd, cells in body if any(c is not None for c in cells)]
        if not columns or not body:
            return []
        out = [f"| {first} | seed | " + " | ".join(columns) + " |", "|---|---:|" + "---|" * len(columns)]
        for key in dict.fromkeys(k for k, _, _ in body):
            mine = [cells for k, _, cells in body if k == key]
            out += [f"| {k} | {sd} | " + " | ".join(map(_fmt_diff, cells)) + " |" for k, sd, cells in body if k == key]
            if len(mine) > 1:
                out.append(f"| {key} | mean of {len(mine)} | " + " | ".join(_fmt_mean(col) for col in zip(*mine)) + " |")
        return out

    noisy = [n for n in noises if n != "none"]
    others = [a for a in algos if a != "vrpo"]
    tables = [
        subtable("algo", [f"{n} minus none (sampled after)" for n in noisy],
                 [(a, sd, [cell((a, n, sd), (a, "none", sd)) for n in noisy]) for a in algos for sd in seeds]),
        subtable("train noise", [f"{a} minus vrpo (sampled after)" for a in others],
                 [(n, sd, [cell((a, n, sd), ("vrpo", n, sd)) for a in others]) for n in noises for sd in seeds]),
    ]
    lines = []
    for t in tables:
        if t:
            lines += ([""] if lines else []) + t
    if lines:
        lines += ["", "Differences within a seed. +- the standard error of the difference from the two evaluations' "
                  "binomial SEs, taken as independent (the prompts are shared, so this is if anything too wide for "
                  "the evaluation noise); it leaves out run-to-run (seed) variation, which only the spread across "
                  "seeds shows."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json, config.json, curves.png)")
    args = p.parse_args(argv)
    rows = []
    for run_dir in args.runs:
        if not os.path.isfile(os.path.join(run_dir, "summary.json")):
            print(f"error: {run_dir}: no summary.json (has the run finished?)", file=sys.stderr)
            return 2
        r = row(run_dir)
        dest = os.path.join(OUT, r["name"])
        os.makedirs(dest, exist_ok=True)
        for name in ("summary.json", "config.json", "curves.png"):
            if os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy2(os.path.join(run_dir, name), os.path.join(dest, name))
        rows.append(r)
    text = table(rows)
    extra = comparison(rows)
    if extra:
        text += "\n\n" + extra
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
