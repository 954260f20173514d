"""Data-parallel training with ``accelerate launch`` on 2 CPU processes (gloo): the same CLI, unchanged.

Each process samples and scores its shard of the step's prompts, the shards are gathered into the
global batch, each process trains on its slice of every mini-batch, DDP averages the gradients and
only the main process writes files. Two processes must give what one process gives with the same
global batch, up to floating-point rounding.
"""
import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

ARGS = [
    "--tiny-hidden-size", "32", "--tiny-layers", "1", "--latent-dim", "8",
    "--task-kwargs", json.dumps({"max_operand": 20, "num_eval": 16}), "--num-eval", "8", "--eval-batch-size", "8",
    "--warmup-steps", "2", "--warmup-batch-size", "8", "--steps", "2", "--rollout-batch-size", "8",
    "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4", "--no-progress",
    "--critic-warmup-steps", "1",
]


def _launch(tmp_path, *extra, processes: int = 2):
    env = subprocess_env(ACCELERATE_CONFIG_FILE=str(tmp_path / "none.yaml"))
    if processes == 1:
        cmd = [sys.executable, "-m", "vrpo_fast.train"]
    else:
        # accelerate's own --cpu flag starts ONE process unless MPI is set up; --multi_gpu starts the
        # processes with torchrun, which on a machine without CUDA (and with our --cpu) trains on gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vrpo_fast.train"]
    proc = subprocess.run([*cmd, "--cpu", *ARGS, *extra], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["vrpo", "grpo"])
def test_two_cpu_processes(tmp_path, algo):
    run = tmp_path / "run"
    proc = _launch(tmp_path, "--algo", algo, "--output-dir", str(run))
    assert proc.stdout.count(f"=== {algo.upper()} on arith") == 1  # only the main process prints the summary
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]  # only the main process writes (no duplicate lines)
    assert all(r["policy_loss"] is not None for r in records)
    state_dir = run / "checkpoints" / "step_000002"
    assert (state_dir / "trainer_state.pt").exists() and (run / "curves.png").exists()
    import torch

    state = torch.load(state_dir / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # every process's RNG state
    assert state["noise"]["type"] == "flip"  # one noise state: every process noises the same global batch
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["eval_prompts"] == 8


# ----------------------------------------------------------------------------------------------
# 2 processes == 1 process with the same global batch
# ----------------------------------------------------------------------------------------------
# Gaussian noise: every reward, advantage and loss is non-trivial. Two PPO epochs: the second
# mini-batch pass sees weights updated from the first, so any mismatch compounds.
EQUIV = ["--noise-type", "gaussian", "--noise-std", "0.5", "--ppo-epochs", "2", "--steps", "2"]
EXACT = ("clean_reward", "noisy_reward", "response_length", "lr")  # same tokens, same rewards: equal
DISCRETE = ("clipfrac", "vf_clipfrac")  # a token at the clip boundary may flip under rounding
from vrpo_fast.metrics import TIMING_KEYS as TIMINGS  # noqa: E402  (machine speed, not the computation)


def _run(tmp_path, name, algo, *extra, processes):
    out = tmp_path / name
    _launch(tmp_path, "--algo", algo, "--output-dir", str(out), *EQUIV, *extra, processes=processes)
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return out, metrics, summary


def _weights(run_dir):
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints" / "step_000002"
    files = sorted(p for p in ckpt.rglob("*.safetensors"))
    assert files, f"no weights under {ckpt}"
    return {f"{p.relative_to(ckpt)}:{k}": v for p in files for k, v in load_file(p).items()}


def _max_metric_gap(a, b):
    gaps = {}
    for x, y in zip(a, b):
        for k, v in x.items():
            if k in TIMINGS or k in DISCRETE or not isinstance(v, float):
                continue
            gaps[k] = max(gaps.get(k, 0.0), abs(v - y[k]) / (1e-3 + abs(v)))
    return gaps


@pytest.mark.slow
@pytest.mark.parametrize("algo,one_accum,two_accum", [("vrpo", 1, 1), ("ppo", 2, 1), ("grpo", 1, 2)])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, algo, one_accum, two_accum):
    """Same sampled tokens, rewards and noise; metrics and final weights equal to rounding.

    Also across gradient accumulation: the update is the token mean over the mini-batch whether a
    mini-batch is split over processes, over micro-batches, or both.
    """
    one_dir, one, one_sum = _run(tmp_path, "one", algo, "--grad-accum-steps", str(one_accum), processes=1)
    two_dir, two, two_sum = _run(tmp_path, "two", algo, "--grad-accum-steps", str(two_accum), processes=2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for x, y in zip(one, two):
        assert {k: x[k] for k in EXACT} == {k: y[k] for k in EXACT}
        for k in DISCRETE:
            if k in x:
                assert abs(x[k] - y[k]) <= 0.05, (k, x[k], y[k])
    gaps = _max_metric_gap(one, two)
    assert max(gaps.values()) < 1e-4, sorted(gaps.items(), key=lambda kv: -kv[1])[:5]
    for k in ("eval_clean_reward_before", "eval_clean_reward_after", "eval_greedy_reward_after"):
        assert one_sum[k] == two_sum[k], k
    wa, wb = _weights(one_dir), _weights(two_dir)
    assert wa.keys() == wb.keys() and (algo == "grpo" or any("value" in k for k in wa))
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_linear_lr_schedule_is_the_same_on_two_processes(tmp_path):
    """The LR after k RL steps is the single-process LR after k steps (accelerate would otherwise step a
    prepared scheduler once per process, decaying it N times too fast)."""
    sched = ["--lr-schedule", "linear", "--steps", "3", "--lr", "1e-3", "--critic-lr", "2e-3"]
    _, one, _ = _run(tmp_path, "one", "vrpo", *sched, processes=1)
    _, two, _ = _run(tmp_path, "two", "vrpo", *sched, processes=2)
    expected = [1e-3 * (1 - k / 3) for k in (1, 2, 3)]
    assert [r["lr"] for r in one] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [r["lr"] for r in two] == [r["lr"] for r in one]


@pytest.mark.slow
def test_equivalence_tolerance_separates_different_runs(tmp_path):
    """Control for the test above: another seed (other samples and noise) is far outside its tolerance."""
    a_dir, a, _ = _run(tmp_path, "a", "vrpo", processes=1)
    b_dir, b, _ = _run(tmp_path, "b", "vrpo", "--seed", "1", processes=1)
    assert max(_max_metric_gap(a, b).values()) > 1e-2
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) > 1e-4


