"""Counter-based random numbers (vrpo_fast.ops._random): keyed, distribution-correct, batch-invariant."""
import math

import pytest
import torch

from vrpo_fast.ops._random import keyed_gumbel, keyed_hash, keyed_normal, keyed_uniform


def _splitmix_reference(seed, *keys):
    """Plain-Python SplitMix64 of the same construction (independent of torch's int64 wrap-around)."""
    M = (1 << 64) - 1

    def mix(x):
        x &= M
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
        return x ^ (x >> 31)

    g = 0x9E3779B97F4A7C15
    h = mix(seed * g + g)
    for k in keys:
        h = mix(h ^ mix(k + g))
    return h - (1 << 64) if h >= 1 << 63 else h


def test_hash_matches_a_plain_python_splitmix64():
    keys = [0, 1, 7, 2**31, 2**40 + 3, 123456789]
    got = keyed_hash(42, torch.tensor(keys), 5)
    assert got.tolist() == [_splitmix_reference(42, k, 5) for k in keys]
    assert keyed_hash(2**62, 3).item() == _splitmix_reference(2**62, 3)


def test_a_draw_depends_only_on_its_keys_not_on_the_batch():
    rows = torch.tensor([3, 9, 27, 81])
    whole = keyed_normal(7, rows[:, None], torch.arange(16)[None, :])
    part = keyed_normal(7, rows[2:, None], torch.arange(16)[None, :])
    perm = keyed_normal(7, rows.flip(0)[:, None], torch.arange(16)[None, :])
    assert torch.equal(whole[2:], part) and torch.equal(whole.flip(0), perm)
    assert not torch.equal(whole, keyed_normal(8, rows[:, None], torch.arange(16)[None, :]))  # seed matters
    assert not torch.equal(keyed_uniform(1, 2, 3), keyed_uniform(1, 3, 2))  # key order matters


def test_uniform_normal_gumbel_moments():
    n = 1 << 18
    u = keyed_uniform(0, torch.arange(n), dtype=torch.float64)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 2e-3
    # every decile holds ~10% (chi-square, 9 dof: 99.9% quantile ~ 27.9)
    counts = torch.bincount((u * 10).long(), minlength=10).double()
    assert ((counts - n / 10) ** 2 / (n / 10)).sum() < 27.9
    z = keyed_normal(1, torch.arange(n), dtype=torch.float64)
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.std() - 1) < 0.01
    assert abs((z.abs() < 1).double().mean() - 0.6827) < 0.005
    g = keyed_gumbel(2, torch.arange(n), dtype=torch.float64)
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - math.pi ** 2 / 6) < 0.03
    # adjacent keys are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < 0.01


def test_dtypes_and_errors():
    assert keyed_normal(0, torch.arange(4), dtype=torch.bfloat16).dtype == torch.bfloat16
    assert keyed_uniform(0, torch.arange(4, dtype=torch.int32)).dtype == torch.float32
    with pytest.raises(ValueError, match="at least one key"):
        keyed_hash(0)
