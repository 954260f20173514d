"""The robustness study: is VRPO's *clean* held-out reward higher than PPO's and GRPO's when the training
reward is noisy? A paired design with its power analysis written before any run.

    python -m vrpo_fast.experiments.robustness --tasks arith          # the standard setting on arith
    python -m vrpo_fast.experiments.robustness --quick                # a smoke test (< 30 min): NO power
    python -m vrpo_fast.experiments.robustness --power                # print the power analysis only
    python -m vrpo_fast.experiments.robustness --report-only --out D  # rebuild results.md / plots from D

Design (``STANDARD``; README "The robustness study" reports what it showed):

* **paired**: per (task, seed) one supervised warm-up shared by every arm and cell (copied into each
  run directory); every arm then sees the same prompt order, the same critic warm-up rollouts and the
  same reward-noise stream (all keyed by the seed), and is evaluated on the same held-out prompts with
  the same sampling keys. Differences between arms are taken per seed.
* **cells**: noise none / flip p = 0.3 / a systematic length bias (rule rewards; Gaussian std 0.2 for the
  learned-reward task) x GAE lambda 0.95 / 0.8 (a shorter credit horizon, where bootstrapped values
  matter more). GRPO has no critic, so it runs once per noise (lambda does not apply).
* **regime**: arith (4-token answers: lam^T ~ 0.8, a critic acts as a baseline) and math at difficulty 3
  (worked chains of 40-50 tokens: lam^T ~ 0.1 at 0.95 and ~ 1e-4 at 0.8, where the critic's
  bootstrapped values carry the advantages).
* **math's cells are compute-limited** (fixed before any math run; ``TASKS["math"]``): noise none / flip,
  both lambdas, arms vrpo / ppo / grpo, 60 steps of 64 rollouts, the same 1000 x 4 evaluation, 6 seeds
  (60 runs, ~75 min on 2 cores); the length bias and the ablations are studied on arith (162 runs).
* **arms**: vrpo, ppo, grpo and the ablations vrpo-no-vib (beta 0) and vrpo-no-aux (no auxiliary losses).
* **outcomes**: held-out clean reward after RL (primary; 1000 prompts x 4 samples), greedy held-out
  clean reward, the mean training clean reward over the run (area under the curve / steps), and the
  critic diagnostics averaged per run.
* **analysis** (written by :mod:`vrpo_fast.experiments.analysis`): per cell and arm the mean with a 95%
  t interval over seeds; the paired differences VRPO - PPO and VRPO - GRPO (and VRPO - each ablation)
  with a 95% t interval, the paired t test's p and the minimum detectable effect at 80% power from the
  observed sd; the robustness contrast (VRPO - PPO under noise minus without noise).

Outputs in ``--out``: ``results.csv`` (one row per run, appended as runs finish: an interrupted study
resumes where it stopped), ``results.md``, ``robustness.png`` (clean reward vs noise, with intervals) and
``diagnostics.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import analysis as st

ARMS: Dict[str, Dict[str, Any]] = {
    "vrpo": {"algo": "vrpo"},
    "ppo": {"algo": "ppo"},
    "grpo": {"algo": "grpo"},
    "vrpo-no-vib": {"algo": "vrpo", "beta": 0.0},
    "vrpo-no-aux": {"algo": "vrpo", "alpha_ent": 0.0, "alpha_ppl": 0.0},
}
NOISES = ("none", "flip", "bias", "gaussian")
# the learned reward (dialogue) gets Gaussian noise where rule rewards are flipped
NOISE_OPTIONS = {
    "none": {"noise_type": "none"},
    "flip": {"noise_type": "flip", "noise_rate": 0.3},
    "bias": {"noise_type": "bias", "noise_kwargs": {"bias_coef": 0.3, "bias_kind": "length"}},
    "gaussian": {"noise_type": "gaussian", "noise_std": 0.2},
}

# per task: constructor kwargs, training settings and (under "design") the task's own cells in the standard
# setting. Math's is compute-limited, fixed on 2026-12-01 before any math run of the study: a math step
# costs ~10x an arith step (40-50-token chains) and one evaluation generates 5 x n_eval chains, so the full
# arith grid (162 runs) would take ~13 h on 2 cores. Math keeps the 6 seeds, both lambdas and the flip
# cell (the long-response regime is its point) with the three main arms, 60 steps of 64 rollouts and the
# same 1000 held-out prompts x 4; the length bias and the ablations are studied on arith. "power_p" is
# the clean reward the power analysis assumes (pilots off the study's seeds: arith ~0.35 after RL, math
# ~0.12 after its warm-up).
TASKS: Dict[str, Dict[str, Any]] = {
    "arith": {"task_kwargs": {"num_eval": 1000}, "settings": {}, "power_p": 0.35},
    "math": {"task_kwargs": {"difficulty": 3, "n_eval": 1000}, "power_p": 0.15,
             "settings": {"steps": 60, "rollout_batch_size": 64, "mini_batch_size": 32},
             "design": {"noises": ("none", "flip"), "arms": ("vrpo", "ppo", "grpo")}},
    "sciqa": {"task_kwargs": {"n_eval": 400}, "settings": {"steps": 100}},
    "dialogue": {"task_kwargs": {"n_eval": 400}, "settings": {"steps": 100}},
}
STANDARD: Dict[str, Any] = {
    "seeds": (0, 1, 2, 3, 4, 5), "lams": (0.95, 0.8), "noises": ("none", "flip", "bias"),
    "arms": tuple(ARMS), "train": {"steps": 150, "num_eval": 1000, "eval_samples": 4, "save_every": 0},
    "per_task": True,  # TASKS[task]["design"] replaces these cells for that task (unless given on the command line)
}
QUICK: Dict[str, Any] = {
    "seeds": (0, 1), "lams": (0.95,), "noises": ("none", "flip"), "arms": ("vrpo", "ppo", "grpo"),
    "train": {"steps": 30, "num_eval": 96, "eval_samples": 2, "save_every": 0, "rollout_batch_size": 64,
              "mini_batch_size": 32, "critic_warmup_steps": 4},
}

CSV_FIELDS = ("task", "noise", "lam", "arm", "seed", "status", "steps", "eval_clean_reward_before",
              "eval_clean_reward_after", "eval_greedy_reward_before", "eval_greedy_reward_after", "train_clean_auc",
              "adv_clean_corr", "value_clean_corr", "value_noise_slope", "vib_kl", "wall_time_s", "run_dir")
RUN_KEY = ("task", "noise", "lam", "arm", "seed")
DIAG_KEYS = ("adv_clean_corr", "value_clean_corr", "value_noise_slope", "vib_kl")


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
def noise_for(task: str, noise: str) -> Dict[str, Any]:
    """The trainer's noise options for a cell's noise name (rule tasks are flipped, learned ones get Gaussian)."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if noise == "flip" and reward_kind(task) == "model":
        noise = "gaussian"
    return json.loads(json.dumps(NOISE_OPTIONS[noise]))  # a deep copy


