"""The step benchmark's FLOP count (``vrpo_fast.flops``) and mixed precision on CPU (``vrpo_fast.precision``).

Fast: the count of a tiny config against a hand count, and its matmul part against
``torch.utils.flop_counter.FlopCounterMode`` on a real tiny Llama (forward, forward + backward, and
``rollout.generate`` with the KV cache); ``choose_cpu_mixed_precision`` on scripted CPU flags and GEMM
rates; ``use_fp32_attention`` and ``cache_low_precision_weights`` on a tiny Llama against plain SDPA /
autocast. Slow: bf16 autocast scoring of SmolLM2 on CPU against fp32.
"""
from __future__ import annotations

import pytest
import torch

from vrpo_fast.flops import (
    PHASES,
    DecoderShape,
    causal_pairs,
    forward_flops,
    generate_flops,
    head_flops,
    rl_step_flops,
)

# hidden 16, mlp 24, 2 layers, 4 heads of dim 4, 2 kv heads, vocab 40
TINY = DecoderShape(hidden=16, intermediate=24, layers=2, heads=4, kv_heads=2, head_dim=4, vocab=40)


def test_hand_count_tiny_config():
    # projections per layer: q 16*16 + k, v 2*16*8 + o 16*16 + mlp 3*16*24 = 256 + 256 + 256 + 1152 = 1920
    assert TINY.projection_params == 2 * 1920
    # one forward over [2, 5]: 10 tokens * 2 * 3840 = 76800 projection flops; attention 4 * 2 layers *
    # 4 heads * 4 dims = 128 per (query, key) pair, 2 rows * (1 + 2 + 3 + 4 + 5) = 30 pairs -> 3840;
    # lm_head 10 * 2 * 16 * 40 = 12800
    assert causal_pairs(5) == 15 and causal_pairs(1, past=5) == 6 and causal_pairs(2, past=3) == 4 + 5
    assert forward_flops(TINY, 2, 5) == 76800 + 3840 + 12800
    assert forward_flops(TINY, 2, 5, head_tokens=0) == 76800 + 3840
    assert head_flops(TINY, 3) == 3 * 1280
    # generate, prompt 3, 3 new tokens, batch 2: prefill 6 tokens (46080) + 2 rows * 6 pairs (1536);
    # decode 1: 2 tokens (15360) + 2 rows * 4 keys (1024); decode 2: 15360 + 2 * 5 * 128 (1280);
    # lm_head on 2 rows x 3 tokens (7680)
    assert generate_flops(TINY, 2, 3, 3) == 46080 + 1536 + 15360 + 1024 + 15360 + 1280 + 7680
    assert generate_flops(TINY, 2, 3, 0) == 0
    # the step, L = 6: policy forward 12 tokens * 7680 + 2 * 21 pairs * 128 + 12 * 1280 = 92160 + 5376
    # + 15360 = 112896; critic forward 92160 + 5376 + value head 2 * 100 * 12 = 2400 -> 99936
    step = rl_step_flops(TINY, batch=2, prompt_length=3, new_tokens=3, value_head_params=100)
    assert step == {"generate": 88320, "score": 2 * 112896, "value_old": 99936, "gae": 0, "policy_fb": 3 * 112896,
                    "value_fb": 3 * 99936, "optimizer": 0, "step": 88320 + 5 * 112896 + 4 * 99936}
    assert set(step) == set(PHASES) | {"step"}
    # a scorer that makes logits only for the 4 labelled positions
    trimmed = rl_step_flops(TINY, batch=2, prompt_length=3, new_tokens=3, scored_tokens=4)
    assert trimmed["score"] == 2 * (92160 + 5376 + 4 * 1280)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="DecoderShape.hidden must be a positive int"):
        DecoderShape(hidden=0, intermediate=1, layers=1, heads=1, kv_heads=1, head_dim=1, vocab=1)
    with pytest.raises(ValueError, match="must be a multiple of kv_heads"):
        DecoderShape(hidden=8, intermediate=1, layers=1, heads=3, kv_heads=2, head_dim=1, vocab=1)
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        forward_flops(TINY, -1, 3)
    with pytest.raises(ValueError, match="prompt_length must be an int >= 1"):
        generate_flops(TINY, 1, 0, 3)
    with pytest.raises(ValueError, match="not a Llama-style decoder config"):
        DecoderShape.from_config(object())


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY.vocab, hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
                         num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                         num_key_value_heads=TINY.kv_heads, max_position_embeddings=64, tie_word_embeddings=True,
                         attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _counted(fn):
    """(linear-layer flops, attention-matmul flops) that FlopCounterMode sees while ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    ops = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts()["Global"].items()}
    return ops.get("mm", 0) + ops.get("addmm", 0), ops.get("bmm", 0)


def test_matmul_part_matches_flop_counter_on_a_real_tiny_llama():
    model = _tiny_llama()
    assert DecoderShape.from_config(model.config) == TINY
    ids = torch.randint(3, TINY.vocab, (2, 5))
    with torch.no_grad():
        linear, attn = _counted(lambda: model(input_ids=ids))
    assert linear == forward_flops(TINY, 2, 5) - 3840  # everything but attention
    # eager attention multiplies the full 5 x 5 score matrix (masked afterwards), 128 flops per pair
    assert attn == 128 * 2 * 25
    # forward + backward: every matmul's input and weight gradients, 3x the forward
    linear, _ = _counted(lambda: model(input_ids=ids, labels=ids).loss.backward())
    assert linear == 3 * (forward_flops(TINY, 2, 5) - 3840)


def test_generate_count_matches_flop_counter():
    """The KV-cache generate of the benchmark: prefill, one column per decode step, logits for the
    last column only."""
    from transformers import PreTrainedTokenizerFast

    from vrpo_fast.models.tiny import build_char_tokenizer
    from vrpo_fast.rollout import generate

    tokenizer = build_char_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    model = _tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    shape = DecoderShape.from_config(model.config)
    out = {}
    linear, _ = _counted(lambda: out.setdefault("r", generate(model, tokenizer, ["12+3", "7*8"], max_new_tokens=4,
                                                                temperature=1.0, seed=0)))
    rollout = out["r"]
    P, N = rollout.prompt_length, rollout.input_ids.shape[1] - rollout.prompt_length
    assert N >= 1
    attention = sum(4 * shape.layers * shape.heads * shape.head_dim * 2 * c
                    for c in [causal_pairs(P)] + [causal_pairs(1, past=P + i - 1) for i in range(1, N)])
    assert linear == generate_flops(shape, 2, P, N) - attention


# ---------------------------------------------------------------------------------------------------
# mixed precision on CPU: the choice, and bf16 statistics of the real model against fp32 (slow)
# ---------------------------------------------------------------------------------------------------
def test_choose_cpu_mixed_precision_follows_the_flags_and_the_measured_rates(monkeypatch, tmp_path):
    from vrpo_fast import precision

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert precision.cpu_bf16_flags(str(info)) == ()
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert precision.cpu_bf16_flags(str(info)) == ("amx_bf16", "avx512_bf16")
    assert precision.cpu_bf16_flags(str(tmp_path / "missing")) is None

    precision._measure_once.cache_clear()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    choice = precision.choose_cpu_mixed_precision()
    assert choice.mixed_precision == "no" and "no native bf16" in choice.reason

    precision._measure_once.cache_clear()
    rates = {torch.float32: 100.0, torch.bfloat16: 450.0}
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(precision, "measure_cpu_gemm_gflops", lambda dtype: rates[dtype])
    threads = torch.get_num_threads()
    assert precision.choose_cpu_mixed_precision() == ("bf16", precision.choose_cpu_mixed_precision().reason, 100.0,
                                                      450.0)
    assert "4.5x" in precision.choose_cpu_mixed_precision().reason
    assert precision.choose_cpu_mixed_precision(5.0).mixed_precision == "no"
    assert torch.get_num_threads() == threads  # measured on one thread, the setting restored
    with pytest.raises(ValueError, match="min_speedup must be a number > 0"):
        precision.choose_cpu_mixed_precision(0)
    precision._measure_once.cache_clear()


def test_measured_gemm_rate_is_the_best_repeat(monkeypatch):
    """2 m k n flops over the fastest of the timed repeats, read from a scripted clock."""
    from vrpo_fast import precision
    from vrpo_fast.precision import measure_cpu_gemm_gflops

    ticks = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.002])  # repeats of 3 ms, 1 ms, 2 ms
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(ticks))
    assert measure_cpu_gemm_gflops(torch.bfloat16, 64, 32, 16, reps=3) == pytest.approx(2 * 64 * 32 * 16 / 1e-3 / 1e9)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="dtype must be"):
        measure_cpu_gemm_gflops(torch.float16)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        measure_cpu_gemm_gflops(torch.float32, 8, 0, 8)


def _smollm2_or_skip():
    from vrpo_fast.models.presets import load_model_and_tokenizer, resolve_model_source

    try:
        resolve_model_source("smollm2-135m")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"the smollm2 extra is not installed ({err})")
    return load_model_and_tokenizer("smollm2-135m")


MATH_PROMPTS = ["What is 12 + 7?", "Tom has 3 apples and buys 5 more. How many apples does he have now?",
                "What is 9 times 6? Answer with a number.", "A box holds 4 rows of 5 eggs. How many eggs are in it?"]


def _bf16_vs_fp32_statistics():
    """Rollout of SmolLM2 (fp32), then its response tokens scored four ways: fp32; bf16 autocast with
    fp32 weights (the policy under --mixed-precision bf16); a bf16 copy of the weights under autocast
    (the frozen reference under bf16); the plain full-logits path in fp32 (an independent fp32 check)."""
    from vrpo_fast.models.loading import frozen_copy
    from vrpo_fast.rollout import generate
    from vrpo_fast.scoring import TokenScorer, score

    model, tokenizer = _smollm2_or_skip()
    model.eval()
    rollout = generate(model, tokenizer, MATH_PROMPTS, max_new_tokens=24, temperature=1.0, seed=0)
    ref = frozen_copy(model).to(torch.bfloat16)
    with torch.no_grad():
        fp32 = score(TokenScorer(model), rollout)
        plain = score(TokenScorer(model, fused=False), rollout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = score(TokenScorer(model), rollout)
            ref16 = score(TokenScorer(ref), rollout)
    return rollout.action_mask.bool(), fp32, plain, auto, ref16


@pytest.mark.slow
def test_bf16_autocast_scoring_on_cpu_is_close_to_fp32_on_the_real_model():
    """SmolLM2's per-token log-probs and entropies on its own sampled responses: bf16 (the policy under
    autocast, and the reference held in bf16) within a few hundredths of a nat of fp32 on average,
    a few tenths at worst (measured 2026-12-01 on a 2-core Xeon: mean |d log p| 0.026 / 0.033, max
    0.14 / 0.23; entropy 0.019 / 0.025, max 0.12 / 0.11), with no systematic shift; fp32 itself
    agrees with the plain full-logits path to 1e-4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared CPU one thread is the fast setting
    try:
        mask, fp32, plain, auto, ref16 = _bf16_vs_fp32_statistics()
    finally:
        torch.set_num_threads(threads)
    assert mask.sum() >= 40  # enough scored response tokens to average over
    lp32, ent32 = fp32[0][mask].double(), fp32[1][mask].double()
    assert (lp32 < 0).all() and ent32.mean() > 0.3  # real, spread-out distributions
    for got in plain:
        assert got.dtype == torch.float32
    torch.testing.assert_close(plain[0][mask].double(), lp32, rtol=0, atol=1e-4)
    torch.testing.assert_close(plain[1][mask].double(), ent32, rtol=0, atol=1e-4)
    for name, (lp, ent) in (("policy under autocast", auto), ("bf16 reference", ref16)):
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32, name  # statistics stay fp32
        d_lp, d_ent = lp[mask].double() - lp32, ent[mask].double() - ent32
        assert d_lp.abs().mean() > 1e-4, name  # it did run in bf16
        assert d_lp.abs().mean() < 0.06 and d_lp.abs().max() < 0.4, (name, d_lp.abs().mean(), d_lp.abs().max())
        assert abs(d_lp.mean()) < 0.02, (name, d_lp.mean())  # no systematic bias in log pi (or the KL)
        assert d_ent.abs().mean() < 0.05 and d_ent.abs().max() < 0.3, (name, d_ent.abs().mean(), d_ent.abs().max())
        assert abs(d_ent.mean()) < 0.02, (name, d_ent.mean())
        # sequence log-probs (what the KL penalty adds up), <= 24 tokens: within 1 nat (measured <= 0.27)
        seq_err = ((lp.double() - fp32[0].double()) * mask.double()).sum(1).abs()
        assert seq_err.max() < 1.0, (name, seq_err)


