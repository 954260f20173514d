"""Reward-noise models: rates, seeds, std, bias monotonicity, state_dict round trips, describe()."""
import math

import pytest
import torch

from vrpo_fast.tasks.noise import BiasNoise, FlipNoise, GaussianNoise, RewardNoise, make_noise

N = 200_000


def _binary(n=N, seed=0):
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2, 0.4, 1.0])
def test_flip_rate_respected(rate):
    r = _binary()
    noisy = FlipNoise(rate, seed=1)(r)
    flipped = (noisy != r).float().mean().item()
    # binomial std of the empirical rate is sqrt(p(1-p)/N) <= 0.0012; 5 sigma
    assert abs(flipped - rate) <= 5 * math.sqrt(max(rate * (1 - rate), 1e-12) / N) + 1e-9
    assert set(noisy.unique().tolist()) <= {0.0, 1.0}
    # flipped entries are exactly 1 - r
    changed = noisy != r
    assert torch.equal(noisy[changed], 1 - r[changed])


def test_flip_seed_determinism():
    r = _binary(1000)
    a, b, c = FlipNoise(0.3, seed=7)(r), FlipNoise(0.3, seed=7)(r), FlipNoise(0.3, seed=8)(r)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FlipNoise(0.5, seed=0)(_binary(100))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("std", [0.0, 0.1, 0.4, 2.0])
def test_gaussian_std_respected(std):
    r = torch.rand(N)
    noise = GaussianNoise(std, seed=3)
    diff = noise(r) - r
    assert abs(diff.mean().item()) < 5 * std / math.sqrt(N) + 1e-6
    assert abs(diff.std().item() - std) < 0.01 * std + 1e-6
    assert noise.describe()["realised_std"] == pytest.approx(std, rel=0.01, abs=1e-6)


def test_gaussian_seed_determinism():
    r = torch.zeros(500)
    a, b, c = GaussianNoise(0.2, seed=1)(r), GaussianNoise(0.2, seed=1)(r), GaussianNoise(0.2, seed=2)(r)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_successive_calls_differ_but_stream_is_reproducible():
    r = torch.zeros(64)
    n1 = GaussianNoise(1.0, seed=0)
    first, second = n1(r), n1(r)
    assert not torch.equal(first, second)
    n2 = GaussianNoise(1.0, seed=0)
    assert torch.equal(n2(r), first) and torch.equal(n2(r), second)


def test_bias_length_monotone_and_capped():
    noise = BiasNoise(coef=0.5, kind="length", length_scale=20)
    completions = ["", "a", "abc", "a" * 10, "a" * 19, "a" * 20, "a" * 100]
    r = torch.full((len(completions),), 0.3)
    out = noise(r, completions)
    bias = (out - r).tolist()
    assert all(x <= y + 1e-7 for x, y in zip(bias, bias[1:]))  # non-decreasing in length
    assert bias[0] == pytest.approx(0.0) and bias[1] > 0
    assert bias[3] == pytest.approx(0.5 * 10 / 20)
    assert bias[-1] == pytest.approx(0.5) and bias[-2] == pytest.approx(0.5)  # capped at coef
    # deterministic: the seed does not matter, the same completions get the same bias
    assert torch.equal(BiasNoise(0.5, "length", 20, seed=9)(r, completions), out)


def test_bias_pattern():
    noise = make_noise("bias", bias_coef=0.25, bias_kind="pattern", bias_pattern="!")
    out = noise(torch.tensor([0.0, 1.0, 0.5]), ["great!", "fine", "!"])
    assert out.tolist() == pytest.approx([0.25, 1.0, 0.75])


def test_bias_needs_one_completion_per_reward():
    with pytest.raises(ValueError, match="completion"):
        BiasNoise(0.1)(torch.zeros(3), ["a"])


def test_identity_noise():
    r = torch.tensor([0.0, 1.0, 0.3])
    out = make_noise("none")(r)
    assert torch.equal(out, r) and out is not r


def test_device_and_dtype_preserved():
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for noise in (FlipNoise(0.5), GaussianNoise(0.1), BiasNoise(0.1)):
        out = noise(r, ["x", "yy"])
        assert out.device == r.device and out.dtype == torch.float32 and out.shape == r.shape


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlipNoise(0.3, seed=5),
        lambda: GaussianNoise(0.3, seed=5),
        lambda: BiasNoise(0.2, seed=5),
        lambda: RewardNoise(seed=5),
    ],
)
def test_state_dict_round_trip(make):
    r = _binary(256)
    comps = ["x" * i for i in range(256)]
    a = make()
    a(r, comps)  # advance the stream
    state = a.state_dict()
    expected_next = a(r, comps)
    expected_desc = a.describe()
    b = make()
    b.load_state_dict(state)
    assert torch.equal(b(r, comps), expected_next)
    assert b.describe() == expected_desc  # statistics resumed as well


def test_load_legacy_state_and_wrong_type():
    a = FlipNoise(0.5, seed=1)
    legacy = {"generator": a.generator.get_state()}  # what the first version saved
    b = FlipNoise(0.5, seed=99)
    b.load_state_dict(legacy)
    r = _binary(100)
    assert torch.equal(a(r), b(r))
    with pytest.raises(ValueError, match="flip"):
        GaussianNoise(0.1).load_state_dict(a.state_dict())


def test_describe_logs_parameters_and_stats():
    flip = make_noise("flip", rate=0.25, seed=4)
    flip(_binary(40_000))
    d = flip.describe()
    assert d["type"] == "flip" and d["rate"] == 0.25 and d["seed"] == 4 and d["n_rewards"] == 40_000
    assert d["realised_flip_rate"] == pytest.approx(0.25, abs=0.01)
    assert make_noise("gaussian", std=0.4, seed=1).describe() == {
        "type": "gaussian", "std": 0.4, "seed": 1, "n_rewards": 0, "realised_std": 0.0}
    bias = make_noise("bias", bias_coef=0.3, bias_length_scale=10)
    assert bias.describe()["type"] == "bias" and bias.describe()["coef"] == 0.3
    assert bias.describe()["length_scale"] == 10 and make_noise("none").describe()["type"] == "none"
    assert "rate=0.25" in repr(flip)


def test_make_noise_validation():
    with pytest.raises(ValueError, match="noise_type"):
        make_noise("salt")
    with pytest.raises(ValueError, match="rate"):
        make_noise("flip", rate=1.5)
    with pytest.raises(ValueError, match="std"):
        make_noise("gaussian", std=-0.1)
    with pytest.raises(ValueError, match="bias kind"):
        make_noise("bias", bias_kind="colour")
    with pytest.raises(ValueError, match="pattern"):
        make_noise("bias", bias_kind="pattern")
    with pytest.raises(ValueError, match="length_scale"):
        make_noise("bias", bias_length_scale=0)
    with pytest.raises(TypeError, match="rewards"):
        FlipNoise(0.1)([0.0, 1.0])