def reward_kind(task: str) -> str:
    from vrpo_fast.tasks import task_class

    return getattr(task_class(task), "reward_kind", "rule")


def design_for(task: str, design: Dict[str, Any]) -> Dict[str, Any]:
    """The design one task runs: the task's own cells (standard setting) and its settings merged into "train"."""
    spec = TASKS.get(task, {})
    own = spec.get("design", {}) if design.get("per_task") else {}
    out = {**design, **{k: v for k, v in own.items() if k not in design.get("given", ())}}
    out["train"] = {**design["train"], **spec.get("settings", {})}
    out["power_p"] = spec.get("power_p", design.get("power_p", 0.35))
    return out


def plan(tasks: Sequence[str], design: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every run of the study: task -> seed -> noise -> lam -> arm (GRPO once per noise)."""
    runs = []
    for task in tasks:
        reward_kind(task)
        d = design_for(task, design)
        for seed in d["seeds"]:
            for noise in d["noises"]:
                for lam in d["lams"]:
                    for arm in d["arms"]:
                        if arm not in ARMS:
                            raise ValueError(f"arms must be among {sorted(ARMS)}, got {arm!r}")
                        if arm == "grpo" and lam != d["lams"][0]:
                            continue  # no critic: lambda does not apply
                        runs.append({"task": task, "noise": noise, "lam": float(lam), "arm": arm, "seed": int(seed)})
    return runs


def run_config(run: Dict[str, Any], design: Dict[str, Any], out: str, extra: Optional[Dict[str, Any]] = None):
    """The flat trainer options of one run."""
    task = TASKS.get(run["task"], {"task_kwargs": {}})
    flat = {**design_for(run["task"], design)["train"], **ARMS[run["arm"]], **noise_for(run["task"], run["noise"])}
    flat.update(task=run["task"], task_kwargs=dict(task["task_kwargs"]), seed=run["seed"], lam=run["lam"],
                progress=False, resume=True, output_dir=os.path.join(out, "runs", run_dir_name(run)))
    flat.update(extra or {})
    return flat


def run_dir_name(run: Dict[str, Any]) -> str:
    return f"{run['task']}/{run['noise']}-lam{run['lam']:g}/{run['arm']}-seed{run['seed']}"


def _key(row: Dict[str, Any]) -> Tuple[str, ...]:
    return (str(row["task"]), str(row["noise"]), f"{float(row['lam']):g}", str(row["arm"]), str(int(float(row["seed"]))))


# ------------------------------------------------------------------------------------------------
# shared warm-up per (task, seed)
# ------------------------------------------------------------------------------------------------
def _warmup_cache(out: str, run: Dict[str, Any]) -> str:
    return os.path.join(out, "warmups", f"{run['task']}-seed{run['seed']}")


def seed_with_warmup(out: str, run: Dict[str, Any], flat: Dict[str, Any]) -> bool:
    """Copy the (task, seed) warm-up into a fresh run directory; True if one was there to share."""
    from vrpo_fast.setup_run import REFERENCE_DIR, WARMUP_FILE

    cache, run_dir = _warmup_cache(out, run), flat["output_dir"]
    if os.path.exists(os.path.join(run_dir, "config.json")) or not os.path.isfile(os.path.join(cache, WARMUP_FILE)):
        return False
    os.makedirs(run_dir, exist_ok=True)
    shutil.rmtree(os.path.join(run_dir, REFERENCE_DIR), ignore_errors=True)
    shutil.copytree(os.path.join(cache, REFERENCE_DIR), os.path.join(run_dir, REFERENCE_DIR))
    shutil.copy2(os.path.join(cache, WARMUP_FILE), os.path.join(run_dir, WARMUP_FILE))
    return True


def save_warmup(out: str, run: Dict[str, Any], flat: Dict[str, Any]) -> None:
    from vrpo_fast.setup_run import REFERENCE_DIR, WARMUP_FILE

    cache, run_dir = _warmup_cache(out, run), flat["output_dir"]
    if os.path.isfile(os.path.join(cache, WARMUP_FILE)) or not os.path.isfile(os.path.join(run_dir, WARMUP_FILE)):
        return
    tmp = cache + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(run_dir, REFERENCE_DIR), os.path.join(tmp, REFERENCE_DIR))
    shutil.copy2(os.path.join(run_dir, WARMUP_FILE), os.path.join(tmp, WARMUP_FILE))
    os.replace(tmp, cache)


# ------------------------------------------------------------------------------------------------
# results file
# ------------------------------------------------------------------------------------------------
def read_rows(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def study_rows(out: str, tasks: Sequence[str]) -> List[Dict[str, Any]]:
    """The finished (status ok) rows of ``tasks`` in ``out/results.csv``: what the reports are made of."""
    return [r for r in read_rows(os.path.join(out, "results.csv")) if r["task"] in tasks and r.get("status") == "ok"]


def append_row(path: str, row: Dict[str, Any]) -> None:
    """Append one run's row; safe when several ``--jobs`` workers finish at once (an exclusive lock)."""
    import fcntl

    with open(path, "a", newline="") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if os.fstat(f.fileno()).st_size == 0:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def summary_row(run: Dict[str, Any], summary: Dict[str, Any], wall: float) -> Dict[str, Any]:
    from vrpo_fast.metrics import read_metrics

    records = read_metrics(summary["metrics_path"]) if os.path.exists(summary.get("metrics_path", "")) else []
    row = {**run, "status": "ok", "steps": summary.get("steps"), "wall_time_s": f"{wall:.1f}",
           "run_dir": summary.get("run_dir")}
    for k in ("eval_clean_reward_before", "eval_clean_reward_after", "eval_greedy_reward_before",
              "eval_greedy_reward_after"):
        row[k] = _fmt(summary.get(k))
    row["train_clean_auc"] = _fmt(_mean(r.get("clean_reward") for r in records))
    for k in DIAG_KEYS:
        row[k] = _fmt(_mean(r.get(k) for r in records))
    return row


def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else math.nan


def _fmt(x) -> str:
    x = st.optional(x)
    return "nan" if math.isnan(x) else f"{x:.6f}"


# ------------------------------------------------------------------------------------------------
# running it
# ------------------------------------------------------------------------------------------------
def run_study(tasks: Sequence[str], design: Dict[str, Any], out: str, *, extra: Optional[Dict[str, Any]] = None,
              run_fn: Optional[Callable[[Any], Dict[str, Any]]] = None, log: Callable[[str], None] = print,
              jobs: int = 1) -> List[Dict[str, Any]]:
    """Run every planned run not yet in ``out/results.csv`` (failed ones are retried), then write the reports.

    ``jobs`` > 1 runs that many (task, seed) groups at once, each in its own process (a group's runs share
    its warm-up, so they run in order); ``run_fn`` must then be picklable (a module-level function).
    """
    from vrpo_fast.config import TrainConfig

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    done = {_key(r) for r in read_rows(csv_path) if r.get("status") == "ok"}
    runs = plan(tasks, design)
    todo = [r for r in runs if _key({k: str(v) for k, v in r.items()}) not in done]
    for r in todo:  # bad options fail here, before any run
        TrainConfig.from_flat(**run_config(r, design, out, extra)).validate()
    log(f"[robustness] {len(runs)} runs planned, {len(runs) - len(todo)} already in {csv_path}, {len(todo)} to run"
        + (f", {jobs} at a time" if jobs > 1 else ""))
    groups: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for r in todo:
        groups.setdefault((r["task"], r["seed"]), []).append(r)
    t_start, finished = time.time(), 0

    def progress(n: int) -> None:
        nonlocal finished
        finished += n
        eta = (time.time() - t_start) / finished * (len(todo) - finished)
        log(f"[robustness] {finished}/{len(todo)} runs done; ETA {eta / 60:.1f} min")

    if jobs == 1:
        for group in groups.values():
            for run in group:
                _run_one(run, design, out, extra, run_fn, log)
                progress(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_group, g, design, out, extra, run_fn): len(g) for g in groups.values()}
            for future in as_completed(futures):
                future.result()
                progress(futures[future])
    selected = study_rows(out, tasks)
    write_reports(selected, out, design)
    return selected


