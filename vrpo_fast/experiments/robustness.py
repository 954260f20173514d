"""Robustness to reward noise: VRPO vs PPO vs GRPO across tasks, noise levels and seeds.

    python -m vrpo_fast.experiments.robustness --quick            # 81 runs, < 30 min on a 2-core CPU
    python -m vrpo_fast.experiments.robustness --tasks math --algos vrpo ppo --seeds 0 1 2 3 4

For every (task, noise level, algorithm, seed) it trains in-process with the *noisy* reward
(:func:`vrpo_fast.train.run_training`) and records the *clean* reward on held-out prompts after RL.
Noise: rule-rewarded tasks (math, sciqa) flip the binary reward with probability = level; the
learned-reward task (dialogue) adds Gaussian noise with std = level * ``--gaussian-scale``.
``--noise-model bias`` instead adds a systematic length bias (+ level * normalised length) to every
task's reward: noise that is not random, and that no amount of averaging removes.

Outputs in ``--out``:
  * ``results.csv``  one row per run (appended as each run finishes, so an interrupted sweep
    resumes where it stopped: runs whose row exists are skipped);
  * ``results.md``   per task, a table of mean +- std over seeds of the held-out clean reward after
    RL, one row per noise level, one column per algorithm (best mean in bold), plus the warm-up
    policy's score (before RL) for reference;
  * ``robustness.png`` the same numbers as curves (clean reward vs noise level, error bars = std).

The supervised warm-up does not depend on the algorithm or the noise, so by default it runs once
per (task, seed) and later runs start from its saved result (``--no-share-warmup`` to redo it).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULT_TASKS = ("math", "sciqa", "dialogue")
DEFAULT_ALGOS = ("vrpo", "ppo", "grpo")
DEFAULT_LEVELS = (0.0, 0.2, 0.4)
DEFAULT_SEEDS = (0, 1, 2)

# per task: generation length that fits its reference completions, and task constructor kwargs
TASK_SETTINGS: Dict[str, Dict[str, Any]] = {
    "math": {"max_new_tokens": 32, "task_kwargs": {"difficulty": 1}},
    "sciqa": {"max_new_tokens": 20, "task_kwargs": {}},
    "dialogue": {"max_new_tokens": 40, "task_kwargs": {}},
    "arith": {"max_new_tokens": 6, "task_kwargs": {}},
}
# --quick: smaller task instances, so that the short warm-up leaves a policy RL can improve
QUICK_TASK_KWARGS: Dict[str, Dict[str, Any]] = {
    "math": {"difficulty": 0},
    "sciqa": {"n_facts": 32},
}

# the full experiment: the trainer's defaults, a larger held-out set
FULL: Dict[str, Any] = {"steps": 100, "warmup_steps": 400, "num_eval": 200}
# --quick: 81 runs in < 30 min on 2 cores, i.e. ~20 s per run with the warm-up shared per (task, seed).
# Same model and algorithms, smaller everything else.
QUICK: Dict[str, Any] = {
    "steps": 24,
    "warmup_steps": 300,
    "warmup_batch_size": 32,
    "num_eval": 48,
    "rollout_batch_size": 16,
    "mini_batch_size": 8,
    "ppo_epochs": 1,
    "group_size": 4,
    "eval_batch_size": 48,
    "lr": 2e-4,
    "critic_lr": 3e-4,
}

CSV_FIELDS = (
    "task", "algo", "noise_level", "noise_type", "noise_rate", "noise_std", "seed", "steps",
    "eval_clean_reward_before", "eval_clean_reward_after", "train_clean_reward_last", "train_noisy_reward_last",
    "wall_time_s", "status", "config_id", "run_dir",
)
RUN_KEY = ("task", "algo", "noise_level", "seed")


# ------------------------------------------------------------------------------------------------
# configuration of one run


def reward_kind(task: str) -> str:
    """"rule" or "model" for a registered task, without building it."""
    import importlib

    from vrpo_fast.tasks import TASKS

    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    module, cls = TASKS[task].split(":")
    return getattr(getattr(importlib.import_module(module), cls), "reward_kind", "rule")


NOISE_MODELS = ("auto", "bias")


def noise_for(task: str, level: float, gaussian_scale: float = 1.0, noise_model: str = "auto") -> Dict[str, Any]:
    """The trainer's noise options for ``level`` on ``task``.

    ``noise_model="auto"``: flip rate = level (rule rewards) or Gaussian std = level * gaussian_scale
    (learned rewards). ``"bias"``: the systematic length bias, + level * min(len / 64 chars, 1).
    """
    if level < 0:
        raise ValueError(f"noise levels must be >= 0, got {level}")
    if noise_model == "bias":
        reward_kind(task)  # validates the name
        return {"noise_type": "bias", "noise_rate": 0.0, "noise_std": 0.0,
                "noise_kwargs": {"bias_coef": float(level), "bias_kind": "length"}}
    if noise_model != "auto":
        raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    if reward_kind(task) == "model":
        return {"noise_type": "gaussian", "noise_rate": 0.0, "noise_std": float(level) * gaussian_scale}
    if level > 1:
        raise ValueError(f"a flip rate must be <= 1, got noise level {level} for task {task!r}")
    return {"noise_type": "flip", "noise_rate": float(level), "noise_std": 0.0}


def level_str(level: float) -> str:
    return f"{float(level):g}"


def run_overrides(task: str, algo: str, level: float, seed: int, *, out: str, quick: bool,
                  gaussian_scale: float = 1.0, extra: Optional[Dict[str, Any]] = None,
                  noise_model: str = "auto") -> Dict[str, Any]:
    """Flat :class:`~vrpo_fast.config.TrainConfig` overrides for one run."""
    settings = TASK_SETTINGS.get(task, {"max_new_tokens": 32, "task_kwargs": {}})
    task_kwargs = {**settings["task_kwargs"], **(QUICK_TASK_KWARGS.get(task, {}) if quick else {})}
    flat: Dict[str, Any] = dict(QUICK if quick else FULL)
    if task in ("math", "sciqa", "dialogue"):  # hold out only what is evaluated; the rest is training data
        task_kwargs.setdefault("n_eval", flat["num_eval"])
    flat.update(
        task=task, algo=algo, seed=int(seed), max_new_tokens=settings["max_new_tokens"],
        task_kwargs=task_kwargs, reward="rule",
        output_dir=os.path.join(out, "runs", task, f"noise{level_str(level)}", f"{algo}-seed{seed}"),
        progress=False, resume=True, save_every=0, keep_checkpoints=1,
    )
    flat.update(noise_for(task, level, gaussian_scale, noise_model))
    flat.update(extra or {})
    return flat


def config_id(flat: Dict[str, Any]) -> str:
    """Hash of everything that shapes a run except where it is written: rows with different ids
    come from different settings and must not share a table."""
    skip = {"output_dir", "resume", "progress", "save_every", "keep_checkpoints"}
    blob = json.dumps({k: v for k, v in sorted(_full_flat(flat).items()) if k not in skip}, sort_keys=True,
                      default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# options that only act after the warm-up (RL, noise, bookkeeping); every other option -- including
# ones added to the trainer later -- is assumed to shape the warm-up and its "before RL" evaluation
_RL_ONLY_FIELDS = {
    "critic", "noise_type", "noise_rate", "noise_std", "noise_kwargs", "rollout_batch_size", "temperature",
    "lr", "critic_lr", "mini_batch_size", "ppo_epochs", "grad_accum_steps", "weight_decay", "lr_schedule",
    "steps", "output_dir", "resume", "save_every", "keep_checkpoints", "progress",
}


def warmup_id(flat: Dict[str, Any]) -> str:
    """Hash of the options a run's warm-up depends on: runs with equal ids share one warm-up."""
    from vrpo_fast.config import GROUPS

    algo_fields = {f for f in GROUPS["algo"].__dataclass_fields__} if "algo" in GROUPS else set()
    relevant = {k: v for k, v in _full_flat(flat).items() if k not in _RL_ONLY_FIELDS and k not in algo_fields}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _full_flat(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``flat`` completed with the trainer's defaults (so that a default spelled out hashes the same)."""
    from vrpo_fast.config import TrainConfig

    return TrainConfig.from_flat(**flat).flat()


# ------------------------------------------------------------------------------------------------
# shared warm-up (the trainer resumes from a run directory holding the warm-up's result)


def _trainer_warmup_names() -> Optional[Tuple[str, str]]:
    try:
        from vrpo_fast.trainer import REFERENCE_DIR, WARMUP_FILE
    except ImportError:  # a trainer without resumable warm-ups: every run warms up itself
        return None
    return REFERENCE_DIR, WARMUP_FILE


def _warmup_cache(out: str, flat: Dict[str, Any]) -> str:
    return os.path.join(out, "warmups", f"{flat['task']}-seed{flat['seed']}-{warmup_id(flat)}")


def seed_run_dir_with_warmup(out: str, flat: Dict[str, Any]) -> bool:
    """Copy a cached warm-up into a fresh run directory; True if one was used."""
    names = _trainer_warmup_names()
    run_dir = flat["output_dir"]
    if names is None or os.path.exists(os.path.join(run_dir, "config.json")):
        return False  # nothing to share, or an interrupted run that resumes by itself
    ref, wfile = names
    cache = _warmup_cache(out, flat)
    if not os.path.isfile(os.path.join(cache, wfile)):
        return False
    os.makedirs(run_dir, exist_ok=True)
    if os.path.isdir(os.path.join(run_dir, ref)):
        shutil.rmtree(os.path.join(run_dir, ref))
    shutil.copytree(os.path.join(cache, ref), os.path.join(run_dir, ref))
    shutil.copy2(os.path.join(cache, wfile), os.path.join(run_dir, wfile))
    return True


def save_warmup_to_cache(out: str, flat: Dict[str, Any]) -> None:
    names = _trainer_warmup_names()
    if names is None:
        return
    ref, wfile = names
    cache, run_dir = _warmup_cache(out, flat), flat["output_dir"]
    if os.path.isfile(os.path.join(cache, wfile)) or not os.path.isfile(os.path.join(run_dir, wfile)):
        return
    tmp = cache + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(run_dir, ref), os.path.join(tmp, ref))
    shutil.copy2(os.path.join(run_dir, wfile), os.path.join(tmp, wfile))
    shutil.rmtree(cache, ignore_errors=True)
    os.rename(tmp, cache)


