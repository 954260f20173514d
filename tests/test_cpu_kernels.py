"""The C++ CPU kernels (vrpo_fast._C: csrc/vib.cpp, token_stats.cpp, gae.cpp) against float64
references and against their PyTorch twins (the fallbacks used when the extension is missing).

* keyed noise: the C++ stream equals ``_random.keyed_normal`` bit for bit, and is within float32
  rounding of the exact Box-Muller formula on the same uniforms;
* in-register bf16 / fp16 conversions equal torch's ``.to()`` (every half value; rounding cases);
* VIB, token statistics and GAE whitening: awkward shapes and values, 1 vs 2 threads.
"""
import math

import pytest
import torch

import vrpo_fast.ops._cpu_ext as cpu_ext
from vrpo_fast.ops import gae, token_logprobs_entropy, token_logprobs_entropy_reference, vib_sample_kl
from vrpo_fast.ops._random import _srl, keyed_hash, keyed_normal

_C = pytest.importorskip("vrpo_fast._C")
if not hasattr(_C, "token_stats_forward"):
    pytest.skip("vrpo_fast._C is an old build (rebuild: pip install -e .)", allow_module_level=True)

CODES = cpu_ext.DTYPE_CODES


@pytest.fixture
def torch_fallback(monkeypatch):
    monkeypatch.setattr(cpu_ext, "FORCE_TORCH_FALLBACK", True)


def with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# keyed noise and conversions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1234, 2**63 - 1])
def test_cpp_keyed_normal_is_the_torch_stream_bit_for_bit(seed):
    keys = torch.cat([torch.arange(300), torch.randint(0, 2**62, (300,)), torch.tensor([2**63 - 1])])
    want = keyed_normal(seed, keys[:, None], torch.arange(67)[None], dtype=torch.float64)
    got = torch.empty(keys.numel(), 67, dtype=torch.float64)
    _C.keyed_normal_2d(keys.data_ptr(), got.data_ptr(), keys.numel(), 67, seed)
    assert torch.equal(got, want)
    # float64 requests get the float32 value, widened.
    assert torch.equal(want, keyed_normal(seed, keys[:, None], torch.arange(67)[None]).double())


def test_keyed_normal_is_box_muller_to_float32_rounding():
    # Counter c: the pair c >> 1 shares one hash; even c takes the cosine output, odd c the sine one.
    c = torch.arange(1 << 16)
    h = keyed_hash(5, c >> 1)
    u1 = (2 * _srl(h, 41) + 1).double() * 2.0**-24
    u2 = (2 * (_srl(h, 17) & 0x7FFFFF) + 1).double() * 2.0**-24
    angle = 2 * math.pi * u2
    exact = torch.sqrt(-2 * torch.log(u1)) * torch.where(c % 2 == 0, torch.cos(angle), torch.sin(angle))
    got = keyed_normal(5, c, dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=2e-6, atol=2e-6)
    assert got.abs().max() < 5.8
    assert abs(torch.corrcoef(torch.stack([got[0::2], got[1::2]]))[0, 1].item()) < 4 / math.sqrt(c.numel() / 2)


def _convert(src, dst_dtype):
    out = torch.empty(src.shape, dtype=dst_dtype)
    _C.convert(src.data_ptr(), CODES[src.dtype], out.data_ptr(), CODES[dst_dtype], src.numel())
    return out


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_conversions_match_torch(half):
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(half)  # all 65536 bit patterns
    widened = _convert(every, torch.float32)
    nan = every.isnan()
    assert torch.equal(widened.isnan(), nan)
    assert torch.equal(widened[~nan], every[~nan].float())
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=g) * 10 ** torch.randint(-9, 6, (20000,), generator=g).float(),
        widened[~nan],  # exactly representable: must round-trip
        (widened[~nan][:-1] + widened[~nan][1:]) / 2,  # halfway cases (ties to even)
        torch.tensor([float("inf"), -float("inf"), 65504.0, 65519.0, 65520.0, 1e-8, 5.9e-8, 6e-8, -0.0]),
    ])
    narrowed = _convert(x, half)
    ref = x.to(half)
    assert torch.equal(narrowed.view(torch.int16), ref.view(torch.int16))
    assert _convert(torch.tensor([float("nan")]), half).isnan().all()


