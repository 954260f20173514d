"""Learned reward models: a tiny one trained here prefers good replies; save/load/score round trip."""
import os
import random

import pytest
import torch

from vrpo_fast.tasks import dialogue
from vrpo_fast.tasks.dialogue import EMPTY, RUDE, TOPICS, DialogueTask, all_conversations
from vrpo_fast.tasks.reward_model import (
    RewardModelConfig,
    RewardModelScorer,
    build_reward_model,
    build_reward_tokenizer,
    cache_root,
    load_reward_model,
    preference_accuracy,
    train_reward_model,
)

TINY = RewardModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         max_length=96, epochs=2, batch_size=16, lr=5e-3, seed=0)


def _pairs(n, seed):
    """Polite on-topic replies preferred over rude or empty ones (an easy, clearly learnable signal)."""
    rng = random.Random(seed)
    convs = all_conversations()
    p, c, r = [], [], []
    for _ in range(n):
        prompt, topic, _ = rng.choice(convs)
        p.append(prompt)
        c.append(rng.choice(TOPICS[topic][1]))
        r.append(rng.choice(RUDE + EMPTY))
    return p, c, r


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm") / "tiny-rm")
    p, c, r = _pairs(192, seed=0)
    model, tok, info = train_reward_model(p, c, r, out_dir=out, config=TINY)
    return model, tok, info, out


def test_trained_reward_model_prefers_good_replies(tiny_rm):
    model, tok, info, _ = tiny_rm
    assert info["steps"] == 24 and info["n_pairs"] == 192
    scorer = RewardModelScorer(model, tok)
    p, c, r = _pairs(200, seed=1)  # held-out triples
    acc = preference_accuracy(scorer, p, c, r)
    assert acc > 0.8, acc  # chance is 0.5
    good, bad = scorer(p, c), scorer(p, r)
    assert good.mean() > bad.mean() + 0.1


def test_load_round_trip_and_scores(tiny_rm):
    model, tok, _, out = tiny_rm
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vrpo_fast_reward_model.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    loaded = load_reward_model(out, device="cpu", batch_size=3)
    in_memory = RewardModelScorer(model, tok, batch_size=64)
    p, c, _ = _pairs(10, seed=2)
    s = loaded(p, c)
    assert s.dtype == torch.float32 and s.shape == (10,) and s.device.type == "cpu"
    assert ((s > 0) & (s < 1)).all()
    torch.testing.assert_close(s, in_memory(p, c), rtol=0, atol=1e-5)
    # batch-independent: each pair scored alone gives the same value (right padding)
    alone = torch.cat([loaded([p[i]], [c[i]]) for i in range(10)])
    torch.testing.assert_close(s, alone, rtol=0, atol=1e-5)
    # sigmoid of the raw score
    torch.testing.assert_close(s, torch.sigmoid(loaded.scores(p, c)))
    assert loaded([], []).shape == (0,)


def test_scorer_truncates_and_validates(tiny_rm):
    _, _, _, out = tiny_rm
    scorer = load_reward_model(out, max_length=64)
    assert scorer.max_length == 64
    long_prompt = "User: " + "blah " * 200 + "\nBot: "
    s = scorer([long_prompt, "User: hi\nBot: "], ["x" * 500, ""])
    assert s.shape == (2,) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="completions"):
        scorer(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="sequences of strings"):
        scorer("a", "b")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reward_model("/definitely/not/here")


def test_two_label_classifier_and_missing_pad_token(tmp_path):
    """Any local HF sequence classifier: 2 labels -> P(label 1); no pad token -> falls back to eos."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = build_reward_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=None,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # drop the pad token from the saved tokenizer
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    reloaded.pad_token = None
    scorer = RewardModelScorer(LlamaForSequenceClassification.from_pretrained(tmp_path), reloaded)
    assert scorer.tokenizer.pad_token == tok.eos_token and scorer.model.config.pad_token_id == tok.eos_token_id
    prompts, comps = ["User: hi\nBot: ", "User: Name a fruit.\nBot: "], ["Hello!", "An apple."]
    s = scorer(prompts, comps)
    with torch.no_grad():
        enc = reloaded(prompts[0], comps[0], return_tensors="pt")
        expected = torch.softmax(scorer.model(**enc).logits.float(), -1)[0, 1]
    torch.testing.assert_close(s[0], expected, rtol=0, atol=1e-5)

    cfg.num_labels = 3
    with pytest.raises(ValueError, match="num_labels=3"):
        RewardModelScorer(LlamaForSequenceClassification(cfg), tok)


def test_build_reward_model_is_seeded():
    tok = build_reward_tokenizer()
    a, b = build_reward_model(tok, TINY), build_reward_model(tok, TINY)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    enc = tok(["User: hi\nBot: "], [""])
    ids = enc["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.sep_token_id in ids
    assert tok.decode(tok("a b!\n")["input_ids"], skip_special_tokens=True) == "a b!\n"


def test_train_reward_model_validation():
    with pytest.raises(ValueError, match="equally many"):
        train_reward_model(["p"], ["c"], [], config=TINY)


def test_dialogue_task_with_a_local_reward_model(tiny_rm):
    _, _, _, out = tiny_rm
    task = DialogueTask(n_train=20, n_eval=10, reward_model=out)
    ex = task.eval_examples()
    good = task.reward(ex, [e.reference for e in ex])
    rude = task.reward(ex, ["Go away."] * len(ex))
    assert good.dtype == torch.float32 and good.shape == (len(ex),)
    assert good.mean() > rude.mean()
    assert task.describe()["reward_model"] == out


def test_builtin_reward_model_cached(tmp_path, monkeypatch):
    """First use trains and caches; later uses load the cached directory without training."""
    monkeypatch.setenv("VRPO_FAST_CACHE", str(tmp_path))
    assert cache_root() == str(tmp_path)
    calls = []
    real = dialogue.ensure_builtin_reward_model

    def small(cache_dir=None, n_pairs=8000, config=None, log=print):
        calls.append(1)
        return real(cache_dir, n_pairs=64, config=RewardModelConfig(**{**vars(TINY), "epochs": 1}), log=None)

    monkeypatch.setattr(dialogue, "ensure_builtin_reward_model", small)
    path = dialogue.builtin_reward_model_dir()
    assert path.startswith(str(tmp_path))
    task = DialogueTask(n_train=4, n_eval=4)
    r = task.reward(task.eval_examples(), ["Sure!"] * 4)
    assert r.shape == (4,) and os.path.isfile(os.path.join(path, "config.json"))
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))

    def must_not_train(*a, **k):
        raise AssertionError("the cached reward model was retrained")

    monkeypatch.setattr("vrpo_fast.tasks.reward_model.train_reward_model", must_not_train)
    assert real() == path  # cached: returns without training
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