def test_fp32_attention_on_cpu_matches_sdpa_in_fp32_and_refuses_other_kernels():
    """use_fp32_attention: fp32 models are unchanged bit for bit; under bf16 autocast the attention runs
    in fp32 (the same as SDPA on the fp32-upcast q / k / v), so the logits move towards fp32's."""
    from vrpo_fast.precision import FP32_CPU_ATTENTION, use_fp32_attention

    torch.manual_seed(0)
    ids = torch.randint(3, TINY.vocab, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    sdpa = _tiny_llama()
    sdpa.config._attn_implementation = "sdpa"
    with torch.no_grad():
        ref = sdpa(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sdpa(input_ids=ids, attention_mask=mask).logits.float()
        use_fp32_attention(sdpa)
        assert {m.config._attn_implementation for m in sdpa.modules() if hasattr(m, "config")} == {FP32_CPU_ATTENTION}
        assert torch.equal(sdpa(input_ids=ids, attention_mask=mask).logits, ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sdpa(input_ids=ids, attention_mask=mask).logits.float()
    assert (low - ref).abs().max() > 1e-4 and (mixed - ref).abs().max() > 1e-4  # bf16 did run
    torch.testing.assert_close(mixed, ref, rtol=0, atol=0.1)
    # the attention itself: bf16 q / k / v under autocast give SDPA of their fp32 upcasts, rounded once
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vrpo_fast.precision import _sdpa_fp32_on_cpu

    layer = sdpa.model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 7, TINY.head_dim).to(torch.bfloat16) for h in (TINY.heads, TINY.kv_heads,
                                                                                  TINY.kv_heads))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _sdpa_fp32_on_cpu(layer, q, k, v, causal, dropout=0.0, scaling=TINY.head_dim ** -0.5)
    want, _ = sdpa_attention_forward(layer, q.float(), k.float(), v.float(), causal, dropout=0.0,
                                     scaling=TINY.head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="replaces SDPA attention; .* uses 'eager'"):
        use_fp32_attention(_tiny_llama())
    with pytest.raises(ValueError, match="holds no transformers model"):
        use_fp32_attention(torch.nn.Linear(2, 2))


def test_cached_low_precision_weights_equal_autocast_bit_for_bit_across_optimizer_steps():
    """Two micro-batches, a fused AdamW step (which does not bump the weights' version counters), two
    more: the cached bf16 weights give plain autocast's logits and gradients exactly, and are refreshed
    after the step."""
    import copy

    from vrpo_fast.precision import cache_low_precision_weights

    plain = _tiny_llama().train()
    cached = copy.deepcopy(plain)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for name, m in (("p", plain),
                                                                                           ("c", cached))}
    assert cache_low_precision_weights(cached, [opts["c"]]) == 2 * 7 + 1  # 7 per layer + lm_head
    ids = torch.randint(3, TINY.vocab, (4, 6))
    for step in range(2):
        for rows in (slice(0, 2), slice(2, 4)):
            outs = {}
            for name, m in (("p", plain), ("c", cached)):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = m(input_ids=ids[rows]).logits
                logits.float().square().mean().backward()
                outs[name] = logits
            assert torch.equal(outs["p"], outs["c"]), step
        for (n, a), b in zip(plain.named_parameters(), cached.parameters()):
            assert torch.equal(a.grad, b.grad), (step, n)
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # outside autocast: the fp32 weights, untouched
        assert torch.equal(plain(input_ids=ids).logits, cached(input_ids=ids).logits)
    with pytest.raises(ValueError, match="has no nn.Linear"):
        cache_low_precision_weights(torch.nn.ReLU())