def _run_group(group, design, out, extra, run_fn) -> None:
    """One (task, seed) group in a worker process, in order (the first run writes the shared warm-up)."""
    for run in group:
        _run_one(run, design, out, extra, run_fn, lambda line: print(line, flush=True))


def _run_one(run, design, out, extra, run_fn, log) -> Dict[str, Any]:
    """One run: seeded with its (task, seed) warm-up when there is one; its row appended to results.csv."""
    from vrpo_fast.config import TrainConfig

    if run_fn is None:
        from vrpo_fast.train import run_training as run_fn
    flat = run_config(run, design, out, extra)
    shared = seed_with_warmup(out, run, flat)
    t0 = time.time()
    try:
        summary = run_fn(TrainConfig.from_flat(**flat))
        row = summary_row(run, summary, time.time() - t0)
        save_warmup(out, run, flat)
    except Exception as err:  # recorded, retried on the next invocation
        traceback.print_exc()
        row = {**run, "status": f"error: {type(err).__name__}: {err}"[:300], "wall_time_s": f"{time.time() - t0:.1f}"}
    append_row(os.path.join(out, "results.csv"), row)
    log(f"[robustness] {run_dir_name(run)}: {row.get('eval_clean_reward_before')} -> "
        f"{row.get('eval_clean_reward_after')} ({row['status']}, {time.time() - t0:.0f}s"
        f"{', shared warm-up' if shared else ''})")
    return row


