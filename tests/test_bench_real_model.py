"""benchmarks/bench_real_model.py runs README's real-model command with only the benchmark's changes."""
import json

import pytest

from conftest import load_benchmark
from vrpo_fast.train import parse_config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_real_model")


def test_readme_command_is_the_documented_one(bench):
    argv = bench.readme_command()
    cfg = parse_config(argv)
    assert argv[:2] == ["--model", "smollm2-135m"]
    assert cfg.model.model == "smollm2-135m" and cfg.task.task == "math"
    assert cfg.task.task_kwargs == {"difficulty": 0}
    assert (cfg.task.noise_type, cfg.task.noise_rate) == ("flip", 0.2)
    assert cfg.run.steps == 150 and cfg.task.num_eval == 200 and cfg.rollout.eval_samples == 4


def test_readme_command_missing_section_is_one_clear_error(bench, tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# nothing here\n")
    with pytest.raises(SystemExit, match="no section"):
        bench.readme_command(str(p))
    p.write_text(f"{bench.SECTION}\n```\npython -m vrpo_fast.train --task arith\n```\n")
    with pytest.raises(SystemExit, match="no line starting with"):
        bench.readme_command(str(p))


def test_set_option_replaces_removes_and_appends(bench):
    argv = ["--a", "1", "--flag", "--task-kwargs", '{"x": 1}', "--b", "-2"]
    assert bench.set_option(argv, "--a", 5) == ["--flag", "--task-kwargs", '{"x": 1}', "--b", "-2", "--a", "5"]
    assert bench.set_option(argv, "--flag") == ["--a", "1", "--task-kwargs", '{"x": 1}', "--b", "-2"]
    assert bench.set_option(argv, "--b") == ["--a", "1", "--flag", "--task-kwargs", '{"x": 1}']
    assert bench.set_option(argv, "--new", "") == argv + ["--new"]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_shortened_changes_only_the_benchmark_options(bench, device, tmp_path):
    full = parse_config(bench.readme_command())
    argv = bench.shortened(bench.readme_command(), steps=6, num_eval=32, eval_samples=1, device=device,
                           out_dir=str(tmp_path / "run"), model=str(tmp_path / "m"))
    for name in ("--steps", "--num-eval", "--eval-samples", "--output-dir", "--model"):
        assert argv.count(name) == 1, name
    cfg = parse_config(argv)
    assert (cfg.run.steps, cfg.task.num_eval, cfg.rollout.eval_samples, cfg.run.save_every) == (6, 32, 1, 6)
    assert cfg.run.output_dir == str(tmp_path / "run") and cfg.model.model == str(tmp_path / "m")
    assert cfg.run.progress is False and cfg.run.resume is False
    assert cfg.model.cpu is (device == "cpu")
    # README's --num-threads 1 is for the 2-core CPU; on CUDA the trainer's default applies
    assert full.model.num_threads == 1
    assert cfg.model.num_threads == (1 if device == "cpu" else parse_config([]).model.num_threads)
    # everything the benchmark does not shorten is the user's command
    for section in ("algo", "optim"):
        assert getattr(cfg, section) == getattr(full, section), section
    assert (cfg.task.task, cfg.task.task_kwargs, cfg.task.noise_type, cfg.task.noise_rate) == \
        (full.task.task, full.task.task_kwargs, full.task.noise_type, full.task.noise_rate)
    assert cfg.rollout.rollout_batch_size == full.rollout.rollout_batch_size


def test_summarise_reads_the_steps_after_the_first(bench, tmp_path):
    rows = [{"step": 1, "step_time_s": 9.0, "tokens_per_s": 10.0, "response_length": 24.0},
            {"step": 2, "step_time_s": 2.0, "tokens_per_s": 50.0, "response_length": 20.0},
            {"step": 3, "step_time_s": 4.0, "tokens_per_s": 30.0, "response_length": 22.0},
            {"step": 4, "step_time_s": 3.0, "tokens_per_s": 40.0, "response_length": 18.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = bench.summarise(str(tmp_path))
    assert s == {"steps": 4, "first_step_s": 9.0, "step_s": 3.0, "tokens_per_s": 40.0, "response_length": 21.0}
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no RL step"):
        bench.summarise(str(tmp_path))
