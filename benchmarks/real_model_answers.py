"""What the real-model runs learned: the greedy answers of the starting model and of each run's final policy.

    python benchmarks/real_model_answers.py runs/real_model/vrpo-flip0.2 runs/real_model/ppo-flip0.2 ...

For the held-out prompts of the runs' task (the same ``--num-eval`` prompts the trainer scored), it decodes
greedily, as the trainer's greedy evaluation does (``vrpo_fast.rollout.generate`` at temperature 0, the run's
``--max-new-tokens``, bf16 autocast with fp32 attention where the run used bf16), first with the starting
model (``--model`` of the first run) and then with each run's last checkpoint, and splits each model's
accuracy into *how* it answers (the prompts go in batches of the run's ``--eval-batch-size``, as in the
trainer):

* ``ended``: the completion ended with EOS inside ``--max-new-tokens`` (else it was cut off);
* ``marker``: it states its answer with a final-answer marker ("Answer: 12", "#### 12", ...); without one,
  the grader takes the last number in the text;
* ``bare number``: the whole completion is one number;
* accuracy among the completions that ended, and the mean length in tokens.

It writes ``benchmarks/real_model/answers.md`` (the table, plus each model's first three completions) and
checks its accuracies against the runs' own ``eval_greedy_reward_before`` / ``_after`` (``summary.json``):
the two are the same computation in the same batches, so they should agree exactly (a difference means the
checkpoint or the settings are not what the run evaluated).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_model", "answers.md")
BARE_NUMBER = re.compile(r"\s*[-+]?\$?\d[\d,]*(?:\.\d+)?\.?\s*")


def load_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    ckpt = summary.get("checkpoint") or ""
    policy = os.path.join(ckpt, "policy")
    if not os.path.isfile(os.path.join(policy, "config.json")):
        raise SystemExit(f"{run_dir}/summary.json: its final checkpoint {policy!r} has no policy model")
    return {"name": os.path.basename(os.path.normpath(run_dir)), "cfg": cfg, "summary": summary, "policy": policy}


def same_setting(runs) -> None:
    """The runs must share the task, its prompts and the decoding settings (else one table would mix them)."""
    def key(r):
        c = r["cfg"]
        return (c["model"]["model"], c["task"]["task"], json.dumps(c["task"]["task_kwargs"], sort_keys=True),
                c["task"]["num_eval"], c["rollout"]["max_new_tokens"])
    first = key(runs[0])
    for r in runs[1:]:
        if key(r) != first:
            raise SystemExit(f"{r['name']}: model / task / --num-eval / --max-new-tokens {key(r)} differ from "
                             f"{runs[0]['name']}'s {first}")


def classify(completion: str, ended: bool, correct: bool) -> dict:
    from vrpo_fast.tasks.answers import _MARKER_RES

    return {"correct": correct, "ended": ended, "marker": any(p.search(completion) for p in _MARKER_RES),
            "bare": bool(BARE_NUMBER.fullmatch(completion))}


def greedy_answers(model, tokenizer, task, examples, max_new_tokens: int, bf16: bool, batch: int):
    from vrpo_fast.precision import use_fp32_attention
    from vrpo_fast.rollout import eos_token_ids, generate

    eos = set(eos_token_ids(tokenizer, model))

    if bf16:
        use_fp32_attention(model)
    rows = []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            roll = generate(model, tokenizer, [e.prompt for e in chunk], max_new_tokens=max_new_tokens,
                            temperature=0.0)
        lengths = roll.response_mask.sum(-1).tolist()
        last = roll.input_ids[:, -1].tolist()
        for ex, text, n, tok in zip(chunk, roll.completions, lengths, last):
            ended = n < max_new_tokens or tok in eos
            row = classify(text, ended, task.grade(ex, text) > 0.5)
            rows.append({**row, "tokens": n, "text": text})
    return rows


def stats(rows) -> dict:
    n = len(rows)
    ended = [r for r in rows if r["ended"]]
    return {"accuracy": sum(r["correct"] for r in rows) / n, "ended": len(ended) / n,
            "marker": sum(r["marker"] for r in rows) / n, "bare": sum(r["bare"] for r in rows) / n,
            "acc_ended": (sum(r["correct"] for r in ended) / len(ended)) if ended else float("nan"),
            "tokens": sum(r["tokens"] for r in rows) / n}


def report(models, expected, n: int, max_new: int) -> str:
    lines = [f"Greedy completions of the {n} held-out prompts (max {max_new} new tokens); written by "
             f"`benchmarks/real_model_answers.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{machine()}.", "",
             "| model | greedy accuracy | trainer's figure | ended (EOS) | answer marker | bare number | "
             "accuracy when ended | mean tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in models:
        s = stats(rows)
        lines.append(f"| {name} | {s['accuracy']:.3f} | {expected[name]:.3f} | {s['ended']:.3f} | {s['marker']:.3f} | "
                     f"{s['bare']:.3f} | {s['acc_ended']:.3f} | {s['tokens']:.1f} |")
    lines += ["", "'trainer's figure': the run's own greedy evaluation in `summary.json` (the starting model's is "
              "`eval_greedy_reward_before`); the same computation in the same batches, so the two should agree. 'answer marker': "
              "\"Answer: N\", \"#### N\", \"\\boxed{N}\" or \"the answer is N\"; without one the grader takes the "
              "last number.", ""]
    for name, rows in models:
        lines.append(f"- {name}: " + " | ".join(repr(r["text"][:70]) for r in rows[:3]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (config.json, summary.json, the final checkpoint)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vrpo_fast.models.presets import load_causal_lm, load_tokenizer
    from vrpo_fast.tasks import get_task

    runs = [load_run(r) for r in args.runs]
    same_setting(runs)
    cfg = runs[0]["cfg"]
    task = get_task(cfg["task"]["task"], **cfg["task"]["task_kwargs"])
    examples = task.eval_examples()[:cfg["task"]["num_eval"]]
    max_new = cfg["rollout"]["max_new_tokens"]
    tokenizer = load_tokenizer(cfg["model"]["model"])
    sources = [("starting model", cfg["model"]["model"], runs[0]["summary"]["eval_greedy_reward_before"], cfg)]
    sources += [(r["name"], r["policy"], r["summary"]["eval_greedy_reward_after"], r["cfg"]) for r in runs]
    models, expected = [], {}
    for name, source, figure, run_cfg in sources:
        model = load_causal_lm(source)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        rows = greedy_answers(model, tokenizer, task, examples, max_new, run_cfg["model"]["mixed_precision"] == "bf16",
                              batch=run_cfg["rollout"]["eval_batch_size"])
        models.append((name, rows))
        expected[name] = figure
        acc = stats(rows)["accuracy"]
        print(f"{name}: greedy accuracy {acc:.3f} (trainer's {figure:.3f})", flush=True)
        if abs(acc - figure) > 0.5 / len(examples):
            print(f"WARNING: {name}: {acc:.3f} differs from the run's own greedy evaluation {figure:.3f}")
        del model
    text = report(models, expected, len(examples), max_new)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
