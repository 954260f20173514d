"""Data-parallel training with ``accelerate launch`` on 2 CPU processes (gloo): the same CLI, unchanged.

Each process samples its shard of the step's prompts, DDP averages the gradients, metrics are gathered
and only the main process writes files.
"""
import json
import os
import subprocess
import sys

import pytest

ARGS = [
    "--tiny-hidden-size", "32", "--tiny-layers", "1", "--latent-dim", "8",
    "--task-kwargs", json.dumps({"max_operand": 20, "num_eval": 16}), "--num-eval", "8", "--eval-batch-size", "8",
    "--warmup-steps", "2", "--warmup-batch-size", "8", "--steps", "2", "--rollout-batch-size", "8",
    "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4", "--no-progress",
]


def _launch(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", ACCELERATE_CONFIG_FILE=str(tmp_path / "none.yaml"))
    # accelerate's own --cpu flag starts ONE process unless MPI is set up; --multi_gpu starts the
    # processes with torchrun, which on a machine without CUDA (and with our --cpu) trains on gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "vrpo_fast.train", "--cpu", *ARGS, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["vrpo", "grpo"])
def test_two_cpu_processes(tmp_path, algo):
    run = tmp_path / "run"
    proc = _launch(tmp_path, "--algo", algo, "--output-dir", str(run))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"=== {algo.upper()} on arith") == 1  # only the main process prints the summary
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]  # only the main process writes (no duplicate lines)
    assert all(r["policy_loss"] is not None for r in records)
    state_dir = run / "checkpoints" / "step_000002"
    assert (state_dir / "trainer_state.pt").exists() and (run / "curves.png").exists()
    import torch

    state = torch.load(state_dir / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and len(state["noise"]) == 2  # every process's RNG / noise state
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["eval_prompts"] == 8
