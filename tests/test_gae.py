"""GAE: every backend against a plain-Python float64 loop, masks of every shape, and bad input.

Backends: the C++ extension (``backend="torch"`` with the extension built), the vectorised PyTorch
fallback (forced with ``_FORCE_TORCH_FALLBACK``), and the Triton kernels under the interpreter
(``backend="triton"`` on CPU tensors, tiny shapes, chunk length forced small so several chunks and
their carries are exercised).
"""
import importlib
import math
import warnings

import pytest
import torch
from conftest import requires_triton

from vrpo_fast.ops import gae, gae_reference
from vrpo_fast.ops._common import triton_available, triton_interpret

# The module (vrpo_fast.ops.gae the attribute is the function it exports).
gae_mod = importlib.import_module("vrpo_fast.ops.gae")


# ----------------------------------------------------------------------------------------------
# Independent reference: scalars only, no torch vector ops
# ----------------------------------------------------------------------------------------------
def python_gae(rewards, values, mask, gamma, lam, whiten=False, shift_mean=True):
    r, v, m = rewards.double().tolist(), values.double().tolist(), (mask != 0).tolist()
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_value, running = 0.0, 0.0
        for t in range(T - 1, -1, -1):
            if not m[b][t]:
                continue
            delta = r[b][t] + gamma * next_value - v[b][t]
            running = delta + gamma * lam * running
            next_value = v[b][t]
            adv[b][t] = running
            ret[b][t] = running + v[b][t]
    if whiten:
        picked = [adv[b][t] for b in range(B) for t in range(T) if m[b][t]]
        n = len(picked)
        if n:
            mean = sum(picked) / n
            var = sum((x - mean) ** 2 for x in picked) / max(n - 1, 1)
            inv_std = 1.0 / math.sqrt(var + 1e-8)
            for b in range(B):
                for t in range(T):
                    if m[b][t]:
                        adv[b][t] = (adv[b][t] - mean) * inv_std + (0.0 if shift_mean else mean)
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def make_mask(kind, B, T, gen):
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if kind == "right":
            n = int(torch.randint(0, T + 1, (1,), generator=gen))
            mask[b, :n] = True
        elif kind == "left":
            n = int(torch.randint(0, T + 1, (1,), generator=gen))
            mask[b, T - n:] = True
        elif kind == "multiturn":  # response / tool-output / response ... then right padding
            t, on = 0, True
            end = T - int(torch.randint(0, max(T // 3, 1), (1,), generator=gen))
            while t < end:
                span = int(torch.randint(1, 5, (1,), generator=gen))
                mask[b, t:min(t + span, end)] = on
                t, on = t + span, not on
        elif kind == "random":
            mask[b] = torch.rand(T, generator=gen) < 0.5
        elif kind == "full":
            mask[b] = True
        else:
            raise ValueError(kind)
    if B > 1 and kind != "full":
        mask[B // 2] = False  # an all-masked row in the middle
    return mask


def make_inputs(B, T, dtype=torch.float64, kind="multiturn", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64).to(dtype)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64).to(dtype)
    return rewards, values, make_mask(kind, B, T, gen)


def tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=2e-2, atol=5e-2)


def assert_close(got, want, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))


@pytest.fixture(params=["cpp", "fallback"])
def cpu_backend(request, monkeypatch):
    if request.param == "cpp":
        ext, reason = gae_mod._load_extension()
        if ext is None:
            pytest.skip(f"C++ extension not built: {reason}")
    else:
        monkeypatch.setattr(gae_mod, "_FORCE_TORCH_FALLBACK", True)
    return request.param


@pytest.fixture
def small_triton_chunks(monkeypatch):
    """Force 4-token chunks (and several rows per program) so carries between chunks are tested."""
    kern = pytest.importorskip("vrpo_fast.kernels.gae")
    monkeypatch.setattr(kern, "_MAX_BLOCK_T", 4)
    monkeypatch.setattr(kern, "_TILE", 8)
    monkeypatch.setattr(kern, "_MIN_PROGRAMS", 1)
    return kern


GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.0, 0.95), (0.9, 0.0), (1.0, 0.0), (0.0, 0.0), (0.5, 1.0)]
MASK_KINDS = ["right", "left", "multiturn", "random", "full"]
WHITEN = [(False, True), (True, True), (True, False)]


