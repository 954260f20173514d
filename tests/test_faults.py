"""Faults injected on purpose into real runs of the trainer (tiny model, real files, real processes).

Each test is a fault a user can hit: missing / corrupted / partial checkpoints, a full disk, two
trainers on one directory, changed options on --resume, Ctrl-C and SIGTERM, a non-finite update,
bad options and task files. What must hold: no work is lost or mixed silently; the user gets one
line saying what happened and what to do; the exit code says which kind of stop it was.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import subprocess_env
from test_train_e2e import _tiny_argv, tiny_config

from vrpo_fast import checkpoint as ckpt
from vrpo_fast import trainer as trainer_mod
from vrpo_fast.metrics import read_metrics, without_timings
from vrpo_fast.train import main, run_training

STEP = "step_{:06d}".format


def steps_of(run_dir):
    return [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def cli(tmp_path, *extra, run="run", **overrides):
    """main() on the tiny config: (exit code, stderr)."""
    return main(["--output-dir", str(tmp_path / run), *_tiny_argv(**overrides), *extra])


def start_trainer(tmp_path, *extra, run="run", **overrides):
    cmd = [sys.executable, "-m", "vrpo_fast.train", "--output-dir", str(tmp_path / run),
           *_tiny_argv(**overrides), *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited early ({proc.returncode}): {out[-2000:]} {err[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-step run the faulted runs are compared with."""
    base = tmp_path_factory.mktemp("straight")
    summary = run_training(tiny_config(base, steps=4, save_every=1, keep_checkpoints=4))
    return without_timings(read_metrics(summary["metrics_path"])), summary


def two_step_run(tmp_path, **overrides):
    cfg = tiny_config(tmp_path, steps=2, save_every=1, keep_checkpoints=4, **overrides)
    run_training(cfg)
    return cfg.run_dir()


def resume_to_4(tmp_path, capsys=None):
    summary = run_training(tiny_config(tmp_path, steps=4, save_every=1, keep_checkpoints=4, resume=True))
    return summary, (capsys.readouterr().out if capsys else "")


def resumes_like_straight(tmp_path, straight, capsys) -> str:
    """Resume the damaged run to step 4, check it equals the uninterrupted run, return what it printed."""
    capsys.readouterr()
    summary, out = resume_to_4(tmp_path, capsys)
    assert without_timings(read_metrics(summary["metrics_path"])) == straight[0]
    return out


# ----------------------------------------------------------------------------------------------
# 2. resume never goes backwards silently
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["latest_missing", "latest_empty", "latest_dangling"])
def test_latest_pointer_is_only_a_hint(tmp_path, straight, damage):
    run = two_step_run(tmp_path)
    latest = os.path.join(run, "checkpoints", "latest")
    {"latest_missing": lambda: os.remove(latest),
     "latest_empty": lambda: open(latest, "w").close(),
     "latest_dangling": lambda: open(latest, "w").write("step_000099\n")}[damage]()
    summary, _ = resume_to_4(tmp_path)
    assert without_timings(read_metrics(summary["metrics_path"])) == straight[0]  # continued, not restarted


@pytest.mark.parametrize("remove", ["trainer_state.pt", "value/value_head.safetensors", "MANIFEST.json"])
def test_incomplete_newest_checkpoint_is_skipped_and_named(tmp_path, straight, capsys, remove):
    run = two_step_run(tmp_path)
    os.remove(os.path.join(run, "checkpoints", STEP(2), remove))
    out = resumes_like_straight(tmp_path, straight, capsys)
    assert f"skipping checkpoint {STEP(2)}" in out and f"resumed from {os.path.join(run, 'checkpoints', STEP(1))}" in out
    assert os.path.isdir(os.path.join(run, "checkpoints", STEP(2) + ".broken"))  # kept for inspection


def test_corrupted_weights_fail_the_checksum(tmp_path, straight, capsys):
    run = two_step_run(tmp_path)
    weights = os.path.join(run, "checkpoints", STEP(2), "policy", "model.safetensors")
    with open(weights, "r+b") as f:  # same size, different bytes
        f.seek(os.path.getsize(weights) - 16)
        f.write(b"\xff" * 16)
    assert "policy/model.safetensors does not match its checksum" in resumes_like_straight(tmp_path, straight, capsys)


