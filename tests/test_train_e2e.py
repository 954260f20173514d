"""End-to-end runs of the trainer on a tiny config (seconds each): every algorithm, resume, errors, CLI."""
import dataclasses
import json
import logging
import os

import pytest
import torch

from vrpo_fast import evaluation
from vrpo_fast import trainer as trainer_mod
from vrpo_fast.config import GROUPS
from vrpo_fast.metrics import read_metrics, without_timings
from vrpo_fast.models.loading import NotACausalLMError
from vrpo_fast.train import TrainConfig, build_parser, main, run_training
from vrpo_fast.trainer import NonFiniteLossError

TINY = dict(
    tiny_hidden_size=32, tiny_layers=1, latent_dim=8,
    task_kwargs={"max_operand": 20, "num_eval": 16}, num_eval=8, eval_batch_size=8,
    warmup_steps=3, steps=2, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, group_size=4,
    max_new_tokens=4, save_every=1, progress=False, critic_warmup_steps=0,
)
LOSS_KEYS = {"vrpo": ("policy_loss", "value_loss", "vib_kl", "ent_loss", "ppl_loss", "critic_loss"),
             "ppo": ("policy_loss", "value_loss", "critic_loss"),
             "grpo": ("policy_loss", "kl")}


def tiny_config(tmp_path, **overrides):
    return TrainConfig.from_flat(**{**TINY, "output_dir": str(tmp_path / "run"), **overrides})


@pytest.mark.parametrize("algo", ["vrpo", "ppo", "grpo"])
def test_tiny_run_per_algorithm(tmp_path, algo):
    summary = run_training(tiny_config(tmp_path, algo=algo))
    run = summary["run_dir"]
    for key in ("eval_clean_reward_before", "eval_clean_reward_after", "eval_greedy_reward_before",
                "eval_greedy_reward_after", "steps", "run_dir", "wall_time_s", "metrics_path"):
        assert summary[key] is not None, key
    assert summary["steps"] == 2 and 0.0 <= summary["eval_clean_reward_after"] <= 1.0
    for name in ("config.json", "metrics.jsonl", "curves.png", "summary.json", "reference/config.json",
                 "checkpoints/latest", "checkpoints/step_000002/trainer_state.pt",
                 "checkpoints/step_000002/policy/model.safetensors"):
        assert os.path.exists(os.path.join(run, name)), name
    assert os.path.isdir(os.path.join(run, "checkpoints/step_000002/value")) == (algo != "grpo")
    records = read_metrics(summary["metrics_path"])
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in LOSS_KEYS[algo] + ("clean_reward", "noisy_reward", "entropy", "step_time_s", "tokens_per_s"):
            assert r[key] is not None and torch.isfinite(torch.tensor(r[key])), (key, r[key])
        assert 0.0 <= r["clean_reward"] <= 1.0
        if algo != "grpo":
            assert "explained_variance" in r
    assert TrainConfig.load(os.path.join(run, "config.json")) == tiny_config(tmp_path, algo=algo)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = run_training(tiny_config(tmp_path / "a", steps=4, save_every=2))
    run_training(tiny_config(tmp_path / "b", steps=2, save_every=2))  # "stopped" after 2 steps
    resumed = run_training(tiny_config(tmp_path / "b", steps=4, save_every=2, resume=True))
    a = without_timings(read_metrics(straight["metrics_path"]))
    b = without_timings(read_metrics(resumed["metrics_path"]))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert resumed["eval_clean_reward_before"] == straight["eval_clean_reward_before"]
    assert resumed["eval_clean_reward_after"] == straight["eval_clean_reward_after"]
    pa = os.path.join(straight["checkpoint"], "policy", "model.safetensors")
    pb = os.path.join(resumed["checkpoint"], "policy", "model.safetensors")
    from safetensors.torch import load_file

    wa, wb = load_file(pa), load_file(pb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_dir_needs_resume(tmp_path):
    cfg = tiny_config(tmp_path, steps=1, warmup_steps=0)
    run_training(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(cfg)


def test_nan_loss_stops_with_named_loss_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = trainer_mod.vrpo_value_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # step 1 has two micro-batches; poison step 2
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(trainer_mod, "vrpo_value_loss", poisoned)
    cfg = tiny_config(tmp_path, steps=3)
    with pytest.raises(NonFiniteLossError, match="value loss is nan at RL step 2") as info:
        run_training(cfg)
    assert info.value.loss_name == "value"
    assert info.value.last_checkpoint.endswith("step_000001")
    assert "step_000001" in str(info.value)
    latest = os.path.join(cfg.run_dir(), "checkpoints", "latest")
    assert open(latest).read().strip() == "step_000001"

    calls["n"] = 0
    code = main(["--output-dir", str(tmp_path / "cli"), *_tiny_argv(steps=3)])
    assert code == 3


def _tiny_argv(**overrides):
    argv = []
    for k, v in {**TINY, **overrides}.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return argv


def test_cli_runs_and_prints_summary(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "cli"), "--algo", "ppo", *_tiny_argv(steps=1)]) == 0
    out = capsys.readouterr().out
    assert "held-out CLEAN reward" in out and "before RL" in out and "after RL" in out
    saved = TrainConfig.load(str(tmp_path / "cli" / "config.json"))
    assert saved.algo.algo == "ppo" and saved.task.task_kwargs == {"max_operand": 20, "num_eval": 16}


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert f.metadata.get("help"), f"{f.name} has no help text"