# ------------------------------------------------------------------------------------------------
# the analysis and its reports
# ------------------------------------------------------------------------------------------------
def power_analysis(design: Dict[str, Any], sd_diff: float = 0.02, p: Optional[float] = None) -> str:
    """The study's power, stated before it runs (markdown); ``p``: the clean reward assumed (default: the design's)."""
    p = design.get("power_p", 0.35) if p is None else p
    train = design["train"]
    n_eval, samples, n = train["num_eval"], train["eval_samples"], len(design["seeds"])
    se_run = st.eval_standard_error(p, n_eval, samples)
    se_pair = math.sqrt(2) * se_run  # independent eval noise per arm: an upper bound (shared keys correlate them)
    mde = st.minimum_detectable_effect(sd_diff, n)
    return "\n".join([
        "### Power (written before the runs)",
        "",
        f"* held-out evaluation: {n_eval} prompts x {samples} samples; at a clean reward of ~{p:.2f} one run's "
        f"standard error is {se_run:.4f} (binomial, samples of a prompt treated as independent), a paired "
        f"difference's at most {se_pair:.4f} (the arms share sampling keys, which correlates their errors);",
        f"* {n} seeds per cell; the per-seed difference between two arms also varies with the seed (training "
        f"noise). Assuming its sd is {sd_diff:.3f} (the one-seed pilot's paired eval error was ~0.005; seed-to-"
        f"seed variation is the larger, unknown part), a paired t test at alpha 0.05 detects a true difference "
        f"of {mde:.3f} with 80% power. The tables report the MDE again from the sd actually observed.",
        "",
    ])


