"""VRPO's critic: diagnostics, auxiliary targets and weights, the value clip's z mode, the critic
warm-up, and a critic that actually learns in the trainer."""
import math
import os

import numpy as np
import pytest
import torch

from test_train_e2e import tiny_config

from vrpo_fast.algorithms.diagnostics import (advantage_diagnostics, first_state, last_state, masked_corr,
                                              regression_slope, value_reward_corr)
from vrpo_fast.algorithms.losses import aux_token_weights, value_loss, vrpo_value_loss
from vrpo_fast.metrics import read_metrics, without_timings
from vrpo_fast.scoring import ReferenceStats
from vrpo_fast.train import TrainConfig, run_training


# ----------------------------------------------------------------------------------------------
# diagnostics against plain computations
# ----------------------------------------------------------------------------------------------
def test_masked_corr_matches_numpy_and_its_edge_cases():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.3
    keep = mask.numpy()
    expected = np.corrcoef(a.numpy()[keep], b.numpy()[keep])[0, 1]
    assert masked_corr(a, b, mask) == pytest.approx(expected, rel=1e-12)
    assert masked_corr(a, a, mask) == pytest.approx(1.0)
    assert masked_corr(a, -3 * a + 1, mask) == pytest.approx(-1.0)
    assert math.isnan(masked_corr(a, torch.ones_like(a), mask))  # constant: undefined
    assert math.isnan(masked_corr(a, b, torch.zeros_like(mask)))  # no token
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert math.isnan(masked_corr(a, b, one))


def test_advantage_diagnostics_noise_fraction():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(8, 5, generator=g)
    mask = torch.ones(8, 5, dtype=torch.bool)
    same = advantage_diagnostics(clean, clean, mask)
    assert same["adv_clean_corr"] == pytest.approx(1.0) and same["adv_noise_frac"] == pytest.approx(0.0, abs=1e-12)
    noisy = clean + torch.randn(8, 5, generator=g)
    d = advantage_diagnostics(noisy, clean, mask)
    r = np.corrcoef(noisy.flatten().numpy(), clean.flatten().numpy())[0, 1]
    assert d["adv_clean_corr"] == pytest.approx(r) and d["adv_noise_frac"] == pytest.approx(1 - r * r)
    undefined = advantage_diagnostics(noisy, torch.zeros_like(clean), mask)
    assert math.isnan(undefined["adv_clean_corr"]) and math.isnan(undefined["adv_noise_frac"])


def test_regression_slope_and_state_picks():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, generator=g)
    y = 0.7 * x + 0.1 * torch.randn(50, generator=g)
    assert regression_slope(y, x) == pytest.approx(np.polyfit(x.numpy(), y.numpy(), 1)[0], rel=1e-10)
    assert math.isnan(regression_slope(y, torch.zeros(50)))  # no noise injected: undefined
    values = torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    first, last = first_state(values, mask), last_state(values, mask)
    assert first[:2].tolist() == [1.0, 4.0] and last[:2].tolist() == [2.0, 7.0]
    assert math.isnan(first[2]) and math.isnan(last[2])
    assert value_reward_corr(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])) == \
        pytest.approx(np.corrcoef([1, 2, 3], [0, 0, 1])[0, 1])


# ----------------------------------------------------------------------------------------------
# auxiliary targets: observable from the state that has read them
# ----------------------------------------------------------------------------------------------
def test_surprisal_target_is_the_token_just_read():
    # state-aligned: logprobs[:, t] = log p_ref(token t + 1 | s_t); response tokens at 3, 4, 5
    logprobs = -torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0]])
    action = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    ref = ReferenceStats(logprobs, torch.zeros_like(logprobs), torch.ones(1))
    target, mask = ref.surprisal(action)
    # state 3 has read token 3, scored at state 2: surprisal 1; state 2 has read a prompt token: undefined
    assert mask.tolist() == [[False, False, False, True, True, False]]
    assert target[0, 3].item() == 1.0 and target[0, 4].item() == 2.0
    seq, seq_mask = ref.sequence_surprisal(action)
    assert seq_mask.tolist() == [[False, False, False, False, True, False]]
    assert seq[0, 4].item() == pytest.approx(1.5)  # mean of the read response tokens' surprisals (1, 2)


