"""Losses of vrpo_fast.algorithms.losses against hand-computed numbers and plain-Python loops."""
import math

import pytest
import torch

from vrpo_fast.algorithms import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    aggregate_loss,
    aux_regression_loss,
    explained_variance,
    grpo_policy_loss,
    kl_penalty,
    policy_loss,
    value_loss,
    vrpo_value_loss,
)

LN15, LN05 = math.log(1.5), math.log(0.5)


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- plain-Python references
def loop_policy_loss(lp, old, adv, mask, clip):
    total, n, clipped = 0.0, 0, 0
    for b in range(len(lp)):
        for i in range(len(lp[b])):
            if not mask[b][i]:
                continue
            r = math.exp(lp[b][i] - old[b][i])
            s1 = -adv[b][i] * r
            s2 = -adv[b][i] * min(max(r, 1 - clip), 1 + clip)
            total += max(s1, s2)
            clipped += s2 > s1
            n += 1
    return (total / n if n else 0.0), (clipped / n if n else 0.0)


def loop_value_loss(v, vold, ret, mask, clip):
    total, n = 0.0, 0
    for b in range(len(v)):
        for i in range(len(v[b])):
            if not mask[b][i]:
                continue
            e1 = (v[b][i] - ret[b][i]) ** 2
            if clip is None:
                e = e1
            else:
                vc = vold[b][i] + min(max(v[b][i] - vold[b][i], -clip), clip)
                e = max(e1, (vc - ret[b][i]) ** 2)
            total += e
            n += 1
    return 0.5 * total / n if n else 0.0


def random_batch(B=5, T=11, seed=0, dtype=torch.float64, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=dtype) * scale
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # an all-masked row
    mask[1, :] = True
    return lp, old, adv, mask


# ---------------------------------------------------------------- policy loss
def test_policy_loss_hand_example_clipping_active():
    # ratio 1.5 with A=1 -> clipped at 1.2 (surrogate -1.2); ratio 0.5 with A=-2 -> clipped at 0.8 (1.6)
    lp = t([LN15, LN05, 0.3]).requires_grad_()
    old = t([0.0, 0.0, 0.0])
    adv = t([1.0, -2.0, 5.0])
    mask = torch.tensor([[True, True, False]])
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.6) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.14384103622589045)
    loss.backward()
    assert torch.all(lp.grad == 0)  # both tokens clipped, third masked: no gradient anywhere


