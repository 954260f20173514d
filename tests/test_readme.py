"""README stays true: its figures come from benchmarks/readme_figures.py, and every training command it
shows parses, validates, and starts."""
import os
import re
import shlex

import pytest

from vrpo_fast.train import build_parser, main
from vrpo_fast.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def readme_train_commands():
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            if line.startswith("python -m vrpo_fast.train"):
                cmds.append(line)
    return cmds


COMMANDS = readme_train_commands()


def test_figure_markers_are_present():
    assert README.count("<!-- default-job:start -->") == 1 and README.count("<!-- default-job:end -->") == 1
    block = README.split("<!-- default-job:start -->")[1].split("<!-- default-job:end -->")[0]
    assert "Written by `python benchmarks/readme_figures.py`" in block and "held-out CLEAN reward" in block


def test_readme_shows_training_commands():
    assert len(COMMANDS) >= 5 and "python -m vrpo_fast.train" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_and_validates(command):
    argv = shlex.split(command)[3:]
    args = build_parser().parse_args(argv)
    cfg = TrainConfig.from_flat(**vars(args)).resolved()
    cfg.validate()


SMALL = ["--steps", "1", "--warmup-steps", "2", "--num-eval", "4", "--eval-batch-size", "4", "--critic-warmup-steps",
         "1", "--rollout-batch-size", "8", "--mini-batch-size", "4", "--group-size", "4", "--no-eval-greedy",
         "--tiny-hidden-size", "16", "--tiny-layers", "1", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if "/path/to" not in c and "--model" not in c
                                     and "dialogue" not in c and "--resume" not in c])
def test_readme_command_starts(command, tmp_path):
    """Each runnable command (no placeholder paths, no real model) starts and finishes one RL step on a
    tiny model; what it would train on (task, algo, noise, method options) is the README's."""
    argv = [a for a in shlex.split(command)[3:]]
    assert main(argv + SMALL + ["--output-dir", str(tmp_path / "run")]) == 0
