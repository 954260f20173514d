"""The step benchmark's FLOP count (``vrpo_fast.flops``) and mixed precision on CPU (``vrpo_fast.precision``).

Fast: the count of a tiny config against a hand count, and its matmul part against
``torch.utils.flop_counter.FlopCounterMode`` on a real tiny Llama (forward, forward + backward, and
``rollout.generate`` with the KV cache). Slow: bf16 autocast scoring of SmolLM2 on CPU against fp32.
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