# ------------------------------------------------------------------------------------------------
# results file


def _key(row: Dict[str, Any]) -> Tuple[str, str, str, str]:
    return (str(row["task"]), str(row["algo"]), level_str(float(row["noise_level"])), str(int(float(row["seed"]))))


def read_rows(csv_path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(csv_path: str, row: Dict[str, Any]) -> None:
    new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def rewrite_rows(csv_path: str, rows: Sequence[Dict[str, Any]]) -> None:
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)


def _as_float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def summary_to_row(summary: Dict[str, Any], flat: Dict[str, Any], level: float, cid: str) -> Dict[str, Any]:
    train_clean = next((v for k, v in summary.items() if k.startswith("train_clean_reward_last")), math.nan)
    train_noisy = next((v for k, v in summary.items() if k.startswith("train_noisy_reward_last")), math.nan)
    return {
        "task": flat["task"], "algo": flat["algo"], "noise_level": level_str(level),
        "noise_type": flat["noise_type"], "noise_rate": flat["noise_rate"], "noise_std": flat["noise_std"],
        "seed": flat["seed"], "steps": summary.get("steps", flat.get("steps")),
        "eval_clean_reward_before": _fmt(summary.get("eval_clean_reward_before")),
        "eval_clean_reward_after": _fmt(summary.get("eval_clean_reward_after")),
        "train_clean_reward_last": _fmt(train_clean), "train_noisy_reward_last": _fmt(train_noisy),
        "wall_time_s": f"{_as_float(summary.get('wall_time_s')):.1f}", "status": "ok", "config_id": cid,
        "run_dir": summary.get("run_dir", flat["output_dir"]),
    }