# ----------------------------------------------------------------------------------------------
# CPU backends: C++ extension and vectorised fallback
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_cpu_matches_python_loop(cpu_backend, dtype, kind, gamma, lam):
    # B = 9: two groups of 4 rows (the SIMD path) plus a leftover row; T = 13: not a multiple of 4.
    rewards, values, mask = make_inputs(9, 13, dtype, kind, seed=10 * MASK_KINDS.index(kind) + GAMMA_LAM.index((gamma, lam)))
    for whiten, shift_mean in WHITEN:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, shift_mean=shift_mean,
                       backend="torch")
        want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam, whiten, shift_mean)
        assert_close(adv, want_adv, dtype)
        assert_close(ret, want_ret, dtype)
        assert adv.is_contiguous() and ret.is_contiguous()


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 67])
@pytest.mark.parametrize("B", [1, 4, 6])
def test_cpu_shapes(cpu_backend, B, T):
    for dtype in (torch.float32, torch.float64):
        rewards, values, mask = make_inputs(B, T, dtype, "random", seed=B * 100 + T)
        adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9, backend="torch")
        want_adv, want_ret = python_gae(rewards, values, mask, 0.97, 0.9)
        assert_close(adv, want_adv, dtype)
        assert_close(ret, want_ret, dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                                        torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cpu_mask_dtypes(cpu_backend, mask_dtype):
    rewards, values, mask = make_inputs(8, 41, torch.float32, "multiturn", seed=3)
    want_adv, want_ret = python_gae(rewards, values, mask, 0.99, 0.95, whiten=True)
    adv, ret = gae(rewards, values, mask.to(mask_dtype), gamma=0.99, lam=0.95, whiten=True, backend="torch")
    assert_close(adv, want_adv, torch.float32)
    assert_close(ret, want_ret, torch.float32)


def test_cpu_long_rows_and_threads(cpu_backend):
    # Large enough for several threads in the C++ pass; results must not depend on the thread count.
    rewards, values, mask = make_inputs(24, 3001, torch.float32, "multiturn", seed=5)
    want_adv, want_ret = python_gae(rewards, values, mask, 0.999, 0.97)
    want_white, _ = python_gae(rewards, values, mask, 0.999, 0.97, whiten=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gae(rewards, values, mask, gamma=0.999, lam=0.97, whiten=True, backend="torch")
        plain = gae(rewards, values, mask, gamma=0.999, lam=0.97, backend="torch")
        torch.set_num_threads(4)
        four = gae(rewards, values, mask, gamma=0.999, lam=0.97, whiten=True, backend="torch")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])
    # float32 recursions over ~3000 tokens: absolute error grows with the advantage magnitude (~50).
    torch.testing.assert_close(plain[0].double(), want_adv, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(plain[1].double(), want_ret, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(one[0].double(), want_white, rtol=1e-4, atol=1e-4)


def test_cpu_strided_inputs(cpu_backend):
    # Non-contiguous views are read in place (C++: arbitrary element strides).
    rewards, values, mask = make_inputs(7, 10, torch.float64, "random", seed=9)
    r_t = rewards.t().contiguous().t()  # column-major
    v_wide = torch.zeros(7, 25, dtype=torch.float64)
    v_wide[:, ::2][:, :10] = values  # time stride 2, row stride 25
    v_view = v_wide[:, ::2][:, :10]
    m_int = mask.to(torch.int32).t().contiguous().t()
    adv, ret = gae(r_t, v_view, m_int, gamma=0.9, lam=0.8, whiten=True, backend="torch")
    want_adv, want_ret = python_gae(rewards, values, mask, 0.9, 0.8, whiten=True)
    assert_close(adv, want_adv, torch.float64)
    assert_close(ret, want_ret, torch.float64)
    # A mask broadcast from one row (stride 0), and a single row with an unusual row stride.
    shared = mask[3:4].expand(7, 10)
    adv, ret = gae(rewards.float(), values.float(), shared, gamma=0.9, lam=0.8, backend="torch")
    want_adv, want_ret = python_gae(rewards, values, shared.contiguous(), 0.9, 0.8)
    assert_close(adv, want_adv, torch.float32)
    assert_close(ret, want_ret, torch.float32)
    one_row = torch.randn(10, 1, dtype=torch.float64).t()  # shape (1, 10), strides (1, 1)
    adv, ret = gae(one_row, values[:1], mask[1:2], gamma=0.9, lam=0.8, backend="torch")
    want_adv, want_ret = python_gae(one_row, values[:1], mask[1:2], 0.9, 0.8)
    assert_close(adv, want_adv, torch.float64)
    assert_close(ret, want_ret, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision(cpu_backend, dtype):
    rewards, values, mask = make_inputs(5, 9, dtype, "right", seed=11)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95, backend="torch")
    want_adv, want_ret = python_gae(rewards, values, mask, 1.0, 0.95)
    assert_close(adv, want_adv, dtype)
    assert_close(ret, want_ret, dtype)


def test_fallback_chunked_small_gamma_lam(monkeypatch):
    # gamma * lam = 1e-4: the fallback cuts T=200 into chunks of 65 (bounded (gamma*lam)^-k scale).
    monkeypatch.setattr(gae_mod, "_FORCE_TORCH_FALLBACK", True)
    rewards, values, mask = make_inputs(3, 200, torch.float64, "multiturn", seed=13)
    for gamma, lam in [(0.01, 0.01), (1e-3, 1.0), (0.7, 0.6)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend="torch")
        want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam)
        assert_close(adv, want_adv, torch.float64)
        assert_close(ret, want_ret, torch.float64)


def test_masked_tokens_are_transparent(cpu_backend):
    # Inserting masked tokens (with arbitrary finite rewards/values) anywhere changes nothing else.
    gen = torch.Generator().manual_seed(17)
    r_c = torch.randn(1, 12, generator=gen, dtype=torch.float64)
    v_c = torch.randn(1, 12, generator=gen, dtype=torch.float64)
    adv_c, ret_c = gae(r_c, v_c, torch.ones(1, 12, dtype=torch.bool), gamma=0.95, lam=0.9, backend="torch")
    keep = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    r = torch.randn(1, 20, generator=gen, dtype=torch.float64) * 100
    v = torch.randn(1, 20, generator=gen, dtype=torch.float64) * 100
    r[0, keep], v[0, keep] = r_c[0], v_c[0]
    adv, ret = gae(r, v, keep[None], gamma=0.95, lam=0.9, backend="torch")
    torch.testing.assert_close(adv[0, keep], adv_c[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret[0, keep], ret_c[0], rtol=1e-12, atol=1e-12)
    assert torch.all(adv[0, ~keep] == 0) and torch.all(ret[0, ~keep] == 0)


def test_whitening_edge_cases(cpu_backend):
    r = torch.randn(3, 6, dtype=torch.float64)
    v = torch.randn(3, 6, dtype=torch.float64)
    none = torch.zeros(3, 6, dtype=torch.bool)
    adv, ret = gae(r, v, none, whiten=True, shift_mean=False, backend="torch")
    assert torch.all(adv == 0) and torch.all(ret == 0)
    one = none.clone()
    one[1, 4] = True  # a single unmasked token: (a - mean) = 0 exactly, + mean when not shifted
    adv, _ = gae(r, v, one, whiten=True, backend="torch")
    assert torch.all(adv == 0)
    adv, _ = gae(r, v, one, whiten=True, shift_mean=False, backend="torch")
    want = r[1, 4] - v[1, 4]
    torch.testing.assert_close(adv[1, 4], want)
    # Whitened advantages: mean 0 and unbiased std 1 over the unmasked tokens.
    rewards, values, mask = make_inputs(6, 30, torch.float64, "multiturn", seed=19)
    adv, _ = gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="torch")
    picked = adv[mask]
    assert abs(picked.mean().item()) < 1e-10
    assert abs(picked.std(unbiased=True).item() - 1.0) < 1e-6
    assert torch.all(adv[~mask] == 0)


def test_empty_and_no_grad(cpu_backend):
    for shape in [(0, 5), (3, 0)]:
        adv, ret = gae(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
        assert adv.shape == shape and ret.shape == shape
    r = torch.randn(2, 5, requires_grad=True)
    v = torch.randn(2, 5, requires_grad=True)
    adv, ret = gae(r, v, torch.ones(2, 5), backend="torch")
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------------------------------------
# Triton under the interpreter
# ----------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize(
    "kind,dtype", [(k, torch.float64) for k in MASK_KINDS] + [(k, torch.float32) for k in ("left", "multiturn")]
)
def test_triton_matches_python_loop(small_triton_chunks, kind, dtype):
    rewards, values, mask = make_inputs(5, 11, dtype, kind, seed=23)
    for (gamma, lam), (whiten, shift_mean) in zip([(0.99, 0.95), (1.0, 1.0), (0.5, 0.0)], WHITEN):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, shift_mean=shift_mean,
                       backend="triton")
        want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam, whiten, shift_mean)
        assert_close(adv, want_adv, dtype)
        assert_close(ret, want_ret, dtype)