def _stats_by_cell(rows, metric="eval_clean_reward_after"):
    out = {}
    for task, noise, lam, arm in st.cells(rows, ("task", "noise", "lam", "arm")):
        values = st.by_seed(rows, metric, task=task, noise=noise, lam=lam, arm=arm)
        out[(task, noise, lam, arm)] = values
    return out


def _arm_values(by_cell, task, noise, lam, arm):
    """An arm's per-seed values in a cell ({} if none). GRPO's runs are at the first lambda only: they
    serve every lambda's comparison."""
    if (task, noise, lam, arm) in by_cell or arm != "grpo":
        return by_cell.get((task, noise, lam, arm), {})
    return next((v for (t, n, _, a), v in by_cell.items() if t == task and n == noise and a == "grpo"), {})


def markdown_report(rows: Sequence[Dict[str, Any]], design: Dict[str, Any]) -> str:
    by_cell = _stats_by_cell(rows)
    greedy = _stats_by_cell(rows, "eval_greedy_reward_after")
    lines = ["# Robustness study", "",
             f"Held-out **clean** reward after RL with a noisy training reward; mean and 95% t interval over seeds "
             f"(seeds {sorted({int(float(r['seed'])) for r in rows})}). Differences are paired by seed "
             f"(shared warm-up, prompts, noise stream and eval keys).", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"## {task}", "", power_analysis(design_for(task, design)).replace("### Power", f"### {task}: power"),
                  "| noise | lam | arm | n | clean after RL | greedy after RL | warm-up |",
                  "|---|---|---|---:|---|---|---|"]
        for (t, noise, lam, arm), values in by_cell.items():
            if t != task:
                continue
            before = st.by_seed(rows, "eval_clean_reward_before", task=t, noise=noise, lam=lam, arm=arm)
            lines.append(f"| {noise} | {lam} | {arm} | {len(values)} | {st.fmt_ci(st.mean_ci(values.values()))} | "
                         f"{st.fmt_ci(st.mean_ci(greedy.get((t, noise, lam, arm), {}).values()))} | "
                         f"{st.fmt_ci(st.mean_ci(before.values()))} |")
        lines += ["", "Paired differences (per seed, then mean [95% CI]; p: paired t test; MDE: minimum "
                  "detectable effect at 80% power from the observed sd):", "",
                  "| noise | lam | comparison | n | difference | p | MDE80 |", "|---|---|---|---:|---|---:|---:|"]
        lines += _difference_rows(by_cell, task)
        lines += ["", "Robustness contrast, (VRPO - PPO under noise) - (VRPO - PPO without noise):", "",
                  "| noise | lam | n | contrast | p |", "|---|---|---:|---|---:|"]
        lines += _contrast_rows(by_cell, task)
        lines += ["", "Secondary outcomes, paired by seed: greedy held-out clean reward and the training clean "
                  "reward's area under the curve (mean over the RL steps):", "",
                  "| noise | lam | comparison | greedy difference | p | train AUC difference | p |",
                  "|---|---|---|---|---:|---|---:|"]
        lines += _secondary_rows(rows, greedy, task)
        lines += ["", "Mechanism diagnostics, mean over each run's steps, then mean [95% CI] over seeds:", "",
                  "| noise | lam | arm | " + " | ".join(DIAG_KEYS) + " |", "|---|---|---|" + "---|" * len(DIAG_KEYS)]
        lines += _diagnostic_rows(rows, task)
        lines.append("")
    return "\n".join(lines)


