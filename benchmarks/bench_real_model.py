"""README's real-model command, shortened, as an end-to-end throughput benchmark (tokens/s).

    python benchmarks/bench_real_model.py --device cuda --steps 6        # what gpu_suite.sh runs
    python benchmarks/bench_real_model.py --device cpu --steps 2 --num-eval 8

The command is read from README.md (section "A real-model run that learns"), so this runs exactly what a
user runs, with only these changes: ``--steps`` / ``--num-eval`` / ``--eval-samples`` / ``--save-every``
shortened, ``--output-dir`` a temporary directory, ``--no-progress``, and on CUDA ``--num-threads`` dropped
and ``--no-cpu``. It runs as a subprocess (``python -m vrpo_fast.train``), then reads the run's
``metrics.jsonl``: the median step time and tokens/s over the steps after the first (the first step
compiles kernels and fills caches; its time is shown separately).

Where SmolLM2-135M-Instruct is not installed (a device machine cannot download it, and its GGUF is too
large to carry), ``--model`` becomes a **random-init model of SmolLM2-135M's exact architecture** (vocab
49152, hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, tied embeddings) with the embedded char
tokenizer padded to 49152 tokens. The per-step compute is the same shape, but a random model rarely
stops early, so its responses run to ``--max-new-tokens`` (the table reports the mean response length):
tokens/s, not accuracy, is what this measures. The table says which model ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
SECTION = "A real-model run that learns"
PREFIX = "python -m vrpo_fast.train --model smollm2-135m"
# position-table room of the random stand-in: the task's char-tokenised prompts plus the responses
STAND_IN_POSITIONS = 512


def readme_command(path: str = README) -> list:
    """The argv (after ``python -m vrpo_fast.train``) of README's documented real-model command."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find(SECTION)
    if start < 0:
        raise SystemExit(f"{path}: no section {SECTION!r}")
    for line in text[start:].splitlines():
        if line.startswith(PREFIX):
            return shlex.split(line)[3:]
    raise SystemExit(f"{path}: no line starting with {PREFIX!r} after {SECTION!r}")


def set_option(argv: list, name: str, value=None) -> list:
    """``argv`` with option ``name`` set to ``value`` (appended if absent); ``value=None`` removes it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == name:
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        out.append(argv[i])
        i += 1
    if value is not None:
        out += [name, str(value)] if value != "" else [name]
    return out


def shortened(argv: list, *, steps: int, num_eval: int, eval_samples: int, device: str, out_dir: str,
              model: str = "") -> list:
    """The README command with only the benchmark's changes (see the module docstring)."""
    for name, value in (("--steps", steps), ("--num-eval", num_eval), ("--eval-samples", eval_samples),
                        ("--save-every", steps), ("--output-dir", out_dir)):
        argv = set_option(argv, name, value)
    argv = set_option(set_option(argv, "--no-progress", ""), "--no-resume", "")
    if model:
        argv = set_option(argv, "--model", model)
    if device == "cuda":
        argv = set_option(set_option(argv, "--num-threads"), "--no-cpu", "")
    else:
        argv = set_option(argv, "--cpu", "")
    return argv


def pretrained_available() -> bool:
    from vrpo_fast.models.presets import resolve_model_source

    try:
        resolve_model_source("smollm2-135m")
        return True
    except (ImportError, FileNotFoundError) as e:  # the extra is missing: the random stand-in runs
        print(f"SmolLM2-135M-Instruct not available ({str(e).splitlines()[0][:160]}): using the random stand-in")
        return False


def build_random_smollm2(out_dir: str, seed: int = 0) -> str:
    """A random-init model of SmolLM2-135M's architecture (``bench_train_step``'s ``smollm2`` shape, built by
    its ``build_policy``), saved as a Hugging Face directory."""
    from dataclasses import replace

    from bench_train_step import CONFIGS, build_policy, build_tokenizer

    shape = CONFIGS["smollm2"]
    tok = build_tokenizer(shape.vocab_size)
    model = build_policy(replace(shape, preset="", prompt_chars=STAND_IN_POSITIONS), tok, seed=seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def summarise(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl: no RL step was recorded")
    later = rows[1:] or rows
    return {"steps": len(rows), "first_step_s": rows[0]["step_time_s"],
            "step_s": statistics.median(r["step_time_s"] for r in later),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
            "response_length": statistics.mean(r["response_length"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=6, help="RL steps (>= 2: the first is reported apart)")
    p.add_argument("--num-eval", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=1)
    p.add_argument("--random-model", action="store_true",
                   help="use the random stand-in even when SmolLM2-135M-Instruct is installed")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the training subprocess may take")
    p.add_argument("--keep", default="", help="keep the run directory here (default: a temporary one)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")

    with tempfile.TemporaryDirectory(prefix="bench_real_model_") as tmp:
        pretrained = not args.random_model and pretrained_available()
        model = "" if pretrained else build_random_smollm2(os.path.join(tmp, "smollm2-random"))
        run_dir = args.keep or os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "vrpo_fast.train"] + shortened(
            readme_command(), steps=args.steps, num_eval=args.num_eval, eval_samples=args.eval_samples,
            device=args.device, out_dir=run_dir, model=model)
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            print(f"FAILED: the training command exited with {proc.returncode}")
            return 1
        s = summarise(run_dir)
        with open(os.path.join(run_dir, "config.json")) as f:
            model_cfg = json.load(f)["model"]
        precision, threads = model_cfg["mixed_precision"], model_cfg["num_threads"]

    kind = "SmolLM2-135M-Instruct (pretrained)" if pretrained else "random-init SmolLM2-135M architecture"
    print(f"\n## README real-model command, shortened to {args.steps} steps ({args.device}; {machine()})\n")
    print(f"model: {kind}; mixed precision {precision}; the run's --num-threads {threads}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| steps | first step (s) | median step (s) | tokens/s | mean response tokens | whole command (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {s['steps']} | {s['first_step_s']:.2f} | {s['step_s']:.2f} | {s['tokens_per_s']:.0f} | "
          f"{s['response_length']:.1f} | {wall:.0f} |")
    print("\ntokens/s: the trainer's metric (prompt + response tokens of a step's rollouts per second of the whole "
          "step: generation, scoring, both updates), median over the steps after the first; the whole command "
          "includes loading and the before / after evaluations. The step against the machine's GEMM rate, "
          "phase by phase: benchmarks/bench_train_step.py.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