@requires_triton
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_triton_gamma_lam(small_triton_chunks, gamma, lam):
    rewards, values, mask = make_inputs(3, 9, torch.float64, "multiturn", seed=29)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend="triton")
    want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam)
    assert_close(adv, want_adv, torch.float64)
    assert_close(ret, want_ret, torch.float64)


@requires_triton
def test_triton_default_blocks_masks_strides():
    # Default launch parameters (one chunk), T = 1, a strided view and several mask dtypes.
    rewards, values, mask = make_inputs(4, 1, torch.float32, "random", seed=31)
    adv, ret = gae(rewards, values, mask, backend="triton")
    want_adv, want_ret = python_gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv, want_adv, torch.float32)
    assert_close(ret, want_ret, torch.float32)
    rewards, values, mask = make_inputs(3, 12, torch.float64, "left", seed=37)
    for m in (mask, mask.to(torch.int64), mask.to(torch.float32)):
        adv, ret = gae(rewards.t().contiguous().t(), values[:, :], m, gamma=0.9, lam=0.9, whiten=True,
                       backend="triton")
        want_adv, want_ret = python_gae(rewards, values, mask, 0.9, 0.9, whiten=True)
        assert_close(adv, want_adv, torch.float64)
        assert_close(ret, want_ret, torch.float64)
    adv, ret = gae(rewards.to(torch.bfloat16), values.to(torch.bfloat16), mask, gamma=0.9, lam=0.9,
                   backend="triton")
    want_adv, want_ret = python_gae(rewards.to(torch.bfloat16), values.to(torch.bfloat16), mask, 0.9, 0.9)
    assert_close(adv, want_adv, torch.bfloat16)