def test_token_weights_are_a_softmax_with_mean_one():
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(4, 7, generator=g).abs() * 3
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # no response token
    mask[3, :6] = False  # length 1
    w = aux_token_weights(signal, mask, temperature=0.5)
    for i in range(4):
        on = mask[i]
        if on.any():
            n = int(on.sum())
            expected = n * torch.softmax(signal[i][on] / 0.5, 0)
            torch.testing.assert_close(w[i][on], expected)
            assert w[i][on].mean().item() == pytest.approx(1.0)
        assert (w[i][~on] == 0).all()
    assert w[3, 6].item() == pytest.approx(1.0)
    flat = aux_token_weights(signal, mask, temperature=1e6)
    assert torch.allclose(flat[mask], torch.ones(int(mask.sum())), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        aux_token_weights(signal, mask, temperature=0.0)


def test_weighted_value_loss_is_the_weighted_token_mean():
    g = torch.Generator().manual_seed(4)
    v, r = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.2
    w = aux_token_weights(torch.randn(3, 5, generator=g), mask)
    loss, _ = value_loss(v, None, r, mask, clip=None, token_weights=w)
    expected = 0.5 * ((v - r) ** 2 * w)[mask].sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the value clip compares like with like
# ----------------------------------------------------------------------------------------------
def test_value_clip_uses_the_mean_mode():
    old = torch.zeros(2, 4)
    returns = torch.ones(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    noise = torch.tensor([[0.5, -0.5, 0.4, -0.4], [0.3, -0.3, 0.6, -0.6]])
    # no drift of the mean (V_mu = V_old): the sampled value's noise alone must not trigger the clip
    loss, stats = value_loss(old + noise, old, returns, mask, clip=0.2, values_mean=old.clone())
    plain, _ = value_loss(old + noise, None, returns, mask, clip=None)
    assert stats["vf_clipfrac"].item() == 0.0 and loss.item() == pytest.approx(plain.item())
    _, mixed = value_loss(old + noise, old, returns, mask, clip=0.2)  # the old comparison across modes
    assert mixed["vf_clipfrac"].item() > 0.3
    # a real drift of the mean is clipped, the sample's offset kept
    vm = old + 0.5
    v = vm + noise
    loss, stats = vrpo_value_loss(v, old, returns, mask, clip=0.2, values_mean=vm)
    clipped = old + 0.2 + noise
    expected = 0.5 * torch.maximum((v - returns) ** 2, (clipped - returns) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the trainer: warm-up, ablations, diagnostics, a critic that learns
# ----------------------------------------------------------------------------------------------
def test_critic_warmup_is_resumed_not_redone(tmp_path):
    straight = run_training(tiny_config(tmp_path / "a", steps=2, critic_warmup_steps=2))
    run_training(tiny_config(tmp_path / "b", steps=0, critic_warmup_steps=2))  # stopped after the warm-up
    ckpts = os.listdir(os.path.join(str(tmp_path / "b" / "run"), "checkpoints"))
    assert "step_000000" in ckpts
    resumed = run_training(tiny_config(tmp_path / "b", steps=2, critic_warmup_steps=2, resume=True))
    assert without_timings(read_metrics(resumed["metrics_path"])) == \
        without_timings(read_metrics(straight["metrics_path"]))


@pytest.mark.parametrize("overrides, variant, has_aux_loss", [
    (dict(beta=0.0), "vrpo-no-vib", True),
    (dict(alpha_ent=0.0, alpha_ppl=0.0), "vrpo-no-aux", False),
    (dict(aux_mode="weight"), "vrpo", False),
    (dict(aux_mode="both", ppl_target="sequence", aux_weight_signal="sum"), "vrpo", True),
])
def test_ablations_and_aux_modes_run_and_are_named(tmp_path, overrides, variant, has_aux_loss):
    summary = run_training(tiny_config(tmp_path, steps=1, **overrides))
    assert summary["variant"] == variant
    record = read_metrics(summary["metrics_path"])[0]
    assert ("ent_loss" in record) == has_aux_loss and math.isfinite(record["value_loss"])
    if overrides.get("beta") == 0.0:
        assert record["vib_kl"] is not None  # measured, not penalised


@pytest.mark.parametrize("algo", ["vrpo", "ppo", "grpo"])
def test_diagnostics_without_noise_are_exact(tmp_path, algo):
    """With no reward noise the advantages ARE the clean-reward advantages: corr 1, noise share 0, and
    the noise slope is undefined (no noise to regress on)."""
    summary = run_training(tiny_config(tmp_path, algo=algo, steps=1, noise_type="none", diagnostics_every=1))
    r = read_metrics(summary["metrics_path"])[0]
    if r["adv_clean_corr"] is not None:  # undefined when every reward of the batch is equal
        assert r["adv_clean_corr"] == pytest.approx(1.0) and r["adv_noise_frac"] == pytest.approx(0.0, abs=1e-9)
    if algo != "grpo":
        assert r["value_noise_slope"] is None and "value_clean_corr" in r
    if algo == "vrpo":
        assert r["aux_value_grad_ratio"] > 0


def test_diagnostics_under_noise_are_logged_every_step(tmp_path):
    summary = run_training(tiny_config(tmp_path, steps=2, noise_type="gaussian", noise_std=0.5, diagnostics_every=2))
    records = read_metrics(summary["metrics_path"])
    for r in records:
        for key in ("adv_clean_corr", "adv_noise_frac", "value_noisy_corr", "value_noise_slope", "vib_kl"):
            assert r[key] is not None and math.isfinite(r[key]), key
        assert "value_clean_corr" in r  # null here: the tiny model's clean reward is constant (undefined corr)
        assert r["adv_clean_corr"] < 0.999  # the noise is in the advantages
    assert "aux_value_grad_ratio" in records[0] and "aux_value_grad_ratio" not in records[1]


@pytest.mark.slow
def test_vrpo_critic_tracks_the_noisy_return_by_step_20(tmp_path):
    """Arith with flip noise 0.2 (the default job's setting, 20 RL steps): the VRPO critic's mean value is
    within 25% of the mean (noisy) return. The prior-like VIB init without a critic warm-up reached 0.03
    against 0.28 here."""
    cfg = TrainConfig.from_flat(output_dir=str(tmp_path / "run"), steps=20, save_every=0, progress=False,
                                num_eval=16, eval_greedy=False)
    summary = run_training(cfg)
    last = read_metrics(summary["metrics_path"])[-1]
    assert last["step"] == 20
    assert abs(last["value_mean"] - last["return_mean"]) <= 0.25 * abs(last["return_mean"]), last


def test_surprisal_loss_is_zero_where_undefined_and_a_response_token_mean():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    nll_mask = mask.clone()
    nll_mask[0, 1] = nll_mask[1, 2] = False  # the first response state has read a prompt token
    v = torch.zeros(2, 6)
    _, stats = vrpo_value_loss(v, None, v, mask, clip=None, nll_pred=pred, nll_target=target, alpha_ppl=1.0,
                               nll_mask=nll_mask)
    expected = ((pred - target) ** 2 * nll_mask).sum() / mask.sum()
    assert stats["ppl_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
