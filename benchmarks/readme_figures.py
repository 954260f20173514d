"""Rewrite README's default-job figures from real runs: never type them by hand.

    python benchmarks/readme_figures.py            # runs `python -m vrpo_fast.train` for seeds 0, 1, 2

Each seed runs the default job exactly as a user would (a subprocess, default options, a fresh output
directory); the figures between the markers ``<!-- default-job:start -->`` and
``<!-- default-job:end -->`` in README.md are replaced by seed 0's printed summary, a table of all
seeds and the machine and date. Re-run it whenever the trainer changes (CI checks the markers exist).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- default-job:start -->", "<!-- default-job:end -->"


def run_default_job(seed: int, out_dir: str) -> dict:
    run_dir = os.path.join(out_dir, f"seed{seed}")
    cmd = [sys.executable, "-m", "vrpo_fast.train", "--no-progress", "--output-dir", run_dir]
    if seed:
        cmd += ["--seed", str(seed)]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode != 0:
        raise SystemExit(f"the default job failed for seed {seed}:\n{done.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    summary["printed"] = done.stdout[done.stdout.index("==="):].rstrip() if "===" in done.stdout else done.stdout
    summary["wall_s"] = time.time() - t0
    return summary


def figures_block(summaries, command: str) -> str:
    first = summaries[0]
    printed = first["printed"].replace(first["run_dir"], "runs/arith-vrpo-seed0")
    lines = [START, "```text", f"$ {command}", printed, "```", "",
             "| seed | held-out clean (sampled) before -> after | greedy before -> after | wall time |",
             "|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['seed']} | {s['eval_clean_reward_before']:.3f} -> {s['eval_clean_reward_after']:.3f} | "
                     f"{s['eval_greedy_reward_before']:.3f} -> {s['eval_greedy_reward_after']:.3f} | "
                     f"{s['wall_s']:.0f} s |")
    lines += ["", f"*Written by `python benchmarks/readme_figures.py` on {machine()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.*", END]
    return "\n".join(lines)


def rewrite_readme(block: str, path: str = os.path.join(ROOT, "README.md")) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + block + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dry-run", action="store_true", help="print the block, leave README.md alone")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        summaries = [run_default_job(seed, tmp) for seed in args.seeds]
    block = figures_block(summaries, "python -m vrpo_fast.train")
    print(block)
    if not args.dry_run:
        rewrite_readme(block)


if __name__ == "__main__":
    main()
