"""Does VRPO's critic regulate noise? The critic diagnostics of PPO and VRPO variants on arith, flip p = 0.3.

Design (fixed before running; see README "The critic"):

* task arith (the default job's tiny model and settings), flip noise p = 0.3, 150 RL steps, critic
  warm-up 10 steps, seeds 0 and 1 (each run does its own supervised warm-up, identical per seed);
* arms: ``ppo``; ``vrpo`` at ``--beta`` 1e-3 / 3e-3 / 1e-2 / 1e-1 (aux regress, aux heads on h; 3e-3 was
  added after a first run of this table, in which only 1e-2 had its KL in 1-5 nats/token but a lower
  ``value_clean_corr`` than PPO, while 1e-3 had the higher correlation at 6.3 nats/token); ``vrpo``
  with the aux heads on z; ``vrpo`` without aux losses; ``vrpo --aux-mode weight``; ``--aux-mode both``;
* per run, averaged over the last 20 steps: ``value_clean_corr`` (corr of the value at the first
  response state with the CLEAN reward), ``value_noisy_corr``, ``adv_clean_corr``, ``vib_kl``
  (nats/token), ``value_noise_slope``, ``aux_value_grad_ratio``; the median step time; the
  diagnostics' share of the step time; the held-out clean reward after RL;
* decisions this table makes (and README reports): the default ``--beta`` is the sweep value whose KL
  lies in 1-5 nats/token with the highest ``value_clean_corr`` (if none lies there: the one closest to
  the range); the default ``--aux-input`` / ``--aux-mode`` is the arm with the highest mean
  ``value_clean_corr``. Two seeds make these exploratory choices, not significant differences.
* targets (issue 13): VRPO's ``value_clean_corr`` >= PPO's, KL within 1-5, VRPO step time <= 1.3x
  PPO's, diagnostics <= 5% of a step.

    python benchmarks/bench_critic.py                 # the full table (~20 min on 2 cores)
    python benchmarks/bench_critic.py --quick         # 1 seed, 40 steps, 3 arms: a smoke test

Writes the markdown table to stdout (and ``--out`` as JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, markdown_table  # noqa: E402

ARMS = {
    "ppo": dict(algo="ppo"),
    "vrpo beta=1e-3": dict(algo="vrpo", beta=1e-3),
    "vrpo beta=3e-3": dict(algo="vrpo", beta=3e-3),
    "vrpo beta=1e-2": dict(algo="vrpo", beta=1e-2),
    "vrpo beta=1e-1": dict(algo="vrpo", beta=1e-1),
    "vrpo beta=1e-2 aux on z": dict(algo="vrpo", beta=1e-2, aux_input="z"),
    "vrpo beta=1e-2 no aux": dict(algo="vrpo", beta=1e-2, alpha_ent=0.0, alpha_ppl=0.0),
    "vrpo beta=1e-2 aux weight": dict(algo="vrpo", beta=1e-2, aux_mode="weight"),
    "vrpo beta=1e-2 aux both": dict(algo="vrpo", beta=1e-2, aux_mode="both"),
}
QUICK_ARMS = ("ppo", "vrpo beta=1e-3", "vrpo beta=1e-2")
KEYS = ("value_clean_corr", "value_noisy_corr", "adv_clean_corr", "vib_kl", "value_noise_slope",
        "aux_value_grad_ratio")


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def run_arm(name, overrides, seed, steps, out_dir):
    from vrpo_fast.metrics import read_metrics
    from vrpo_fast.train import TrainConfig, run_training

    cfg = TrainConfig.from_flat(noise_rate=0.3, steps=steps, seed=seed, save_every=0, progress=False,
                                output_dir=os.path.join(out_dir, f"{name.replace(' ', '_')}-s{seed}"),
                                diagnostics_every=5, **overrides)
    t0 = time.time()
    summary = run_training(cfg)
    records = read_metrics(summary["metrics_path"])
    tail = records[-20:]
    row = {k: _mean([r.get(k) for r in tail]) for k in KEYS}
    row["step_time_s"] = statistics.median(r["step_time_s"] for r in records)
    row["diag_share"] = statistics.median(r["diagnostics_time_s"] / r["step_time_s"] for r in records)
    row["eval_after"] = summary["eval_clean_reward_after"]
    row["eval_before"] = summary["eval_clean_reward_before"]
    row["wall_s"] = time.time() - t0
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the per-run rows here (JSON)")
    args = p.parse_args(argv)
    arms = {k: ARMS[k] for k in QUICK_ARMS} if args.quick else ARMS
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    steps = args.steps or (40 if args.quick else 150)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # arms interleaved within a seed: the box's load affects them alike
            for name, overrides in arms.items():
                rows.setdefault(name, []).append(run_arm(name, overrides, seed, steps, tmp))
                print(f"# {name} seed {seed}: {json.dumps(rows[name][-1])}", file=sys.stderr, flush=True)
    ppo_time = _mean([r["step_time_s"] for r in rows.get("ppo", [])])
    table = []
    for name, rs in rows.items():
        m = {k: _mean([r[k] for r in rs]) for k in rs[0]}
        table.append([name, f"{m['value_clean_corr']:.3f}", f"{m['value_noisy_corr']:.3f}",
                      f"{m['adv_clean_corr']:.3f}", f"{m['vib_kl']:.2f}", f"{m['value_noise_slope']:.4f}",
                      f"{m['aux_value_grad_ratio']:.2f}", f"{m['step_time_s']:.3f}",
                      f"{m['step_time_s'] / ppo_time:.2f}x" if ppo_time == ppo_time else "-",
                      f"{100 * m['diag_share']:.1f}%", f"{m['eval_before']:.3f} -> {m['eval_after']:.3f}"])
    print(f"critic diagnostics, arith flip p=0.3, {steps} RL steps, seeds {seeds}, last-20-step means; "
          f"{machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(markdown_table(["arm", "value_clean_corr", "value_noisy_corr", "adv_clean_corr", "VIB KL (nats/tok)",
                          "value_noise_slope", "aux/value grad", "step s (median)", "step / ppo", "diagnostics",
                          "held-out clean before -> after"], table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