def test_no_usable_checkpoint_refuses_and_changes_nothing(tmp_path, capsys):
    run = two_step_run(tmp_path)
    for step in (1, 2):
        open(os.path.join(run, "checkpoints", STEP(step), "trainer_state.pt"), "wb").close()
    config = open(os.path.join(run, "config.json")).read()
    metrics = open(os.path.join(run, "metrics.jsonl")).read()
    assert cli(tmp_path, "--resume", steps=4, save_every=1, keep_checkpoints=4) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and STEP(2) in err and "Traceback" not in err
    assert open(os.path.join(run, "config.json")).read() == config
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", STEP(1), STEP(2)]


def test_logged_steps_without_any_checkpoint_refuse(tmp_path, capsys):
    run = two_step_run(tmp_path)
    shutil.rmtree(os.path.join(run, "checkpoints"))
    assert cli(tmp_path, "--resume", steps=4) == 2
    assert "records 2 RL steps but" in capsys.readouterr().err
    assert steps_of(run) == [1, 2]


def test_pruning_goes_by_step_number_and_keeps_the_new_one(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", STEP(3), STEP(4)):
        os.makedirs(root / name)
    ckpt.prune(str(root), keep=2, protect=STEP(3))
    assert sorted(os.listdir(root)) == sorted(["step_1000000", STEP(3), "step_999999"])


def test_leftovers_of_a_killed_write_are_cleaned_up(tmp_path, straight, capsys):
    run = two_step_run(tmp_path)
    root = os.path.join(run, "checkpoints")
    os.makedirs(os.path.join(root, STEP(3) + ".tmp", "policy"))        # killed while writing step 3
    open(os.path.join(run, "summary.json.tmp-4242"), "w").write("{")   # killed in atomic_write_text
    os.replace(os.path.join(root, STEP(2)), os.path.join(root, STEP(2) + ".old"))  # killed mid-replace
    out = resumes_like_straight(tmp_path, straight, capsys)
    assert "removed the unfinished write" in out and "restored" in out
    leftovers = [n for n in os.listdir(root) + os.listdir(run) if ".tmp" in n or n.endswith(".old")]
    assert leftovers == []


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((a, len(synced))), real_replace(a, b)))
    from vrpo_fast.models.tiny import build_char_tokenizer, build_tiny_model, TinyModelConfig

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32))
    ckpt.save_checkpoint(str(tmp_path), 1, policy=model, tokenizer=tok, trainer_state={"step": 1})
    final = os.path.join(str(tmp_path), "checkpoints", STEP(1))
    synced_before = next(n for src, n in renamed if src == final + ".tmp")
    files = [os.path.join(final + ".tmp", f) for f in ckpt._files(final)] + [os.path.join(final + ".tmp", ckpt.MANIFEST)]
    assert set(files) <= set(synced[:synced_before])
    assert ckpt.verify_manifest(final) is None


# ----------------------------------------------------------------------------------------------
# 3. non-finite updates are never applied or saved
# ----------------------------------------------------------------------------------------------
class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_infinite_gradient_stops_before_the_update(tmp_path, monkeypatch, capsys):
    real, calls = trainer_mod.policy_loss, {"n": 0}

    def poisoned(logprobs, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 1 has two micro-batches; step 2's gradients are infinite, its loss finite
            logprobs = _InfGrad.apply(logprobs)
        return real(logprobs, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "policy_loss", poisoned)
    assert cli(tmp_path, steps=3, save_every=1) == 3
    err = capsys.readouterr().err
    assert "policy gradient norm is nan at RL step 2" in err or "policy gradient norm is inf at RL step 2" in err
    assert STEP(1) in err
    run = str(tmp_path / "run")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", STEP(1)]
    from safetensors.torch import load_file

    weights = load_file(os.path.join(run, "checkpoints", STEP(1), "policy", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    from vrpo_fast import setup_run

    real = setup_run.save_run_checkpoint

    def poison_then_save(run, step):
        if step == 2:
            with torch.no_grad():
                next(run.policy.parameters()).fill_(float("nan"))
        return real(run, step)

    monkeypatch.setattr(trainer_mod, "save_run_checkpoint", poison_then_save)
    with pytest.raises(trainer_mod.NonFiniteLossError, match="policy weight .* at RL step 2"):
        run_training(tiny_config(tmp_path, steps=3, save_every=1))
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "checkpoints", STEP(2)))


# ----------------------------------------------------------------------------------------------
# 4. one run, one configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [["--seed", "1"], ["--lr", "0.5"], ["--latent-dim", "16"], ["--algo", "ppo"],
                                    ["--rollout-batch-size", "16"], ["--noise-rate", "0.4"]])