@requires_triton
def test_triton_all_masked_whitening(small_triton_chunks):
    r, v = torch.randn(2, 7), torch.randn(2, 7)
    adv, ret = gae(r, v, torch.zeros(2, 7, dtype=torch.bool), whiten=True, backend="triton")
    assert torch.all(adv == 0) and torch.all(ret == 0)


@requires_triton
def test_triton_validates():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    r[1, 2] = float("nan")
    with pytest.raises(ValueError, match="rewards"):
        gae(r, v, m, backend="triton")
    gae(r, v, m, backend="triton", validate=False)  # no check, no error
    with pytest.raises(ValueError, match="mask"):
        gae(v, v, m * 2, backend="triton")


# ----------------------------------------------------------------------------------------------
# Bad input and the missing-extension warning
# ----------------------------------------------------------------------------------------------
def test_bad_arguments():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have the same shape"):
        gae(r, torch.randn(2, 4), m)
    with pytest.raises(ValueError, match="mask must have the same shape"):
        gae(r, v, torch.ones(3, 5))
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        gae(torch.randn(10), torch.randn(10), torch.ones(10))
    with pytest.raises(ValueError, match="values must be 2-D"):
        gae(r, v[None], m)
    with pytest.raises(TypeError, match="rewards must be a floating"):
        gae(torch.ones(2, 5, dtype=torch.int64), v, m)
    with pytest.raises(TypeError, match="values must have the same dtype"):
        gae(r, v.double(), m)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        gae(r.tolist(), v, m)
    for name, bad in [("gamma", -0.1), ("gamma", 1.5), ("gamma", float("nan")), ("lam", 1.01), ("lam", -1e-9)]:
        with pytest.raises(ValueError, match=f"{name} must be in"):
            gae(r, v, m, **{name: bad})
    with pytest.raises(TypeError, match="gamma must be a real number"):
        gae(r, v, m, gamma="0.9")
    with pytest.raises(ValueError, match="backend must be one of"):
        gae(r, v, m, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_and_bad_mask(cpu_backend, dtype):
    base_r, base_v = torch.randn(6, 9, dtype=dtype), torch.randn(6, 9, dtype=dtype)
    m = torch.ones(6, 9)
    for where in [(0, 0), (1, 8), (5, 8), (4, 3)]:  # 4-row group: tile, tail; leftover rows
        for bad in (float("nan"), float("inf"), -float("inf")):
            r = base_r.clone()
            r[where] = bad
            with pytest.raises(ValueError, match="rewards contains NaN or inf"):
                gae(r, base_v, m, backend="torch")
            v = base_v.clone()
            v[where] = bad
            with pytest.raises(ValueError, match="values contains NaN or inf"):
                gae(base_r, v, m, backend="torch")
    # Checked at masked positions too (garbage there usually means a bug upstream).
    r = base_r.clone()
    r[2, 2] = float("nan")
    m0 = m.clone()
    m0[2, 2] = 0
    with pytest.raises(ValueError, match="rewards"):
        gae(r, base_v, m0, backend="torch")
    adv, _ = gae(r, base_v, m0, backend="torch", validate=False)  # the NaN is masked: it never leaks
    assert torch.isfinite(adv).all()
    for bad_mask in (m * 2, m - 2, m * 0.5):
        with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
            gae(base_r, base_v, bad_mask, backend="torch")
    for where in [(0, 0), (2, 8), (5, 8)]:
        one_bad = torch.ones(6, 9, dtype=torch.uint8)
        one_bad[where] = 3
        with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
            gae(base_r, base_v, one_bad, backend="torch")
    one_bad = torch.ones(6, 9, dtype=torch.int64)
    one_bad[1, 1] = -1
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        gae(base_r, base_v, one_bad, backend="torch")


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.setattr(gae_mod, "_load_extension", lambda: (None, "ImportError: simulated"))
    monkeypatch.setattr(gae_mod, "_warned_missing_extension", False)
    rewards, values, mask = make_inputs(3, 6, torch.float64, "right", seed=41)
    with pytest.warns(RuntimeWarning, match="pip install -e . --no-build-isolation"):
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gae(rewards, values, mask, gamma=0.9, lam=0.9)  # second call: silent
    want_adv, want_ret = python_gae(rewards, values, mask, 0.9, 0.9)
    assert_close(adv, want_adv, torch.float64)
    assert_close(ret, want_ret, torch.float64)


def test_reference_twin_matches_python_loop():
    rewards, values, mask = make_inputs(4, 10, torch.float64, "multiturn", seed=43)
    for whiten, shift_mean in WHITEN:
        adv, ret = gae_reference(rewards, values, mask, gamma=0.98, lam=0.9, whiten=whiten, shift_mean=shift_mean)
        want_adv, want_ret = python_gae(rewards, values, mask, 0.98, 0.9, whiten, shift_mean)
        assert_close(adv, want_adv, torch.float64)
        assert_close(ret, want_ret, torch.float64)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_whitening_rounds_once(dtype):
    """fp16 / bf16 with whitening: recursion and whitening in fp32, one rounding at the end, like the
    CPU path (not the raw advantages rounded, then whitened and rounded again)."""
    gen = torch.Generator().manual_seed(29)
    B, T = 6, 200
    rewards = torch.randn(B, T, generator=gen).to(dtype)
    values = (3 * torch.randn(B, T, generator=gen) + 5).to(dtype)  # a large mean: whitening cancels it
    mask = torch.rand(B, T, generator=gen) < 0.9
    want, _ = gae_reference(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95, whiten=True)
    got, _ = gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="triton")
    cpu, _ = gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="torch")
    # Round to nearest is within half an ulp: 2**-p of |value| (p = 8 bf16, 11 fp16). The interpreter
    # converts fp32 -> bf16 by truncation (a full ulp); a GPU rounds to nearest.
    rel = 2.0 ** (-11 if dtype == torch.float16 else -7)
    for name, out in (("triton", got), ("cpu", cpu)):
        err = (out.double() - want).abs()
        assert bool((err <= rel * want.abs() * 1.01 + 1e-6)[mask].all()), name