def test_global_token_weight_makes_the_mini_batch_token_mean():
    """Each process's masked mean x weight, summed over processes / micro-batches, then averaged the
    way DDP + accumulation average, is the token mean over the whole mini-batch."""
    import torch

    from vrpo_fast.distributed import global_token_weight

    class FakeAccelerator:
        num_processes = 2

    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    mask = torch.rand(8, 5) < 0.4
    mask[3] = False  # an all-masked row
    total = mask.sum().double()
    accum = 2
    pieces = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]  # 2 processes x 2 micro-batches
    combined = 0.0
    for sl in pieces:
        mean = (x[sl] * mask[sl]).sum() / mask[sl].sum().clamp_min(1)
        combined += mean * global_token_weight(FakeAccelerator(), mask[sl], total, accum) / accum
    combined /= FakeAccelerator.num_processes
    expected = sum(float(x[i, j]) for i in range(8) for j in range(5) if mask[i, j]) / int(mask.sum())
    assert abs(float(combined) - expected) < 1e-6


@pytest.mark.parametrize("argv, env, expected", [
    (["accelerate", "launch", "--num_processes", "2", "-m", "vrpo_fast.train"], {"ACCELERATE_USE_CPU": "False"}, 2),
    (["accelerate", "launch", "--num_processes=4", "x.py"], {"ACCELERATE_USE_CPU": "True"}, 4),
    (["accelerate", "launch", "x.py"], {"ACCELERATE_USE_CPU": "False"}, None),
    (["accelerate", "launch", "--num_processes", "2", "x.py"], {}, None),  # not the simple launcher
    (["torchrun", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "False", "WORLD_SIZE": "2"}, None),
])
def test_requested_processes_reads_the_launchers_command_line(monkeypatch, argv, env, expected):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process on a CPU box; the
    trainer reads the launcher's --num_processes to warn about it."""
    import psutil

    from vrpo_fast.distributed import requested_processes

    for k in ("ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    class Parent:
        def __init__(self, pid):
            pass

        def cmdline(self):
            return argv

    monkeypatch.setattr(psutil, "Process", Parent)
    assert requested_processes() == expected
