"""Token rewards and advantage estimators against hand-computed numbers and plain-Python loops."""
import math
import statistics

import pytest
import torch

from vrpo_fast.algorithms import ADVANTAGE_ESTIMATORS, gae_advantages, grpo_advantages, token_level_rewards, whiten


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def loop_gae(rewards, values, mask, gamma, lam):
    """Per row: walk the unmasked positions backwards; the state after the last one is terminal."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [i for i in range(T) if mask[b][i]]
        running, next_value = 0.0, 0.0
        for i in reversed(idx):
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            running = delta + gamma * lam * running
            adv[b][i] = running
            next_value = values[b][i]
    ret = [[(adv[b][i] + values[b][i]) if mask[b][i] else 0.0 for i in range(T)] for b in range(B)]
    return adv, ret


# ---------------------------------------------------------------- token_level_rewards
def test_token_level_rewards_right_left_and_inner_padding():
    seq = torch.tensor([3.0, -1.0, 2.0, 7.0])
    mask = torch.tensor([
        [1, 1, 0, 0],  # right padded: reward at position 1
        [0, 1, 1, 1],  # left padded: reward at the last position
        [1, 0, 1, 0],  # hole in the middle: last unmasked is 2
        [0, 0, 0, 0],  # nothing unmasked: no reward at all
    ])
    out = token_level_rewards(seq, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [
        [0.0, 3.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, -1.0],
        [0.0, 0.0, 2.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    # bool masks and int rewards work the same
    out_b = token_level_rewards(torch.tensor([3, -1, 2, 7]), mask.bool())
    assert torch.equal(out_b, out)


def test_token_level_rewards_kl_hand_example():
    seq = t(1.0, 0.5).view(2)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    lp = t([-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0])
    ref = t([-1.5, -1.0, -0.5], [-1.0, -0.5, -2.0])
    # k1 = lp - ref = [[0.5, -1, 0], [masked, -0.5, 1.0]]
    out = token_level_rewards(seq, mask, lp, ref, kl_coef=0.1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, t([-0.05, 0.1, 1.0], [0.0, 0.05, 0.5 - 0.1]))
    # k3 = exp(ref - lp) - (ref - lp) - 1
    out3 = token_level_rewards(seq, mask, lp, ref, kl_coef=0.1, kl_kind="k3")
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    want = [[-0.1 * k3(-0.5), -0.1 * k3(1.0), 1.0 - 0.1 * k3(0.0)], [0.0, -0.1 * k3(0.5), 0.5 - 0.1 * k3(-1.0)]]
    torch.testing.assert_close(out3, torch.tensor(want, dtype=torch.float64))


def test_token_level_rewards_random_vs_loop():
    g = torch.Generator().manual_seed(1)
    B, T = 6, 13
    seq = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.5
    mask[3] = False
    lp = -torch.rand(B, T, generator=g)
    ref = -torch.rand(B, T, generator=g)
    out = token_level_rewards(seq, mask, lp, ref, kl_coef=0.2)
    for b in range(B):
        idx = [i for i in range(T) if mask[b, i]]
        for i in range(T):
            want = 0.0
            if mask[b, i]:
                want = -0.2 * (lp[b, i].item() - ref[b, i].item())
                if i == idx[-1]:
                    want += seq[b].item()
            assert out[b, i].item() == pytest.approx(want, abs=1e-6)


def test_token_level_rewards_bad_input():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="seq_rewards"):
        token_level_rewards(torch.zeros(3), mask)
    with pytest.raises(ValueError, match="seq_rewards"):
        token_level_rewards(torch.zeros(2, 1), mask)
    with pytest.raises(ValueError, match="mask"):
        token_level_rewards(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="logprobs"):
        token_level_rewards(torch.zeros(2), mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_kind"):
        token_level_rewards(torch.zeros(2), mask, kl_kind="k9")


# ---------------------------------------------------------------- GAE
def test_gae_advantages_hand_example():
    # gamma 1, lam 0.95: deltas [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    rewards = t([0.0, 0.0, 0.0, 1.0])
    values = t([9.0, 0.5, 0.6, 0.7])
    mask = torch.tensor([[0, 1, 1, 1]])  # left padded; the padded value must be ignored
    adv, ret = gae_advantages(rewards, values, mask, whiten=False)
    torch.testing.assert_close(adv, t([0.0, 0.46575, 0.385, 0.3]))
    torch.testing.assert_close(ret, t([0.0, 0.96575, 0.985, 1.0]))
    adv_w, ret_w = gae_advantages(rewards, values, mask)  # whitened by default; returns untouched
    torch.testing.assert_close(ret_w, ret)
    a = [0.46575, 0.385, 0.3]
    mu = sum(a) / 3
    sd = math.sqrt(sum((x - mu) ** 2 for x in a) / 2 + 1e-8)  # unbiased variance
    torch.testing.assert_close(adv_w, t([0.0] + [(x - mu) / sd for x in a]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_advantages_random_vs_loop(gamma, lam):
    g = torch.Generator().manual_seed(2)
    B, T = 5, 17
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    mask[2, :] = False
    mask[2, 4] = True  # a length-1 response
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    ref_adv, ref_ret = loop_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))
    adv_w, ret_w = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(ret_w, ret)
    torch.testing.assert_close(adv_w, whiten(adv, mask))
    sel = adv_w[mask]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert sel.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)


def test_gae_advantages_detaches_and_float32():
    rewards = torch.randn(2, 5)
    values = torch.randn(2, 5, requires_grad=True)
    adv, ret = gae_advantages(rewards, values, torch.ones(2, 5, dtype=torch.bool))
    assert adv.dtype == ret.dtype == torch.float32
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- GRPO
def test_grpo_advantages_two_groups_hand_example():
    seq = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[1, 2] = False
    adv = grpo_advantages(seq, mask, group_size=4)
    # group 0: mean 0.5, unbiased std sqrt(1/3): +-0.5 / (0.57735... + 1e-6); group 1: all equal -> 0
    a = 0.8660239037870368
    want = torch.tensor([a, -a, -a, a, 0, 0, 0, 0])[:, None].expand(8, 3) * mask
    torch.testing.assert_close(adv, want)
    assert adv[1, 2].item() == 0.0


def test_grpo_advantages_random_vs_loop():
    g = torch.Generator().manual_seed(3)
    G, n_groups, T = 5, 3, 6
    seq = torch.randn(G * n_groups, generator=g, dtype=torch.float64)
    mask = torch.rand(G * n_groups, T, generator=g) > 0.3
    adv = grpo_advantages(seq, mask, G, eps=1e-6)
    for b in range(G * n_groups):
        grp = seq[(b // G) * G:(b // G + 1) * G].tolist()
        a = (seq[b].item() - statistics.mean(grp)) / (statistics.stdev(grp) + 1e-6)
        for i in range(T):
            assert adv[b, i].item() == pytest.approx(a if mask[b, i] else 0.0, rel=1e-12, abs=1e-12)


def test_grpo_advantages_group_size_errors_and_size_one():
    mask = torch.ones(6, 2)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6), mask, 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6), mask, 0)
    with pytest.raises(ValueError, match="seq_rewards"):
        grpo_advantages(torch.zeros(5), mask, 1)
    out = grpo_advantages(torch.arange(6.0), mask, 1)
    assert torch.equal(out, torch.zeros(6, 2))  # one sample per prompt: no baseline spread, no signal


# ---------------------------------------------------------------- whiten
def test_whiten_hand_example():
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    s = 0.999999995  # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1: 1 / sqrt(1 + 1e-8)
    torch.testing.assert_close(whiten(x, mask), t([-s, 0.0, s, 0.0]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), t([-s + 2, 2.0, s + 2, 0.0]))
    assert torch.equal(whiten(x, torch.zeros_like(mask)), torch.zeros_like(x))
    assert torch.equal(whiten(x, torch.tensor([[0, 1, 0, 0]])), torch.zeros_like(x))
    with pytest.raises(ValueError, match="mask"):
        whiten(x, mask[:, :3])


def test_registry():
    assert ADVANTAGE_ESTIMATORS["gae"] is gae_advantages
    assert ADVANTAGE_ESTIMATORS["grpo"] is grpo_advantages