# ----------------------------------------------------------------------------------------------
# VIB
# ----------------------------------------------------------------------------------------------
def _vib_run(mu, logvar, gz, gkl, **kw):
    m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = vib_sample_kl(m, lv, seed=7, **kw)
    torch.autograd.backward((z, kl), (gz, gkl))
    return z.detach(), kl.detach(), m.grad, lv.grad


def _vib_inputs(rows, L, dtype=torch.float32):
    g = torch.Generator().manual_seed(rows * 1000 + L)
    mu = torch.randn(rows, L, generator=g).to(dtype)
    logvar = (3 * torch.randn(rows, L, generator=g)).to(dtype)
    gz = torch.randn(rows, L, generator=g).to(dtype)
    gkl = torch.randn(rows, generator=g).to(torch.promote_types(dtype, torch.float32))
    return mu, logvar, gz, gkl


@pytest.mark.parametrize("rows,L", [(1, 1), (5, 3), (37, 64), (300, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_vib_cpp_matches_torch_twin(monkeypatch, rows, L, dtype):
    mu, logvar, gz, gkl = _vib_inputs(rows, L, dtype)
    got = _vib_run(mu, logvar, gz, gkl)
    monkeypatch.setattr(cpu_ext, "FORCE_TORCH_FALLBACK", True)
    want = _vib_run(mu, logvar, gz, gkl)
    # Same noise stream, same math; only exp() differs in the last bits (own polynomial vs torch's).
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), **tol)
    # The noise itself is identical (mu = 0, logvar = 0 gives z = eps exactly).
    zeros = torch.zeros(rows, L, dtype=dtype)
    eps_cpp, _ = vib_sample_kl(zeros, zeros, seed=7)
    monkeypatch.setattr(cpu_ext, "FORCE_TORCH_FALLBACK", False)
    eps_keyed = keyed_normal(7, torch.arange(rows)[:, None], torch.arange(L)[None], dtype=dtype)
    assert torch.equal(eps_cpp, eps_keyed)


def test_vib_without_ids_is_the_arange_id_stream_and_thread_independent():
    mu, logvar, gz, gkl = _vib_inputs(700, 48)
    plain = with_threads(1, lambda: _vib_run(mu, logvar, gz, gkl))
    two = with_threads(2, lambda: _vib_run(mu, logvar, gz, gkl))
    ids = with_threads(2, lambda: _vib_run(mu, logvar, gz, gkl, row_ids=torch.arange(700)))
    for a, b, c in zip(plain, two, ids):
        assert torch.equal(a, b) and torch.equal(a, c)  # element-wise kernel: exact for any threads


def test_vib_float64_reference_nan_and_clamp():
    mu, logvar, gz, gkl = _vib_inputs(9, 33)
    logvar[0, :4] = torch.tensor([-30.0, 15.0, -20.0, 10.0])
    logvar[3, 5] = math.nan
    z, kl, dmu, dlv = _vib_run(mu, logvar, gz, gkl)
    eps = keyed_normal(7, torch.arange(9)[:, None], torch.arange(33)[None], dtype=torch.float64)
    m64, lv64 = mu.double().requires_grad_(), logvar.double().requires_grad_()
    lv_c = lv64.clamp(-20.0, 10.0)
    z64 = m64 + torch.exp(0.5 * lv_c) * eps
    kl64 = 0.5 * (m64**2 + lv_c.exp() - lv_c - 1).sum(-1)
    torch.autograd.backward((z64, kl64), (gz.double(), gkl.double()))
    ok = ~torch.isnan(z64.detach())
    torch.testing.assert_close(z.double()[ok], z64.detach()[ok], rtol=1e-5, atol=1e-5)
    assert torch.isnan(z[3, 5]) and torch.isnan(kl[3]) and not torch.isnan(kl[[0, 1, 2, 4]]).any()
    torch.testing.assert_close(dmu.double(), m64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dlv.double(), torch.nan_to_num(lv64.grad), rtol=1e-5, atol=1e-5)
    assert dlv[0, 0] == 0 and dlv[0, 1] == 0 and dlv[0, 2] != 0 and dlv[0, 3] != 0 and dlv[3, 5] == 0


# ----------------------------------------------------------------------------------------------
# token statistics
# ----------------------------------------------------------------------------------------------
def _ts(logits, labels, **kw):
    x = logits.detach().clone().requires_grad_()
    lp, ent = token_logprobs_entropy(x, labels, **kw)
    g = torch.Generator().manual_seed(3)
    glp, gh = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    loss = (lp * glp).sum() + ((ent * gh).sum() if ent is not None else 0)
    (grad,) = torch.autograd.grad(loss, x)
    return lp, ent, grad, glp, gh


def _ts_reference(logits, labels, glp, gh, temperature=1.0, ignore_index=-100, compute_entropy=True):
    """float64 values; analytic gradient (safe where p == 0 exactly)."""
    x = logits.double() / temperature
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    h = -plogp.sum(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lp = torch.where(valid, logp.gather(-1, safe[..., None])[..., 0], 0.0)
    onehot = torch.zeros_like(p).scatter_(-1, safe[..., None], 1.0)
    gh = gh.double() if compute_entropy else torch.zeros_like(glp, dtype=torch.float64)
    grad = glp.double()[..., None] * (onehot - p) - gh[..., None] * (plogp + p * h[..., None])
    grad = torch.where(valid[..., None], grad, 0.0) / temperature
    return lp, torch.where(valid, h, 0.0), grad


def _check_ts(logits, labels, tol=1e-5, grad_tol=None, **kw):
    lp, ent, grad, glp, gh = _ts(logits, labels, **kw)
    ref_kw = {k: kw[k] for k in ("temperature", "ignore_index", "compute_entropy") if k in kw}
    lp_r, h_r, g_r = _ts_reference(logits, labels, glp, gh, **ref_kw)
    torch.testing.assert_close(lp.double(), lp_r, rtol=tol, atol=tol * 4)
    if kw.get("compute_entropy", True):
        torch.testing.assert_close(ent.double(), h_r, rtol=tol, atol=tol * 4)
    gt = grad_tol or (1.6e-2 if logits.dtype in (torch.bfloat16, torch.float16) else 1e-5)
    torch.testing.assert_close(grad.double(), g_r, rtol=gt, atol=1e-6 if gt < 1e-3 else 1e-4)
    return lp, ent, grad


@pytest.mark.parametrize("V", [1, 7, 16, 2047, 2048, 2049, 32001])
def test_token_stats_odd_vocab_sizes(V):
    N = 3 if V > 10000 else 9
    logits = torch.randn(N, V) * 3
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    _check_ts(logits, labels, temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute_entropy", [True, False])
def test_token_stats_half_inputs(dtype, compute_entropy):
    logits = (torch.randn(2, 5, 1031) * 4).to(dtype)
    labels = torch.randint(0, 1031, (2, 5))
    labels[0, 2] = -100
    _check_ts(logits, labels, temperature=1.3, compute_entropy=compute_entropy)


def test_token_stats_awkward_values_and_layouts():
    V = 300
    logits = torch.randn(7, V)
    logits[0, :10] = 1e4
    logits[1] = -1e4
    logits[1, 7] = 1e4
    logits[2, 50:120] = -math.inf
    logits[3, ::2] = -math.inf
    logits[4] *= 1e3
    labels = torch.tensor([3, 7, 10, 1, 17, -100, 5])
    # |logits / T| ~ 1.4e4: fp32 logp = x / T - lse carries ~1e-3 absolute rounding, on every path.
    lp, ent, grad = _check_ts(logits, labels, temperature=0.7, tol=1e-4, grad_tol=2e-3)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    # All positions ignored; one sequence of length 1; custom ignore_index.
    _check_ts(torch.randn(4, 33), torch.full((4,), -100))
    _check_ts(torch.randn(1, 1, 33), torch.tensor([[5]]))
    _check_ts(torch.randn(5, 40), torch.tensor([1, 2, 3, 2, 2]), ignore_index=2)
    # Leading strides: a row stride larger than V, and logits[:, :-1] (not flattenable).
    base = torch.randn(3, 6, 101) * 2
    _check_ts(base[0, :, :90], torch.randint(0, 90, (6,)))
    _check_ts(base[:, :-1], torch.randint(0, 101, (3, 5)), temperature=2.0)


def test_token_stats_nan_and_minus_inf_rows():
    logits = torch.randn(4, 50)
    logits[1, 3] = math.nan
    logits[2] = -math.inf
    lp, ent = token_logprobs_entropy(logits, torch.tensor([0, 1, 2, -100]))
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(lp[2])
    assert torch.isfinite(lp[[0, 3]]).all() and lp[3] == 0 and ent[3] == 0


def test_token_stats_threads_inplace_and_fallback_agree(monkeypatch):
    logits = torch.randn(64, 3001) * 2
    labels = torch.randint(0, 3001, (64,))
    labels[::7] = -100
    one = with_threads(1, lambda: _ts(logits, labels, temperature=0.9))
    two = with_threads(2, lambda: _ts(logits, labels, temperature=0.9))
    for a, b in zip(one[:3], two[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # In place: the gradient written over the logits buffer equals the out-of-place one.
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0
    lp, ent = token_logprobs_entropy(x, labels, temperature=0.9, inplace_backward=True)
    ((lp * one[3]).sum() + (ent * one[4]).sum()).backward()
    torch.testing.assert_close(leaf.grad, one[2], rtol=0, atol=0)
    monkeypatch.setattr(cpu_ext, "FORCE_TORCH_FALLBACK", True)
    fb = _ts(logits, labels, temperature=0.9)
    for a, b in zip(one[:3], fb[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_stats_extension_rejects_bad_codes():
    x = torch.randn(2, 3)
    out = torch.empty(2)
    with pytest.raises(TypeError, match="dtype code"):
        _C.token_stats_forward(x.data_ptr(), 0, out.data_ptr(), 0, out.data_ptr(), 2, 3, 3, 1, 1.0, -100, 1)
    with pytest.raises(TypeError, match="dtype code"):
        _C.vib_forward(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), out.data_ptr(), 2, 3, 3, 3, 9, 0, 0, True,
                       -1.0, 1.0, True, 1)


# ----------------------------------------------------------------------------------------------
# GAE whitening (fused moments)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T", [(4, 64), (8, 2050), (13, 67), (4, 1)])
def test_gae_whitening_matches_float64_across_threads_and_masks(B, T):
    g = torch.Generator().manual_seed(B * T)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g) + 3.0  # a non-zero mean
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[B // 2] = False
    r64, v64 = r.double(), v.double()
    want, _ = gae(r64, v64, mask, gamma=0.99, lam=0.95, whiten=True)
    for threads in (1, 2):
        for m in (mask, mask.to(torch.uint8), mask.to(torch.float32)):
            got, _ = with_threads(threads, lambda: gae(r, v, m, gamma=0.99, lam=0.95, whiten=True))
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
            got, _ = with_threads(threads, lambda: gae(r, v, m, gamma=0.99, lam=0.95, whiten=True, shift_mean=False))
            want_ns, _ = gae(r64, v64, mask, gamma=0.99, lam=0.95, whiten=True, shift_mean=False)
            torch.testing.assert_close(got.double(), want_ns, rtol=1e-4, atol=1e-4)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_load", lambda attr: (None, "ImportError: test"))
    monkeypatch.setattr(cpu_ext, "_warned", set())
    mu, logvar, gz, gkl = _vib_inputs(4, 8)
    logits, labels = torch.randn(3, 20), torch.tensor([1, 2, 3])
    with pytest.warns(RuntimeWarning, match="vib_sample_kl falls back"):
        z, _ = vib_sample_kl(mu, logvar, seed=7)
    with pytest.warns(RuntimeWarning, match="token_logprobs_entropy falls back"):
        lp, _ = token_logprobs_entropy(logits, labels)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op: no second warning
        z2, _ = vib_sample_kl(mu, logvar, seed=7)
        token_logprobs_entropy(logits, labels)
    assert torch.equal(z, z2)
    monkeypatch.undo()
    z_cpp, _ = vib_sample_kl(mu, logvar, seed=7)
    torch.testing.assert_close(z_cpp, z, rtol=1e-5, atol=1e-5)  # same stream through the C++ path
