"""Atomic checkpoints, the 'latest' pointer, pruning, RNG state round-trips and metrics truncation."""
import json
import os
import random

import numpy as np
import pytest
import torch

from vrpo_fast import checkpoint as ckpt
from vrpo_fast.metrics import MetricsWriter, plot_curves, read_metrics, without_timings
from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    shape = TinyModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return build_tiny_model(tok, shape), tok


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    final = str(tmp_path / "d")
    ckpt.atomic_directory(final, lambda d: open(os.path.join(d, "a"), "w").write("1"))
    ckpt.atomic_directory(final, lambda d: open(os.path.join(d, "b"), "w").write("2"))
    assert sorted(os.listdir(final)) == ["MANIFEST.json", "b"]  # replaced, not merged
    assert ckpt.verify_manifest(final) is None
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no .tmp / .old left behind


def test_failed_write_keeps_previous_checkpoint(tmp_path, tiny):
    model, tok = tiny
    run = str(tmp_path)
    ckpt.save_checkpoint(run, 1, policy=model, tokenizer=tok, trainer_state={"step": 1})
    assert ckpt.latest_checkpoint(run).endswith("step_000001")

    class Boom(RuntimeError):
        pass

    class BrokenModel:
        def save_pretrained(self, path):
            os.makedirs(path)
            raise Boom("disk full")

    with pytest.raises(Boom):
        ckpt.save_checkpoint(run, 2, policy=BrokenModel(), tokenizer=tok, trainer_state={"step": 2})
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_000001")
    assert ckpt.load_trainer_state(latest)["step"] == 1
    assert not os.path.exists(os.path.join(run, "checkpoints", "step_000002"))  # only the .tmp was touched


def test_save_checkpoint_layout_latest_and_pruning(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny
    run = str(tmp_path)
    assert ckpt.latest_checkpoint(run) is None
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, policy=model, tokenizer=tok, trainer_state={"step": step, "x": [step]},
                             keep=2)
    names = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert names == ["latest", "step_000002", "step_000003"]
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_000003")
    assert ckpt.load_trainer_state(latest) == {"step": 3, "x": [3]}
    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(latest, "policy"), local_files_only=True)
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n  # bitwise
    assert AutoTokenizer.from_pretrained(os.path.join(latest, "policy"))("1+1=")["input_ids"] == tok("1+1=")["input_ids"]


def test_latest_pointing_at_incomplete_checkpoint_is_ignored(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "step_000005")
    (tmp_path / "checkpoints" / "latest").write_text("step_000005\n")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_metrics_writer_truncates_on_resume_and_plots(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    w = MetricsWriter(path)
    for s in range(1, 5):
        w.log({"step": s, "clean_reward": torch.tensor(0.1 * s), "noisy_reward": 0.5, "policy_loss": float("nan"),
               "step_time_s": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[0]["policy_loss"] is None  # NaN -> null (strict JSON)
    w2 = MetricsWriter(path, resume_step=2)  # the run is resumed from the step-2 checkpoint
    w2.log({"step": 3, "clean_reward": 0.9})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert read_metrics(path)[2]["clean_reward"] == 0.9
    assert without_timings(read_metrics(path))[0] == {"step": 1, "clean_reward": pytest.approx(0.1),
                                                     "noisy_reward": 0.5, "policy_loss": None}
    MetricsWriter(path)  # a fresh run starts an empty file
    assert read_metrics(path) == []
    w.log({"step": 1, "clean_reward": 0.2, "noisy_reward": 0.3, "value_loss": 1.0})
    png = plot_curves(path, str(tmp_path / "curves.png"))
    assert png and os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    json.dumps(read_metrics(path))
