"""masked_mean and sequence_perplexity vs plain Python loops."""
import math

import pytest
import torch

from vrpo_fast.ops import masked_mean, sequence_perplexity


def _loop_mean(values, mask):
    picked = [float(v) for v, m in zip(values.tolist(), mask.tolist()) if m]
    return sum(picked) / len(picked) if picked else 0.0


def test_masked_mean_all_and_dim():
    values = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.4
    mask[2] = False  # fully masked row
    total = masked_mean(values, mask)
    assert total.dim() == 0
    assert math.isclose(float(total), _loop_mean(values.flatten(), mask.flatten()), rel_tol=1e-12)
    rows = masked_mean(values, mask, dim=-1)
    assert rows.shape == (4,) and rows.dtype == torch.float64
    for b in range(4):
        assert math.isclose(float(rows[b]), _loop_mean(values[b], mask[b]), rel_tol=1e-12, abs_tol=1e-15)
    assert rows[2] == 0
    cols = masked_mean(values, mask, dim=0)
    for t in range(7):
        assert math.isclose(float(cols[t]), _loop_mean(values[:, t], mask[:, t]), rel_tol=1e-12, abs_tol=1e-15)


def test_masked_mean_all_masked_is_zero():
    out = masked_mean(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert out == 0 and not torch.isnan(out)


def test_masked_mean_ignores_nonfinite_masked_values():
    values = torch.tensor([[1.0, float("nan"), 3.0], [-float("inf"), 2.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out = masked_mean(values, mask, dim=1)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0]))
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_masked_mean_mask_dtypes(mask_dtype):
    values = torch.arange(6.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]]).to(mask_dtype)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([0.5, 5.0]))


def test_masked_mean_half_counts_in_fp32():
    # A count above 65504 is inf in fp16: counting in the values' dtype would return 0 here.
    values = torch.full((70000,), 0.5, dtype=torch.float16)
    out = masked_mean(values, torch.ones(70000, dtype=torch.bool))
    assert out.dtype == torch.float16 and out.item() == 0.5
    values = torch.full((2, 40000), 0.25, dtype=torch.bfloat16)
    out = masked_mean(values, torch.ones(2, 40000, dtype=torch.bool), dim=1)
    assert out.dtype == torch.bfloat16 and torch.all(out == 0.25)


def test_sequence_perplexity_matches_loop():
    logprobs = -torch.rand(3, 6, dtype=torch.float64) * 4
    mask = torch.rand(3, 6) > 0.3
    mask[1] = False
    logprobs[0, ~mask[0]] = -float("inf")  # padding positions may hold anything
    ppl = sequence_perplexity(logprobs, mask)
    assert ppl.shape == (3,)
    for b in range(3):
        nll = -_loop_mean(logprobs[b].masked_fill(~mask[b], 0.0), mask[b])
        assert math.isclose(float(ppl[b]), math.exp(nll), rel_tol=1e-12)
    assert ppl[1] == 1.0


def test_sequence_perplexity_1d_and_half():
    lp = torch.tensor([-1.0, -2.0, -3.0, -100.0])
    mask = torch.tensor([True, True, True, False])
    out = sequence_perplexity(lp, mask)
    assert out.dim() == 0
    assert math.isclose(float(out), math.exp(2.0), rel_tol=1e-6)
    half = sequence_perplexity(lp.to(torch.bfloat16).unsqueeze(0), mask.unsqueeze(0))
    assert half.dtype == torch.float32 and math.isclose(float(half[0]), math.exp(2.0), rel_tol=1e-6)
    # Uniform distribution over V tokens has perplexity V.
    uniform = torch.full((2, 5), -math.log(50257.0))
    torch.testing.assert_close(sequence_perplexity(uniform, torch.ones(2, 5)), torch.full((2,), 50257.0))


def test_errors():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.randn(2, 3), torch.ones(3, 2))
    with pytest.raises(TypeError, match="values"):
        masked_mean(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask"):
        masked_mean(torch.randn(2, 3), [[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="logprobs"):
        sequence_perplexity(torch.randn(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="mask"):
        sequence_perplexity(torch.randn(2, 3), torch.ones(2, 4))
