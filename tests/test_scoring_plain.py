"""TokenScorer(fused=False): the plain-PyTorch scoring path gives what the fused path gives."""
import pytest
import torch

from vrpo_fast.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from vrpo_fast.ops import linear_logprobs_entropy_reference
from vrpo_fast.rollout import generate
from vrpo_fast.scoring import IGNORE_INDEX, TokenScorer, next_token_labels, reference_stats, score


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    lm = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64), seed=3)
    torch.manual_seed(0)
    roll = generate(lm, tok, ["1+2=", "abc", "12345+6="], max_new_tokens=7, temperature=1.0)
    return tok, lm, roll


def _scores(lm, roll, fused, temperature=1.0, compute_entropy=True):
    lm.zero_grad(set_to_none=True)
    lp, ent = score(TokenScorer(lm, fused=fused), roll, temperature=temperature, compute_entropy=compute_entropy)
    return lp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plain_matches_fused_values(tiny, temperature):
    _, lm, roll = tiny
    lp_f, ent_f = _scores(lm, roll, True, temperature)
    lp_p, ent_p = _scores(lm, roll, False, temperature)
    assert lp_p.dtype == torch.float32 and ent_p.dtype == torch.float32
    torch.testing.assert_close(lp_p, lp_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_p, ent_f, rtol=1e-5, atol=1e-5)
    # both against a float64 reference computed from the model's own full logits
    labels = next_token_labels(roll.input_ids, roll.action_mask)
    scorer = TokenScorer(lm, fused=False)
    with torch.no_grad():
        hidden = scorer.hidden_states(roll.input_ids, roll.attention_mask)
        ref_lp, ref_ent = linear_logprobs_entropy_reference(hidden, lm.get_output_embeddings().weight, labels,
                                                            temperature=temperature)
    torch.testing.assert_close(lp_p.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_p.double(), ref_ent, rtol=1e-5, atol=1e-5)
    # masked (prompt / padding) states are exactly 0; scored ones are real log-probs
    off = labels == IGNORE_INDEX
    assert off.any() and (~off).any()
    assert (lp_p[off] == 0).all() and (ent_p[off] == 0).all()
    assert (lp_p[~off] < 0).all() and (ent_p[~off] > 0).all()


def test_plain_matches_fused_gradients(tiny):
    _, lm, roll = tiny
    grads = {}
    for fused in (True, False):
        lp, ent = _scores(lm, roll, fused, temperature=0.9)
        mask = roll.action_mask.float()
        # a loss mixing both outputs with token-dependent weights, so every gradient path matters
        w = torch.linspace(0.5, 1.5, lp.shape[1])
        loss = ((lp * w).sum() + 0.3 * (ent * mask * w.flip(0)).sum()) / mask.sum()
        loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        lm.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 3
    for name, g in grads[True].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[False][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_without_entropy_and_reference_stats(tiny):
    _, lm, roll = tiny
    lp_p, ent_p = _scores(lm, roll, False, compute_entropy=False)
    lp_f, _ = _scores(lm, roll, True, compute_entropy=False)
    assert ent_p is None
    torch.testing.assert_close(lp_p, lp_f, rtol=1e-5, atol=1e-5)
    ref_f = reference_stats(TokenScorer(lm), roll)
    ref_p = reference_stats(TokenScorer(lm, fused=False), roll)
    torch.testing.assert_close(ref_p.perplexity, ref_f.perplexity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_p.entropy, ref_f.entropy, rtol=1e-5, atol=1e-5)
    chunked = reference_stats(TokenScorer(lm, fused=False), roll, batch_size=2)  # 3 rows: chunks of 2 + 1
    torch.testing.assert_close(chunked.logprobs, ref_p.logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.perplexity, ref_p.perplexity, rtol=1e-6, atol=1e-6)


def test_plain_bf16_autocast_close_to_fused(tiny):
    _, lm, roll = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_f, ent_f = _scores(lm, roll, True)
        lp_p, ent_p = _scores(lm, roll, False)
    assert lp_p.dtype == torch.float32
    # same bf16 logits, fp32 statistics on both paths
    torch.testing.assert_close(lp_p, lp_f, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ent_p, ent_f, rtol=2e-2, atol=2e-2)


def test_default_is_fused_and_bad_flag_rejected(tiny):
    _, lm, _ = tiny
    assert TokenScorer(lm).fused is True
    with pytest.raises(TypeError, match="fused"):
        TokenScorer(lm, fused="no")