def test_resume_with_other_training_options_is_refused(tmp_path, capsys, change):
    run = two_step_run(tmp_path)
    config = open(os.path.join(run, "config.json")).read()
    assert cli(tmp_path, "--resume", *change, steps=4) == 2
    err = capsys.readouterr().err
    assert "--resume with options that change what is trained" in err and change[0] in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert open(os.path.join(run, "config.json")).read() == config and steps_of(run) == [1, 2]


def test_resume_may_change_steps_and_eval_size_and_records_it(tmp_path, capsys):
    run = two_step_run(tmp_path)
    config = open(os.path.join(run, "config.json")).read()
    assert cli(tmp_path, "--resume", "--num-eval", "4", steps=3, save_every=2) == 0
    assert open(os.path.join(run, "config.json")).read() == config  # the original record
    with open(os.path.join(run, "resumes.jsonl")) as f:
        changed = json.loads(f.readline())["changed"]
    assert changed["steps"] == [2, 3] and changed["num_eval"] == [8, 4] and changed["save_every"] == [1, 2]
    assert steps_of(run) == [1, 2, 3]


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    assert cli(tmp_path, "--model", str(tmp_path / "missing"), steps=1) == 2
    assert not os.path.exists(tmp_path / "run")
    assert cli(tmp_path, steps=1, warmup_steps=0) == 0  # the corrected command is not told "already holds a run"