@pytest.mark.parametrize("whiten", [False, True])
def test_validate_false_propagates_nan_the_same_on_every_backend(monkeypatch, whiten):
    """validate=False: a NaN reward poisons its row's advantages up to the row start (and, whitened,
    every unmasked token); a NaN at a masked position never leaks. Same on C++, fallback, Triton."""
    gen = torch.Generator().manual_seed(31)
    rewards, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    mask = torch.ones(3, 6)
    mask[2, 4:] = 0
    rewards[1, 3] = math.nan
    rewards[2, 5] = math.nan  # masked: transparent
    patterns = []
    paths = [("torch", False), ("torch", True)]  # the C++ extension (when built), the torch fallback
    if triton_available() and triton_interpret():
        paths.append(("triton", False))
    for backend, fallback in paths:
        monkeypatch.setattr(gae_mod, "_FORCE_TORCH_FALLBACK", fallback)
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.9, whiten=whiten, validate=False, backend=backend)
        patterns.append((adv.isnan().tolist(), ret.isnan().tolist()))
    want_ret = [[False] * 6, [True] * 4 + [False] * 2, [False] * 6]
    want_adv = [[True] * 6, [True] * 6, [True] * 4 + [False] * 2] if whiten else want_ret
    assert all(p == (want_adv, want_ret) for p in patterns), patterns