def _fmt(x) -> str:
    x = _as_float(x)
    return "nan" if math.isnan(x) else f"{x:.6f}"


# ------------------------------------------------------------------------------------------------
# the sweep


def run_experiment(
    tasks: Sequence[str] = DEFAULT_TASKS,
    algos: Sequence[str] = DEFAULT_ALGOS,
    noise_levels: Sequence[float] = DEFAULT_LEVELS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out: str = "robustness",
    quick: bool = False,
    gaussian_scale: float = 1.0,
    noise_model: str = "auto",
    extra: Optional[Dict[str, Any]] = None,
    share_warmup: bool = True,
    run_fn: Optional[Callable[[Any], Dict[str, Any]]] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Run every missing (task, level, algo, seed) and write the CSV, table and plot; returns all rows.

    ``run_fn(TrainConfig) -> summary`` defaults to :func:`vrpo_fast.train.run_training`.
    """
    from vrpo_fast.config import ALGOS, TrainConfig

    if run_fn is None:
        from vrpo_fast.train import run_training as run_fn
    for a in algos:
        if a not in ALGOS:
            raise ValueError(f"algorithms must be among {ALGOS}, got {a!r}")
    for t in tasks:
        reward_kind(t)  # validates the name
    if not (tasks and algos and noise_levels and seeds):
        raise ValueError("need at least one task, algorithm, noise level and seed")
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")

    rows = read_rows(csv_path)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:  # crashed runs are retried
        rows = [r for r in rows if r.get("status") == "ok"]
        rewrite_rows(csv_path, rows)
    done = {_key(r): r for r in rows}

    # order: task -> seed -> level -> algo, so each (task, seed) warm-up is made once, early
    plan = [(t, s, lv, a) for t in tasks for s in seeds for lv in noise_levels for a in algos]
    todo = []
    for t, s, lv, a in plan:
        flat = run_overrides(t, a, lv, s, out=out, quick=quick, gaussian_scale=gaussian_scale, extra=extra,
                             noise_model=noise_model)
        cid = config_id(flat)
        key = (t, a, level_str(lv), str(int(s)))
        if key in done:
            if done[key].get("config_id") != cid:
                raise ValueError(
                    f"{csv_path} already holds run {key} made with other settings (config {done[key].get('config_id')} "
                    f"vs {cid}); use another --out to compare settings"
                )
            continue
        todo.append((flat, lv, cid))
    for flat, _, _ in todo:  # bad options fail here, before any run, not as 81 failed rows
        TrainConfig.from_flat(**flat).validate()
    log(f"[robustness] {len(plan)} runs planned, {len(plan) - len(todo)} already in {csv_path}, {len(todo)} to run")

    t_start, n_failed = time.time(), 0
    for i, (flat, level, cid) in enumerate(todo):
        shared = share_warmup and seed_run_dir_with_warmup(out, flat)
        name = f"{flat['task']} noise={level_str(level)} {flat['algo']} seed={flat['seed']}"
        t0 = time.time()
        try:
            summary = run_fn(TrainConfig.from_flat(**flat))
            row = summary_to_row(summary, flat, level, cid)
            if share_warmup:
                save_warmup_to_cache(out, flat)
        except Exception as err:  # record it, go on with the sweep; retried on the next invocation
            n_failed += 1
            traceback.print_exc()
            row = {**summary_to_row({}, flat, level, cid), "status": f"error: {type(err).__name__}: {err}"[:300],
                   "wall_time_s": f"{time.time() - t0:.1f}"}
        append_row(csv_path, row)
        rows.append(row)
        elapsed = time.time() - t_start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        log(f"[robustness] {i + 1}/{len(todo)} {name}: clean reward {row['eval_clean_reward_before']} -> "
            f"{row['eval_clean_reward_after']} ({row['status']}, {time.time() - t0:.0f}s"
            f"{', shared warm-up' if shared else ''}); elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    selected = [r for r in rows if r["task"] in tasks and r["algo"] in algos
                and level_str(float(r["noise_level"])) in {level_str(x) for x in noise_levels}
                and int(float(r["seed"])) in {int(s) for s in seeds}]
    write_reports(selected, out, algos=list(algos))
    if n_failed:
        log(f"[robustness] {n_failed} run(s) failed (status column of {csv_path}); re-run to retry them")
    return selected


# ------------------------------------------------------------------------------------------------
# reports


def _mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def aggregate(rows: Iterable[Dict[str, Any]], metric: str = "eval_clean_reward_after"):
    """{(task, level, algo): (mean, std, n_ok, n_runs)} over seeds (sample std, ddof=1)."""
    groups: Dict[Tuple[str, str, str], List[float]] = {}
    counts: Dict[Tuple[str, str, str], int] = {}
    for r in rows:
        k = (r["task"], level_str(float(r["noise_level"])), r["algo"])
        counts[k] = counts.get(k, 0) + 1
        groups.setdefault(k, [])
        if r.get("status", "ok") == "ok":
            groups[k].append(_as_float(r[metric]))
    return {k: (*_mean_std(v), counts[k]) for k, v in groups.items()}


def _noise_label(rows: Sequence[Dict[str, Any]], task: str) -> str:
    kinds = {r["noise_type"] for r in rows if r["task"] == task}
    labels = {"flip": "flip rate p", "gaussian": "Gaussian std", "bias": "length-bias coefficient"}
    return labels.get(next(iter(kinds)), "noise") if len(kinds) == 1 else "noise level"


def markdown_report(rows: Sequence[Dict[str, Any]], algos: Optional[Sequence[str]] = None) -> str:
    stats = aggregate(rows)
    before = aggregate(rows, "eval_clean_reward_before")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    algos = list(algos or dict.fromkeys(r["algo"] for r in rows))
    seeds = sorted({int(float(r["seed"])) for r in rows})
    steps = sorted({str(r["steps"]) for r in rows})
    lines = [
        "# Robustness to reward noise",
        "",
        "Held-out **clean** reward after RL with a **noisy** training reward: mean +- std over seeds "
        f"(seeds {', '.join(map(str, seeds))}; RL steps {', '.join(steps)}). Higher is better; the best mean "
        "of each row is in bold. *Warm-up* is the supervised starting policy every algorithm begins from "
        "(before RL). A cell marked (k/n) had only k of its n runs succeed.",
        "",
    ]
    for task in tasks:
        levels = sorted({level_str(float(r["noise_level"])) for r in rows if r["task"] == task}, key=float)
        lines += [f"## {task} ({_noise_label(rows, task)})", ""]
        header = ["noise"] + ["warm-up"] + algos
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for lv in levels:
            means = {a: stats.get((task, lv, a), (math.nan,) * 4)[0] for a in algos}
            finite = [m for m in means.values() if not math.isnan(m)]
            best = max(finite) if finite else None
            cells = []
            b = [before[k] for k in before if k[0] == task and k[1] == lv]
            bm = _mean_std([x[0] for x in b])[0] if b else math.nan
            cells.append("-" if math.isnan(bm) else f"{bm:.3f}")
            for a in algos:
                m, s, n_ok, n = stats.get((task, lv, a), (math.nan, math.nan, 0, 0))
                if n_ok == 0:
                    cells.append("-" if n == 0 else f"failed (0/{n})")
                    continue
                text = f"{m:.3f} +- {s:.3f}"
                if best is not None and m == best and len(finite) > 1:
                    text = f"**{text}**"
                if n_ok < n:
                    text += f" ({n_ok}/{n})"
                cells.append(text)
            lines.append(f"| {lv} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_report(rows: Sequence[Dict[str, Any]], path: str, algos: Optional[Sequence[str]] = None) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows)
    before = aggregate(rows, "eval_clean_reward_before")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return None
    algos = list(algos or dict.fromkeys(r["algo"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        levels = sorted({float(r["noise_level"]) for r in rows if r["task"] == task})
        for a in algos:
            pts = [(lv, stats[(task, level_str(lv), a)]) for lv in levels if (task, level_str(lv), a) in stats]
            pts = [(lv, m, s) for lv, (m, s, n_ok, _) in pts if n_ok > 0]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=a)
        b = [_mean_std([v[0] for k, v in before.items() if k[0] == task and k[1] == level_str(lv)])[0] for lv in levels]
        b = [x for x in b if not math.isnan(x)]
        if b:
            ax.axhline(sum(b) / len(b), color="grey", linestyle="--", linewidth=1, label="warm-up")
        ax.set_title(task)
        ax.set_xlabel(_noise_label(rows, task))
        ax.set_ylabel("held-out clean reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(rows: Sequence[Dict[str, Any]], out: str, algos: Optional[Sequence[str]] = None) -> Dict[str, str]:
    paths = {"csv": os.path.join(out, "results.csv"), "markdown": os.path.join(out, "results.md"),
             "plot": os.path.join(out, "robustness.png")}
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(rows, algos) + "\n")
    plot_report(rows, paths["plot"], algos)
    return paths


# ------------------------------------------------------------------------------------------------
# command line


def _parse_extra(items: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.replace("-", "_")] = v
    return out


def _split(values: Sequence[str]) -> List[str]:
    return [x for v in values for x in v.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vrpo_fast.experiments.robustness",
        description="Held-out clean reward of VRPO / PPO / GRPO trained with noisy rewards, per task, noise "
                    "level and seed. Writes results.csv (one row per run), results.md (mean +- std table) "
                    "and robustness.png to --out; re-running skips the runs already in results.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task families")
    p.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS), help="algorithms")
    p.add_argument("--noise-levels", nargs="+", default=[level_str(x) for x in DEFAULT_LEVELS],
                   help="flip rate for rule tasks; Gaussian std (times --gaussian-scale) for dialogue")
    p.add_argument("--seeds", nargs="+", default=[str(s) for s in DEFAULT_SEEDS], help="seeds (>= 3 for a std)")
    p.add_argument("--out", default="runs/robustness", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="small settings (fewer RL steps, smaller batches and eval set): the default 81 runs in "
                        "under 30 minutes on a 2-core CPU")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (overrides the preset)")
    p.add_argument("--noise-model", choices=NOISE_MODELS, default="auto",
                   help="auto: flip (rule rewards) / Gaussian (learned rewards); bias: systematic length bias "
                        "of coefficient = noise level, for every task")
    p.add_argument("--gaussian-scale", type=float, default=1.0,
                   help="Gaussian std = noise level x this, for learned-reward tasks (rewards are in [0, 1])")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="any other trainer option for every run, e.g. --set tiny_hidden_size=64 lr=1e-4")
    p.add_argument("--no-share-warmup", action="store_true", help="let every run do its own supervised warm-up")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md / robustness.png from the CSV")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        tasks, algos = _split(args.tasks), _split(args.algos)
        levels = [float(x) for x in _split(args.noise_levels)]
        seeds = [int(x) for x in _split(args.seeds)]
        extra = _parse_extra(args.set)
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.steps is not None:
        extra["steps"] = args.steps
    if args.report_only:
        rows = [r for r in read_rows(os.path.join(args.out, "results.csv")) if r["task"] in tasks]
        paths = write_reports(rows, args.out, algos)
        print(open(paths["markdown"]).read())
        return 0
    try:
        run_experiment(tasks, algos, levels, seeds, out=args.out, quick=args.quick, gaussian_scale=args.gaussian_scale,
                       noise_model=args.noise_model,
                       extra=extra, share_warmup=not args.no_share_warmup)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"[robustness] wrote {os.path.join(args.out, 'results.csv')}, results.md, robustness.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