# ----------------------------------------------------------------------------------------------
# 5. one trainer per run directory; 7. Ctrl-C and SIGTERM (real processes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_trainer_on_a_live_directory_exits_naming_the_holder(tmp_path):
    first = start_trainer(tmp_path, steps=500, save_every=0)
    run = tmp_path / "run"
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0, first)
    second = subprocess.run([sys.executable, "-m", "vrpo_fast.train", "--output-dir", str(run), "--resume",
                             *_tiny_argv(steps=500, save_every=0)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143, err
    assert "rerun with --resume to continue" in err and "Traceback" not in err
    steps = steps_of(str(run))
    assert steps == list(range(1, len(steps) + 1))  # one writer: no duplicated or interleaved lines


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path, straight):
    proc = start_trainer(tmp_path, steps=4, save_every=1, keep_checkpoints=4)
    run = tmp_path / "run"
    wait_for(lambda: (run / "checkpoints" / STEP(2) / ckpt.MANIFEST).exists(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # the run finished before the signal landed: nothing to check
        pytest.skip("the 4-step run finished before SIGINT arrived")
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("interrupted at step ") and lines[-1].endswith("rerun with --resume to continue")
    assert "the latest checkpoint is step" in lines[-1]
    summary = run_training(tiny_config(tmp_path, steps=4, save_every=1, keep_checkpoints=4, resume=True))
    assert without_timings(read_metrics(summary["metrics_path"])) == straight[0]


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, straight):
    proc = start_trainer(tmp_path, steps=4, save_every=1, keep_checkpoints=4)
    run = tmp_path / "run"
    wait_for(lambda: (run / "checkpoints" / STEP(1)).exists(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    summary = run_training(tiny_config(tmp_path, steps=4, save_every=1, keep_checkpoints=4, resume=True))
    assert without_timings(read_metrics(summary["metrics_path"])) == straight[0]
    from safetensors.torch import load_file

    a = load_file(os.path.join(straight[1]["checkpoint"], "policy", "model.safetensors"))
    b = load_file(os.path.join(summary["checkpoint"], "policy", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# 6. metrics.jsonl and damaged files
# ----------------------------------------------------------------------------------------------
def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, straight, capsys):
    run = two_step_run(tmp_path)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "clean_rew')  # the disk filled in the middle of an append
    assert "dropped a torn last line" in resumes_like_straight(tmp_path, straight, capsys)


def test_damaged_metrics_line_in_the_middle_names_file_and_line(tmp_path, capsys):
    run = two_step_run(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write("not json\n" + "\n".join(lines[1:]) + "\n")
    assert cli(tmp_path, "--resume", steps=4, save_every=1, keep_checkpoints=4) == 2
    assert f"{path}:1: not a metrics record" in capsys.readouterr().err


def test_damaged_config_json_names_the_file(tmp_path, capsys):
    run = two_step_run(tmp_path)
    open(os.path.join(run, "config.json"), "w").write("{\"model\": ")
    assert cli(tmp_path, "--resume", steps=4) == 2
    assert f"{os.path.join(run, 'config.json')}: not valid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a real full disk (a 1 MiB tmpfs) while the trainer writes its checkpoint
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    size = "700k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, small_disk, capsys):
    # each checkpoint of this config takes ~0.3 MiB: the third one cannot be written
    code = main(["--output-dir", str(small_disk / "run"), *_tiny_argv(steps=6, save_every=1, keep_checkpoints=2)])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert "--resume" in err
    run = str(small_disk / "run")
    newest = ckpt.latest_checkpoint(run)
    assert newest is not None and ckpt.verify_manifest(newest) is None
    done = int(os.path.basename(newest)[5:])
    # the space comes back (a bigger disk): the run resumes from its newest complete checkpoint
    shutil.copytree(run, tmp_path / "bigger", ignore_dangling_symlinks=True)
    assert main(["--output-dir", str(tmp_path / "bigger"), "--resume",
                 *_tiny_argv(steps=6, save_every=1, keep_checkpoints=2)]) == 0
    out = capsys.readouterr().out
    assert f"at step {done}" in out
    assert steps_of(str(tmp_path / "bigger")) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------
# 8. bad options and inputs: one line, exit 2
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--task-kwargs", '{"bogus": 1}'], "--task-kwargs: unknown key 'bogus' for task 'arith' (accepted keys: "),
    (["--task-kwargs", '{"max_operand": "ten"}'], "--task-kwargs: 'max_operand' must be int"),
    (["--noise-kwargs", '{"nope": 1}'], "--noise-kwargs: unknown key 'nope'"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, match):
    assert cli(tmp_path, *argv, steps=1) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")


def test_max_grad_norm_inf_means_no_clipping(tmp_path):
    assert cli(tmp_path, "--max-grad-norm", "inf", steps=1, warmup_steps=0) == 0


def _math_file(path, rows, raw=None):
    with open(path, "wb") as f:
        if raw is not None:
            f.write(raw)
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
    return str(path)


GOOD = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(12)]


def test_long_prompt_line_is_refused_before_parsing(tmp_path, capsys):
    path = _math_file(tmp_path / "big.jsonl", GOOD[:3] + [{"question": "x" * 10_000_000, "answer": "#### 1"}])
    t0 = time.time()
    assert cli(tmp_path, "--task", "math", "--task-kwargs", json.dumps({"path": path}), steps=1) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: line longer than" in err and time.time() - t0 < 60


def test_prompt_over_max_prompt_tokens_names_file_and_line(tmp_path, capsys):
    path = _math_file(tmp_path / "long.jsonl", GOOD[:5] + [{"question": "y" * 300, "answer": "#### 1"}] + GOOD[5:])
    assert cli(tmp_path, "--task", "math", "--task-kwargs", json.dumps({"path": path}), "--max-prompt-tokens", "100",
               steps=1) == 2
    assert f"{path}:6: the prompt has" in capsys.readouterr().err


def test_invalid_utf8_names_file_and_line_and_a_bom_is_accepted(tmp_path, capsys):
    from vrpo_fast.tasks.math import load_gsm8k_jsonl

    bom = _math_file(tmp_path / "bom.jsonl", GOOD, raw=b"\xef\xbb\xbf")
    assert len(load_gsm8k_jsonl(bom)) == len(GOOD)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    assert cli(tmp_path, "--task", "math", "--task-kwargs", json.dumps({"path": str(bad)}), steps=1) == 2
    assert f"{bad}:2: invalid UTF-8" in capsys.readouterr().err