def test_policy_loss_hand_example_clipping_inactive():
    # ratio 1.5 with A=-1 -> the unclipped 1.5 is the max; ratio 0.5 with A=1 -> unclipped -0.5
    lp = t([LN15, LN05]).requires_grad_()
    old = t([0.0, 0.0])
    adv = t([-1.0, 1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((1.5 - 0.5) / 2)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlp of -A * exp(lp - old), averaged over 2 tokens
    torch.testing.assert_close(lp.grad, t([0.75, -0.25]))


def test_policy_loss_entropy_bonus():
    lp = t([LN15, LN05, 0.3])
    adv = t([1.0, -2.0, 5.0])
    mask = torch.tensor([[1, 1, 0]])
    entropy = t([2.0, 4.0, 100.0]).requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros_like(lp), adv, mask, entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(0.2 - 0.1 * 3.0)
    assert stats["entropy"].item() == pytest.approx(3.0)
    assert stats["pg_loss"].item() == pytest.approx(0.2)
    loss.backward()
    torch.testing.assert_close(entropy.grad, t([-0.05, -0.05, 0.0]))
    # entropy given with coef 0: reported, not added
    loss0, stats0 = policy_loss(lp, torch.zeros_like(lp), adv, mask, entropy=entropy.detach())
    assert loss0.item() == pytest.approx(0.2) and stats0["entropy"].item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, torch.zeros_like(lp), adv, mask, entropy_coef=0.1)


@pytest.mark.parametrize("clip", [0.2, 0.05, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_random_vs_loop(clip, seed):
    lp, old, adv, mask = random_batch(seed=seed)
    loss, stats = policy_loss(lp, old, adv, mask, clip=clip)
    ref, ref_clipfrac = loop_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(ref_clipfrac)
    if clip == 10.0:
        assert stats["clipfrac"].item() == 0.0
    else:
        assert 0.0 < stats["clipfrac"].item() < 1.0


def test_policy_loss_float_mask_and_bf16_inputs():
    lp, old, adv, mask = random_batch(seed=3, dtype=torch.float32)
    ref, _ = policy_loss(lp.double(), old.double(), adv.double(), mask)
    loss_f, _ = policy_loss(lp, old, adv, mask.float())
    assert loss_f.dtype == torch.float32
    assert loss_f.item() == pytest.approx(ref.item(), rel=1e-5)
    loss_b, _ = policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss_b.dtype == torch.float32  # computed in fp32 even for bf16 inputs
    assert loss_b.item() == pytest.approx(ref.item(), rel=5e-2, abs=2e-2)


def test_policy_loss_all_masked_is_zero_with_zero_grad():
    lp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss, stats = policy_loss(lp, torch.zeros(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), mask)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    assert torch.all(lp.grad == 0)


def test_policy_loss_asymmetric_clip_and_seq_mean():
    # ratio 1.5 with A=1: clip_high=0.3 caps at 1.3 instead of 1.2
    lp, old, adv = t([LN15]), t([0.0]), t([1.0])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = policy_loss(lp, old, adv, mask, clip=0.2, clip_high=0.3)
    assert loss.item() == pytest.approx(-1.3)
    # seq-mean-token-mean: row means (-1.2 + 1.6)/2 = 0.2 and 4.0 -> 2.1; token mean would be 1.4667
    lp2 = t([LN15, LN05], [0.0, 0.0])
    adv2 = t([1.0, -2.0], [-4.0, 9.0])
    mask2 = torch.tensor([[1, 1], [1, 0]])
    tok, _ = policy_loss(lp2, torch.zeros_like(lp2), adv2, mask2)
    seq, _ = policy_loss(lp2, torch.zeros_like(lp2), adv2, mask2, loss_agg="seq-mean-token-mean")
    assert tok.item() == pytest.approx((-1.2 + 1.6 + 4.0) / 3)
    assert seq.item() == pytest.approx((0.2 + 4.0) / 2)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(lp2, mask2, "mean")


def test_policy_loss_bad_input():
    lp, old, adv, mask = random_batch()
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, old[:, :-1], adv, mask)
    with pytest.raises(TypeError, match="advantages"):
        policy_loss(lp, old, adv.long(), mask)
    with pytest.raises(TypeError, match="logprobs"):
        policy_loss(lp.tolist(), old, adv, mask)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(lp, old, adv, mask, clip=-0.1)


# ---------------------------------------------------------------- KL estimators
def test_kl_penalty_hand_example():
    lp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # lp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), t([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), t([0.125, 0.5]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), t([0.10653065971263342, 0.7182818284590451]))
    assert kl_penalty(lp, ref).tolist() == [[0.5, -1.0]]  # default k1
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_penalty(lp, ref[:, :1])


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_kl_penalty_random_vs_loop(kind):
    lp, ref, _, _ = random_batch(seed=4, scale=1.5)
    out = kl_penalty(lp, ref, kind)
    for b in range(lp.shape[0]):
        for i in range(lp.shape[1]):
            x = lp[b, i].item() - ref[b, i].item()
            want = {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) + x - 1}[kind]
            assert out[b, i].item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    if kind in ("k2", "k3"):
        assert torch.all(out >= 0)
    assert torch.all(kl_penalty(lp, lp, kind) == 0)


def test_k3_is_unbiased_kl_estimate():
    # E_{x~p}[k3] = KL(p || q) for two categorical distributions
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    kl_true = (logp.exp() * (logp - logq)).sum()
    for kind in ("k1", "k3"):
        expected = (logp.exp() * kl_penalty(logp, logq, kind)).sum()
        assert expected.item() == pytest.approx(kl_true.item(), rel=1e-10)


# ---------------------------------------------------------------- GRPO policy loss
def test_grpo_policy_loss_hand_example():
    lp = t([LN15, LN05, 0.3])
    ref = t([LN15 + 0.5, LN05 - 1.0, 7.0])  # ref - lp = [0.5, -1.0] on the unmasked tokens
    adv = t([1.0, -2.0, 5.0])
    mask = torch.tensor([[1, 1, 0]])
    k3 = [math.exp(0.5) - 0.5 - 1, math.exp(-1.0) + 1.0 - 1]
    loss, stats = grpo_policy_loss(lp, torch.zeros_like(lp), adv, mask, ref, kl_coef=0.04)
    assert stats["kl"].item() == pytest.approx(sum(k3) / 2)
    assert loss.item() == pytest.approx(0.2 + 0.04 * sum(k3) / 2)
    assert stats["pg_loss"].item() == pytest.approx(0.2)
    # kl_coef=0 without a reference is plain PPO; with the default coefficient it is an error
    loss0, _ = grpo_policy_loss(lp, torch.zeros_like(lp), adv, mask, kl_coef=0.0)
    assert loss0.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(lp, torch.zeros_like(lp), adv, mask)


def test_grpo_policy_loss_kl_gradient():
    lp, old, adv, mask = random_batch(seed=5)
    ref = lp.detach() + 0.3
    lp = lp.clone().requires_grad_()
    loss, _ = grpo_policy_loss(lp, old, adv, mask, ref, kl_coef=0.5)
    pg, _ = policy_loss(lp, old, adv, mask)
    (g_total,) = torch.autograd.grad(loss, lp)
    (g_pg,) = torch.autograd.grad(pg, lp)
    # d k3 / d lp = 1 - exp(ref - lp), scaled by coef / n_tokens
    n = mask.sum()
    want = 0.5 * (1 - torch.exp(ref - lp.detach())) * mask / n
    torch.testing.assert_close(g_total - g_pg, want)


# ---------------------------------------------------------------- value losses
V = t([1.2, 2.0, 0.5])
VOLD = t([0.8, 2.1, 0.5])
RET = t([2.0, 1.0, 3.0])
VMASK = torch.tensor([[True, True, False]])


def test_value_loss_hand_example():
    # token 0: V moved +0.4 > clip -> clipped value 1.0, error 1.0 beats 0.64 (clip active)
    # token 1: V moved -0.1 within clip -> both errors 1.0 (inactive); token 2 masked
    v = V.clone().requires_grad_()
    loss, stats = value_loss(v, VOLD, RET, VMASK, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped token has zero gradient; token 1: 0.5 * 2 * (V - R) / 2 = 0.5
    torch.testing.assert_close(v.grad, t([0.0, 0.5, 0.0]))
    loss_nc, stats_nc = value_loss(V, None, RET, VMASK, clip=None)
    assert loss_nc.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert stats_nc["vf_clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(V, None, RET, VMASK, clip=0.2)


@pytest.mark.parametrize("clip", [None, 0.1, 0.5])
def test_value_loss_random_vs_loop(clip):
    g = torch.Generator().manual_seed(7)
    v = torch.randn(4, 9, generator=g, dtype=torch.float64)
    vold = v + torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.3
    ret = torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.4
    mask[2] = False
    loss, _ = value_loss(v, vold, ret, mask, clip=clip)
    assert loss.item() == pytest.approx(loop_value_loss(v.tolist(), vold.tolist(), ret.tolist(), mask.tolist(), clip))
    all_masked, _ = value_loss(v, vold, ret, torch.zeros_like(mask), clip=clip)
    assert all_masked.item() == 0.0


def test_explained_variance_hand_example_and_degenerate():
    # R - V = [0.8, -1.0]: Var = 0.81; Var[R] = 0.25 -> 1 - 3.24
    assert explained_variance(V, RET, VMASK) == pytest.approx(-2.24)
    assert explained_variance(RET, RET, VMASK) == pytest.approx(1.0)
    assert math.isnan(explained_variance(V, t([2.0, 2.0, 5.0]), VMASK))  # constant returns
    assert math.isnan(explained_variance(V, RET, torch.zeros_like(VMASK)))  # nothing unmasked
    _, stats = value_loss(V, VOLD, RET, VMASK)
    assert stats["explained_variance"].item() == pytest.approx(-2.24)


def test_aux_regression_loss_hand_example():
    pred = t([1.0, 2.0, 9.0]).requires_grad_()
    target = t([2.0, 2.0, 0.0])
    loss = aux_regression_loss(pred, target, VMASK)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(pred.grad, t([-1.0, 0.0, 0.0]))
    assert aux_regression_loss(pred, target, torch.zeros_like(VMASK)).item() == 0.0


def test_vrpo_value_loss_hand_example():
    kwargs = dict(
        kl=torch.tensor(2.0, dtype=torch.float64),
        ent_pred=t([1.0, 2.0, 9.0]), ent_target=t([2.0, 2.0, 0.0]),   # MSE 0.5
        nll_pred=t([0.0, 3.0, 0.0]), nll_target=t([1.0, 1.0, 0.0]),   # MSE 2.5
    )
    loss, stats = vrpo_value_loss(V, VOLD, RET, VMASK, clip=0.2, beta=0.01, alpha_ent=0.1, alpha_ppl=0.1, **kwargs)
    assert loss.item() == pytest.approx(0.5 + 0.01 * 2.0 + 0.1 * 0.5 + 0.1 * 2.5)
    assert stats["value_loss"].item() == pytest.approx(0.5)
    assert stats["vib_kl"].item() == pytest.approx(2.0)
    assert stats["ent_loss"].item() == pytest.approx(0.5)
    assert stats["ppl_loss"].item() == pytest.approx(2.5)
    assert stats["critic_loss"].item() == pytest.approx(0.82)
    # METHOD defaults: beta 1e-3, alpha 0.1
    loss_d, _ = vrpo_value_loss(V, VOLD, RET, VMASK, **kwargs)
    assert loss_d.item() == pytest.approx(0.5 + 1e-3 * 2.0 + 0.1 * 0.5 + 0.1 * 2.5)
    # per-token KL is masked-mean reduced: [3, 1, 100] -> 2
    loss_tok, _ = vrpo_value_loss(V, VOLD, RET, VMASK, beta=0.01, **{**kwargs, "kl": t([3.0, 1.0, 100.0])})
    assert loss_tok.item() == pytest.approx(0.82)


def test_vrpo_value_loss_terms_optional():
    # the PPO baseline: no KL, no auxiliary heads -> exactly value_loss
    base, _ = value_loss(V, VOLD, RET, VMASK)
    loss, stats = vrpo_value_loss(V, VOLD, RET, VMASK, kl=None, ent_pred=None, ent_target=None,
                                  nll_pred=None, nll_target=None)
    assert loss.item() == base.item()
    assert not {"vib_kl", "ent_loss", "ppl_loss"} & set(stats)
    only_kl, _ = vrpo_value_loss(V, VOLD, RET, VMASK, kl=torch.tensor(5.0), beta=0.1)
    assert only_kl.item() == pytest.approx(base.item() + 0.5)
    with pytest.raises(ValueError, match="ent_target"):
        vrpo_value_loss(V, VOLD, RET, VMASK, ent_pred=V)
    with pytest.raises(ValueError, match="kl"):
        vrpo_value_loss(V, VOLD, RET, VMASK, kl=t([1.0, 2.0]))


def test_vrpo_value_loss_gradients_reach_every_input():
    v = V.clone().requires_grad_()
    kl = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ent = t([1.0, 2.0, 9.0]).requires_grad_()
    nll = t([0.0, 3.0, 0.0]).requires_grad_()
    loss, _ = vrpo_value_loss(v, VOLD, RET, VMASK, kl=kl, ent_pred=ent, ent_target=t([2.0, 2.0, 0.0]),
                              nll_pred=nll, nll_target=t([1.0, 1.0, 0.0]), beta=0.01)
    loss.backward()
    assert kl.grad.item() == pytest.approx(0.01)
    torch.testing.assert_close(ent.grad, 0.1 * t([-1.0, 0.0, 0.0]))
    torch.testing.assert_close(nll.grad, 0.1 * t([-1.0, 2.0, 0.0]))
    torch.testing.assert_close(v.grad, t([0.0, 0.5, 0.0]))


def test_registries():
    assert POLICY_LOSSES["ppo"] is policy_loss and POLICY_LOSSES["grpo"] is grpo_policy_loss
    assert VALUE_LOSSES["ppo"] is value_loss and VALUE_LOSSES["vrpo"] is vrpo_value_loss
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