@pytest.mark.parametrize("overrides, match", [
    (dict(rollout_batch_size=10, mini_batch_size=4), "mini-batch-size"),
    (dict(algo="grpo", rollout_batch_size=8, group_size=3, mini_batch_size=4), "group-size"),
    (dict(algo="grpo", group_size=1), "group-size"),
    (dict(mini_batch_size=4, grad_accum_steps=3), "grad-accum-steps"),
    (dict(reward="learned"), "--reward"),
])
def test_batch_sizes_that_do_not_divide(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_training(tiny_config(tmp_path, **overrides))
    assert main(["--output-dir", str(tmp_path / "cli"), *_tiny_argv(**overrides)]) == 2


def _save_tiny_model(path, *, pad=True, eos=True):
    from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64))
    if not pad:
        tok.pad_token = None
        model.config.pad_token_id = None
        model.generation_config.pad_token_id = None
    if not eos:
        tok.eos_token = None
        model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_tokenizer_without_pad_token_uses_eos_with_warning(tmp_path, caplog):
    path = _save_tiny_model(tmp_path / "nopad", pad=False)
    with caplog.at_level(logging.WARNING, logger="vrpo_fast"):
        summary = run_training(tiny_config(tmp_path, model=path, steps=1))
    assert any("no pad token" in rec.getMessage() and "eos" in rec.getMessage() for rec in caplog.records)
    assert summary["steps"] == 1
    with open(os.path.join(summary["checkpoint"], "policy", "tokenizer_config.json")) as f:
        assert json.load(f).get("pad_token") == "<eos>"


def test_tokenizer_without_pad_or_eos_is_an_error(tmp_path):
    from vrpo_fast.models.loading import load_tokenizer

    path = _save_tiny_model(tmp_path / "noeos", pad=False, eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        load_tokenizer(path)


def test_model_path_that_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    path = tmp_path / "t5"
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50).save_pretrained(path)
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        run_training(tiny_config(tmp_path, model=str(path)))
    with pytest.raises(NotACausalLMError, match="no config.json"):
        run_training(tiny_config(tmp_path / "x", model=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        run_training(tiny_config(tmp_path / "y", model=str(tmp_path / "missing")))
    assert main(["--output-dir", str(tmp_path / "cli"), *_tiny_argv(model=str(path))]) == 2


def test_critic_from_a_saved_value_model(tmp_path):
    first = run_training(tiny_config(tmp_path / "a", steps=1))
    critic = os.path.join(first["checkpoint"], "value")
    summary = run_training(tiny_config(tmp_path / "b", steps=1, critic=critic))
    assert summary["steps"] == 1


def test_bf16_autocast_gradient_checkpointing_and_eager_attention(tmp_path):
    summary = run_training(tiny_config(tmp_path, steps=1, mixed_precision="bf16", gradient_checkpointing=True,
                                       attn_implementation="eager", grad_accum_steps=2))
    record = read_metrics(summary["metrics_path"])[0]
    assert all(record[k] is not None for k in LOSS_KEYS["vrpo"])
    saved = json.load(open(os.path.join(summary["checkpoint"], "policy", "config.json")))
    assert saved.get("dtype", saved.get("torch_dtype")) in (None, "float32")  # master weights stay fp32


def test_warmup_stops_once_the_probe_reaches_the_target(tmp_path, monkeypatch):
    probes = []

    def fake_evaluate(accelerator, lm, tokenizer, reward_fn, examples, cfg, **kwargs):
        probes.append(len(examples))
        return 0.4

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    summary = run_training(tiny_config(tmp_path, steps=1, warmup_steps=10, warmup_check_every=2, warmup_target=0.3,
                                       warmup_probe_size=5))
    with open(os.path.join(summary["run_dir"], "warmup.json")) as f:
        warmup = json.load(f)
    assert warmup["warmup_steps"] == 2 and warmup["warmup_probe_reward"] == 0.4
    assert probes[0] == 5  # the probe uses train prompts, not the held-out ones (8)
