"""``python -m vrpo_fast.train``: VRPO / PPO / GRPO on a task with noisy rewards.

With no arguments: the embedded tiny Llama-style model learns two-digit addition (supervised
warm-up), then VRPO trains it with 20% of its rewards flipped; the headline is the CLEAN reward on
held-out prompts before and after RL. ``--help`` lists every option (one per config field).
Runs data-parallel unchanged under ``accelerate launch -m vrpo_fast.train ...``.

Programmatic use (the experiment runner)::

    from vrpo_fast.train import TrainConfig, run_training
    summary = run_training(TrainConfig.from_flat(algo="ppo", noise_rate=0.3, seed=1))
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from typing import List, Optional

from .config import GROUPS, TrainConfig
from .models.presets import ModelExtraMissingError
from .errors import NonFiniteLossError, TrainingInterrupted
from .trainer import run_training

__all__ = ["TrainConfig", "run_training", "NonFiniteLossError", "TrainingInterrupted", "build_parser",
           "parse_config", "main"]

EXIT_NONFINITE = 3
EXIT_USAGE = 2
EXIT_IO = 1
EXIT_SIGINT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_SIGTERM = 143  # 128 + SIGTERM


def _arg_type(annotation):
    """(argparse type, is_bool) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:  # Optional[X]
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    if origin is dict or annotation is dict:
        return _json_dict, False
    raise TypeError(f"unsupported config field type {annotation!r}")


def _json_dict(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vrpo_fast.train",
        description="RL post-training under noisy rewards: VRPO (PPO + variational-information-bottleneck "
                    "critic with entropy/perplexity auxiliary heads), PPO and GRPO. With no arguments, a "
                    "complete demo on a 2-core CPU in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for group_name, cls in GROUPS.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            default = getattr(getattr(defaults, group_name), f.name)
            typ, is_bool = _arg_type(hints[f.name])
            if is_bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                   help=help_text)
            else:
                choices = f.metadata.get("choices")
                metavar = None if choices else ("JSON" if typ is _json_dict else f.name.upper())
                group.add_argument(flag, dest=f.name, type=typ, default=default, help=help_text,
                                   choices=choices, metavar=metavar)
    return parser


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig.from_flat(**vars(args))


def format_summary(summary: dict) -> str:
    before, after = summary["eval_clean_reward_before"], summary["eval_clean_reward_after"]
    noise = summary["noise"]
    noise_text = {"none": "no noise", "flip": f"flip p={noise['rate']}",
                  "gaussian": f"gaussian std={noise['std']}"}.get(noise["type"], noise["type"])
    if summary["eval_temperature"] == 0:
        decoding = "greedy"
    else:
        decoding = f"{summary['eval_samples']} samples each at T={summary['eval_temperature']:g}"
    lines = [
        "",
        f"=== {summary['algo'].upper()} on {summary['task']} ({noise_text}), {summary['steps']} RL steps, "
        f"{summary['wall_time_s'] / 60:.1f} min ===",
        f"held-out CLEAN reward ({summary['eval_prompts']} prompts, {decoding}):  "
        f"before RL {before:.3f}  ->  after RL {after:.3f}  ({after - before:+.3f})",
    ]
    g0, g1 = summary.get("eval_greedy_reward_before"), summary.get("eval_greedy_reward_after")
    if g0 is not None and g1 is not None and summary["eval_temperature"] != 0:
        lines.append(f"held-out CLEAN reward (greedy decoding):  before RL {g0:.3f}  ->  after RL {g1:.3f}  "
                     f"({g1 - g0:+.3f})")
    clean = [v for k, v in summary.items() if k.startswith("train_clean_reward_last")]
    noisy = [v for k, v in summary.items() if k.startswith("train_noisy_reward_last")]
    if clean:
        lines.append(f"train rewards, last steps: clean {clean[0]:.3f}, noisy (what the learner saw) {noisy[0]:.3f}")
    lines.append(f"run dir: {summary['run_dir']}  (config.json, metrics.jsonl, curves.png, summary.json, checkpoints/)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard save/load bars would bury ours
    cfg = parse_config(argv)
    try:
        summary = run_training(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ValueError, FileNotFoundError, FileExistsError, ModelExtraMissingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # disk full, permission denied, ...: the checkpoints already written are intact
        print(f"error: {err}. Completed checkpoints are intact: fix this, then rerun with --resume to continue",
              file=sys.stderr)
        return EXIT_IO
    except TrainingInterrupted as err:
        print(f"{err}", file=sys.stderr, flush=True)
        return EXIT_SIGTERM if err.signum == signal.SIGTERM else EXIT_SIGINT
    except KeyboardInterrupt:  # before the trainer started (building the accelerator)
        print("interrupted before training started: nothing was written", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C while the first one is being handled
        sys.exit(EXIT_SIGINT)
