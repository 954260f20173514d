"""Rollout generation (left padding, masks, EOS handling) and token scoring alignment."""
import pytest
import torch

from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from vrpo_fast.rollout import completion_mask, encode_prompts, format_prompt, generate, shift_left
from vrpo_fast.scoring import TokenScorer, next_token_labels, reference_stats, score

SHAPE = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, SHAPE, seed=0, attn_implementation="eager")


def test_completion_mask_stops_after_first_eos_even_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, eos, eos], [eos, 7, 8, 9, 9], [5, 5, 5, 5, 5]])
    m = completion_mask(ids, [eos])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    m2 = completion_mask(torch.tensor([[5, 9, 6]]), [9, 6])  # several EOS ids
    assert m2.tolist() == [[1, 1, 0]]


def test_encode_prompts_left_pads_and_restores_padding_side(tok):
    tok.padding_side = "right"
    try:
        ids, mask = encode_prompts(tok, ["1+2=", "31+40="])
    finally:
        side = tok.padding_side
        tok.padding_side = "left"
    assert side == "right"
    assert ids.shape == (2, 7)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert ids[0, :2].tolist() == [tok.pad_token_id] * 2 and ids[0, 2] == tok.bos_token_id


def test_format_prompt_uses_chat_template_only_when_present(tok):
    assert format_prompt(tok, "1+1=") == "1+1="
    tok.chat_template = "{% for m in messages %}U:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    try:
        assert format_prompt(tok, "1+1=") == "U:1+1=A:"
        ids, _ = encode_prompts(tok, ["1+1="])
        assert tok.decode(ids[0]) == "U:1+1=A:"  # the template carries its own special tokens: no <bos> added
    finally:
        tok.chat_template = None


def test_generate_masks_and_alignment(tok, model):
    torch.manual_seed(0)
    prompts = ["1+2=", "31+40=", "7+7="]
    roll = generate(model, tok, prompts, max_new_tokens=5, temperature=1.0)
    B, L = roll.input_ids.shape
    P = roll.prompt_length
    assert P == 7 and L <= P + 5 and B == 3
    ids_p, mask_p = encode_prompts(tok, prompts)
    assert torch.equal(roll.input_ids[:, :P], ids_p)  # prompt left-padded, unchanged
    assert torch.equal(roll.attention_mask[:, :P], mask_p)
    assert not roll.response_mask[:, :P].any()
    resp = roll.response_mask[:, P:]
    assert torch.equal(roll.attention_mask[:, P:].bool(), resp)
    for i in range(B):
        n = int(resp[i].sum())
        assert n >= 1 and resp[i, :n].all() and not resp[i, n:].any()  # contiguous, from the first column
        ids = roll.input_ids[i, P:P + n].tolist()
        assert tok.eos_token_id not in ids[:-1]  # EOS, if any, is the last response token
        assert (roll.input_ids[i, P + n:] == tok.pad_token_id).all()
        text = tok.decode(ids, skip_special_tokens=True)  # specials (EOS, a sampled <bos>) are dropped
        assert roll.completions[i] == text
    # state-aligned mask: position t scores token t + 1
    assert torch.equal(roll.action_mask, shift_left(roll.response_mask))
    assert torch.equal(roll.action_mask[:, P - 1:L - 1], roll.response_mask[:, P:])


def test_greedy_generation_is_deterministic(tok, model):
    a = generate(model, tok, ["12+3="], max_new_tokens=4, temperature=0)
    b = generate(model, tok, ["12+3="], max_new_tokens=4, temperature=0)
    assert torch.equal(a.input_ids, b.input_ids)


def test_scorer_matches_logits_of_unpadded_sequences(tok, model):
    """Log-probs of a left-padded batch equal those of each sequence alone (positions ignore padding)."""
    torch.manual_seed(1)
    roll = generate(model, tok, ["1+2=", "31+40="], max_new_tokens=4, temperature=1.0)
    scorer = TokenScorer(model)
    lp, ent = score(scorer, roll, temperature=0.7)
    labels = next_token_labels(roll.input_ids, roll.action_mask)
    for i in range(2):
        keep = roll.attention_mask[i].bool()
        ids = roll.input_ids[i][keep].unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits[0].double() / 0.7
        logp = torch.log_softmax(logits, -1)
        lab = labels[i][keep]
        on = lab != -100
        want_lp = logp[on].gather(-1, lab[on].unsqueeze(-1)).squeeze(-1)
        want_ent = -(logp.exp() * logp).sum(-1)[on]
        torch.testing.assert_close(lp[i][keep][on].double(), want_lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent[i][keep][on].double(), want_ent, rtol=1e-4, atol=1e-4)
        assert (lp[i][~roll.action_mask[i]] == 0).all()


def test_reference_stats_perplexity(tok, model):
    torch.manual_seed(2)
    roll = generate(model, tok, ["5+5=", "9+19="], max_new_tokens=4, temperature=1.0)
    stats = reference_stats(TokenScorer(model), roll)
    m = roll.action_mask.float()
    want = torch.exp((stats.nll * m).sum(-1) / m.sum(-1))
    torch.testing.assert_close(stats.perplexity, want)
    assert (stats.entropy[roll.action_mask] > 0).all()


def test_keyed_sampling_ignores_batch_composition_and_padding(tok, model):
    """Completion i depends on (prompt, seed, key) only: the data-parallel equivalence rests on this."""
    prompts = ["1+2=", "31+40=", "7+7=", "123+4="]
    keys = torch.tensor([10, 11, 12, 13])
    whole = generate(model, tok, prompts, max_new_tokens=6, temperature=0.9, seed=5, row_keys=keys)
    first = generate(model, tok, prompts[:2], max_new_tokens=6, temperature=0.9, seed=5, row_keys=keys[:2])
    second = generate(model, tok, prompts[2:][::-1], max_new_tokens=6, temperature=0.9, seed=5,
                      row_keys=keys[2:].flip(0))
    assert first.completions + second.completions[::-1] == whole.completions
    other_seed = generate(model, tok, prompts, max_new_tokens=6, temperature=0.9, seed=6, row_keys=keys)
    other_keys = generate(model, tok, prompts, max_new_tokens=6, temperature=0.9, seed=5, row_keys=keys + 4)
    assert other_seed.completions != whole.completions and other_keys.completions != whole.completions


def test_keyed_sampler_samples_softmax_over_temperature():
    """Gumbel-max with keyed noise: token frequencies match softmax(logits / T) (chi-square-sized tolerance)."""
    from vrpo_fast.rollout import KeyedSampler

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, -30.0]])
    n, T = 40000, 1.7
    sampler = KeyedSampler(3, torch.arange(n), prompt_length=4, temperature=T)
    picks = sampler(torch.zeros(n, 6, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    p = torch.softmax(logits[0].double() / T, 0)
    assert torch.allclose(freq, p, atol=4 * (p * (1 - p) / n).sqrt().max().item() + 1e-9)
    assert freq[4] == 0
    # the position is part of the key: the next token's noise is fresh
    nxt = sampler(torch.zeros(n, 7, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
    assert (nxt != picks).float().mean() > 0.3


def test_generate_rejects_bad_row_keys(tok, model):
    with pytest.raises(ValueError, match="row_keys"):
        generate(model, tok, ["1+2="], max_new_tokens=2, row_keys=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="row_keys"):
        generate(model, tok, ["1+2=", "3+4="], max_new_tokens=2, row_keys=torch.tensor([1]))