def _secondary_rows(rows, greedy, task) -> List[str]:
    auc = _stats_by_cell(rows, "train_clean_auc")
    out = []
    for (t, noise, lam, arm), vrpo_g in greedy.items():
        if t != task or arm != "vrpo":
            continue
        for other in ("ppo", "grpo"):
            g, a = _arm_values(greedy, t, noise, lam, other), _arm_values(auc, t, noise, lam, other)
            if not g or not a:
                continue
            dg, da = st.paired_difference(vrpo_g, g), st.paired_difference(auc[(t, noise, lam, arm)], a)
            out.append(f"| {noise} | {lam} | vrpo - {other} | {st.fmt_ci({**dg, 'signed': True})} | {dg['p']:.3f} | "
                       f"{st.fmt_ci({**da, 'signed': True})} | {da['p']:.3f} |")
    return out


def _diagnostic_rows(rows, task) -> List[str]:
    per_metric = {k: _stats_by_cell(rows, k) for k in DIAG_KEYS}
    out = []
    for (t, noise, lam, arm) in per_metric[DIAG_KEYS[0]]:
        if t != task:
            continue
        cells = [st.fmt_ci(st.mean_ci(per_metric[k][(t, noise, lam, arm)].values())) for k in DIAG_KEYS]
        out.append(f"| {noise} | {lam} | {arm} | " + " | ".join(cells) + " |")
    return out


def _difference_rows(by_cell, task) -> List[str]:
    out = []
    for (t, noise, lam, arm), vrpo in by_cell.items():
        if t != task or arm != "vrpo":
            continue
        for other in ("ppo", "grpo", "vrpo-no-vib", "vrpo-no-aux"):
            b = _arm_values(by_cell, t, noise, lam, other)
            if not b:
                continue
            d = st.paired_difference(vrpo, b)
            out.append(f"| {noise} | {lam} | vrpo - {other} | {d['n']} | {st.fmt_ci({**d, 'signed': True})} | "
                       f"{d['p']:.3f} | {d['mde80']:.3f} |")
    return out


def _contrast_rows(by_cell, task) -> List[str]:
    out = []
    for (t, noise, lam, arm), vrpo in by_cell.items():
        if t != task or arm != "vrpo" or noise == "none":
            continue
        ppo, v0, p0 = by_cell.get((t, noise, lam, "ppo")), by_cell.get((t, "none", lam, "vrpo")), \
            by_cell.get((t, "none", lam, "ppo"))
        if ppo and v0 and p0:
            c = st.contrast(vrpo, ppo, v0, p0)
            out.append(f"| {noise} | {lam} | {c['n']} | {st.fmt_ci({**c, 'signed': True})} | {c['p']:.3f} |")
    return out


def plot_reports(rows: Sequence[Dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return
    for metrics, name in ((("eval_clean_reward_after", "differences"), "robustness.png"), (DIAG_KEYS, "diagnostics.png")):
        fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(5 * len(tasks), 3.6 * len(metrics)), squeeze=False)
        for j, task in enumerate(tasks):
            for i, metric in enumerate(metrics):
                ax = axes[i][j]
                if metric == "differences":
                    _plot_differences(ax, [r for r in rows if r["task"] == task], task)
                    continue
                by_cell = _stats_by_cell([r for r in rows if r["task"] == task], metric)
                labels = sorted({(lam, arm) for (_, _, lam, arm) in by_cell})
                noises = list(dict.fromkeys(n for (_, n, _, _) in by_cell))
                for lam, arm in labels:
                    pts = [(k, st.mean_ci(by_cell[(task, n, lam, arm)].values())) for k, n in enumerate(noises)
                           if (task, n, lam, arm) in by_cell]
                    pts = [(k, s) for k, s in pts if math.isfinite(s["mean"])]
                    if pts:
                        ax.errorbar([k for k, _ in pts], [s["mean"] for _, s in pts],
                                    yerr=[0 if not math.isfinite(s["half_width"]) else s["half_width"] for _, s in pts],
                                    marker="o", capsize=3, label=f"{arm} (lam {lam})")
                ax.set_xticks(range(len(noises)), noises)
                ax.set_title(f"{task}: {metric}")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)


def _plot_differences(ax, rows, task) -> None:
    """Paired differences VRPO - PPO / GRPO (mean, 95% t interval over seeds) against the noise, per lambda."""
    by_cell = _stats_by_cell(rows)
    noises = list(dict.fromkeys(n for (_, n, _, _) in by_cell))
    lams = sorted({lam for (_, _, lam, arm) in by_cell if arm == "vrpo"}, reverse=True)
    series = [(other, lam) for other in ("ppo", "grpo") for lam in lams]
    for s_i, (other, lam) in enumerate(series):
        xs, ys, hw = [], [], []
        for k, noise in enumerate(noises):
            vrpo = by_cell.get((task, noise, lam, "vrpo"))
            b = _arm_values(by_cell, task, noise, lam, other)
            if vrpo and b:
                d = st.paired_difference(vrpo, b)
                if math.isfinite(d["mean"]):
                    xs.append(k + 0.06 * (s_i - (len(series) - 1) / 2))
                    ys.append(d["mean"])
                    hw.append(d["half_width"] if math.isfinite(d["half_width"]) else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=hw, marker="o", capsize=3, linestyle="none", label=f"vrpo - {other} (lam {lam})")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(noises)), noises)
    ax.set_title(f"{task}: paired difference in clean reward (95% CI)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def canonical_order(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows in the plan's order (task, noise, lambda high to low, arm, seed), however runs finished."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    arms = list(ARMS)

    def key(r):
        return (tasks.index(r["task"]), NOISES.index(r["noise"]) if r["noise"] in NOISES else len(NOISES),
                -float(r["lam"]), arms.index(r["arm"]) if r["arm"] in arms else len(arms), int(float(r["seed"])))
    return sorted(rows, key=key)


def write_reports(rows: Sequence[Dict[str, Any]], out: str, design: Dict[str, Any]) -> str:
    rows = canonical_order(rows)
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write(markdown_report(rows, design) + "\n")
    plot_reports(rows, out)
    return path


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _parse_set(items: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.replace("-", "_")] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrpo_fast.experiments.robustness",
                                description="The paired robustness study (see the module docstring).")
    p.add_argument("--tasks", nargs="+", default=["arith", "math"], help="task families")
    p.add_argument("--out", default="runs/robustness", help="output directory (resumes what it holds)")
    p.add_argument("--quick", action="store_true", help="a smoke test (2 seeds, 30 steps, 3 arms): it has NO power")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="override the design's seeds")
    p.add_argument("--arms", nargs="+", default=None, help=f"override the design's arms ({', '.join(ARMS)})")
    p.add_argument("--noises", nargs="+", default=None, help=f"override the design's noises ({', '.join(NOISES)})")
    p.add_argument("--lams", nargs="+", type=float, default=None, help="override the design's GAE lambdas")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any trainer option for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (a (task, seed) group "
                                                       "per process; the tiny model uses 1 thread per run)")
    p.add_argument("--power", action="store_true", help="print the power analysis and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild results.md and the plots from results.csv")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    design = json.loads(json.dumps(QUICK if args.quick else STANDARD))
    for name in ("seeds", "arms", "noises", "lams"):
        if getattr(args, name) is not None:
            design[name] = getattr(args, name)
            design.setdefault("given", []).append(name)
    if args.quick:
        print("[robustness] --quick is a smoke test of the pipeline: too few seeds and prompts to detect any effect")
    if args.power:
        print("\n".join(f"## {t}\n\n{power_analysis(design_for(t, design))}" for t in args.tasks))
        return 0
    try:
        extra = _parse_set(args.set)
        if args.report_only:
            print(open(write_reports(study_rows(args.out, args.tasks), args.out, design)).read())
            return 0
        run_study(args.tasks, design, args.out, extra=extra, jobs=args.jobs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
