"""vib_sample_kl: fused VIB reparameterisation + KL, Triton (interpreter) and torch backends.

The noise is recovered by running the op with mu = 0, logvar = 0 (then z = eps exactly) under the
same seed and shape; everything else is checked against a float64 PyTorch formula using that eps.
"""
import math

import pytest
import torch
from conftest import requires_triton

import vrpo_fast.ops.vib as vib_mod
from vrpo_fast.ops import vib_sample_kl, vib_sample_kl_reference
from vrpo_fast.ops._common import triton_available, triton_interpret

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=requires_triton)]
CLAMP = (-20.0, 10.0)


def recover_eps(shape, seed, backend):
    zeros = torch.zeros(shape)
    eps, _ = vib_sample_kl(zeros, zeros, seed=seed, backend=backend)
    return eps.double()


def reference64(mu, logvar, eps, clamp=CLAMP, training=True):
    """float64 formula, written out independently of the module under test."""
    lv = logvar.clamp(*clamp) if clamp is not None else logvar
    kl = 0.5 * (mu * mu + torch.exp(lv) - lv - 1.0).sum(-1)
    z = mu + torch.exp(0.5 * lv) * eps if training else mu
    return z, kl


def make_inputs(shape, lv_scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).to(dtype)
    logvar = (lv_scale * torch.randn(shape, generator=g)).to(dtype)
    return mu, logvar


def saved_bytes(fn, *args, **kwargs):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    # The fused op also keeps its seed, a 0-d int64 CPU tensor (8 bytes): not activation memory.
    return [t for t in saved if not (t.dim() == 0 and t.dtype == torch.int64)], out


# ----------------------------------------------------------------------------------------------
# values and gradients vs. float64 with the same eps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(48,), (7, 100), (2, 3, 48), (5, 64), (3, 1)])
def test_forward_matches_float64(backend, shape):
    mu, logvar = make_inputs(shape)
    eps = recover_eps(shape, 11, backend)
    z, kl = vib_sample_kl(mu, logvar, seed=11, backend=backend)
    z_ref, kl_ref = reference64(mu.double(), logvar.double(), eps)
    assert z.shape == mu.shape and z.dtype == torch.float32
    assert kl.shape == mu.shape[:-1] and kl.dtype == torch.float32
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 48), (2, 3, 100), (37,)])
def test_gradients_match_float64_autograd(backend, shape):
    mu, logvar = make_inputs(shape, lv_scale=3.0, seed=1)
    flat = logvar.view(-1)
    # Out of the clamp range on both sides, and exactly on both bounds (gradient passes there).
    flat[0], flat[1], flat[2], flat[3] = -25.0, 12.0, CLAMP[0], CLAMP[1]
    eps = recover_eps(shape, 5, backend)
    g = torch.Generator().manual_seed(2)
    grad_z = torch.randn(shape, generator=g)
    grad_kl = torch.randn(shape[:-1], generator=g)

    mu_a, lv_a = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = vib_sample_kl(mu_a, lv_a, seed=5, backend=backend)
    torch.autograd.backward((z, kl), (grad_z, grad_kl))

    mu_r, lv_r = mu.double().requires_grad_(), logvar.double().requires_grad_()
    z_r, kl_r = reference64(mu_r, lv_r, eps)
    torch.autograd.backward((z_r, kl_r), (grad_z.double(), grad_kl.double()))

    torch.testing.assert_close(mu_a.grad.double(), mu_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv_a.grad.double(), lv_r.grad, rtol=1e-5, atol=1e-5)
    assert lv_a.grad.view(-1)[0] == 0 and lv_a.grad.view(-1)[1] == 0
    assert lv_a.grad.view(-1)[2] != 0 and lv_a.grad.view(-1)[3] != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", ["z", "kl", "sum_both"])
def test_gradients_through_one_output(backend, use):
    """Only z, only kl (the other grad is None), and broadcast (stride-0) upstream grads."""
    mu, logvar = make_inputs((4, 20), seed=3)
    eps = recover_eps((4, 20), 9, backend)
    mu_a, lv_a = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    mu_r, lv_r = mu.double().requires_grad_(), logvar.double().requires_grad_()
    for (m, l, fn) in ((mu_a, lv_a, None), (mu_r, lv_r, eps)):
        z, kl = vib_sample_kl(m, l, seed=9, backend=backend) if fn is None else reference64(m, l, fn)
        loss = {"z": (z * z).sum(), "kl": kl.pow(2).sum(), "sum_both": z.sum() + kl.sum()}[use]
        loss.backward()
    torch.testing.assert_close(mu_a.grad.double(), mu_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv_a.grad.double(), lv_r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    mu, logvar = make_inputs((3, 5), lv_scale=1.0, seed=4, dtype=torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, l: vib_sample_kl(m, l, seed=21, backend=backend), (mu, logvar))


def test_reference_twin_agrees_with_fused_torch_path():
    mu, logvar = make_inputs((5, 12))
    eps = recover_eps((5, 12), 3, "torch").float()
    z_ref, kl_ref = vib_sample_kl_reference(mu, logvar, eps)
    z, kl = vib_sample_kl(mu, logvar, seed=3, backend="torch")
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(kl, kl_ref)


# ----------------------------------------------------------------------------------------------
# memory: only mu and logvar are kept for backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_mu_and_logvar(backend):
    mu, logvar = make_inputs((8, 48))
    mu.requires_grad_()
    logvar.requires_grad_()
    saved, (z, kl) = saved_bytes(vib_sample_kl, mu, logvar, seed=1, backend=backend)
    assert sum(t.numel() * t.element_size() for t in saved) == mu.nbytes + logvar.nbytes
    assert [t.data_ptr() for t in saved] == [mu.data_ptr(), logvar.data_ptr()]  # the inputs, not copies
    # The eager formula keeps at least eps and exp(lv / 2) as well.
    eager_saved, _ = saved_bytes(vib_sample_kl_reference, mu, logvar)
    assert sum(t.numel() * t.element_size() for t in eager_saved) >= 2 * (mu.nbytes + logvar.nbytes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_saved_without_copies(backend):
    """mu / logvar as the two halves of one encoder output: no copies are saved, results equal."""
    stats = torch.randn(3, 4, 2 * 24)
    mu, logvar = stats[..., :24], stats[..., 24:]
    saved, (z, kl) = saved_bytes(vib_sample_kl, mu.requires_grad_(), logvar.requires_grad_(), seed=4, backend=backend)
    assert [t.data_ptr() for t in saved] == [mu.data_ptr(), logvar.data_ptr()]
    z_c, kl_c = vib_sample_kl(mu.contiguous(), logvar.contiguous(), seed=4, backend=backend)
    torch.testing.assert_close(z, z_c, rtol=0, atol=0)
    torch.testing.assert_close(kl, kl_c)
    # Last dim not contiguous (a transpose): copied internally, same values.
    mu_t = mu.detach().contiguous().transpose(0, 1).contiguous().transpose(0, 1)
    z_t, _ = vib_sample_kl(mu_t, logvar.detach(), seed=4, backend=backend)
    torch.testing.assert_close(z_t, z.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# eval, clamp, determinism, noise quality
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_returns_mu_and_kl(backend):
    mu, logvar = make_inputs((2, 5, 48))
    mu.requires_grad_()
    logvar.requires_grad_()
    state = torch.get_rng_state()
    z, kl = vib_sample_kl(mu, logvar, training=False, backend=backend)
    assert torch.equal(state, torch.get_rng_state())  # eval draws no seed
    assert z is mu
    _, kl_ref = reference64(mu.detach().double(), logvar.detach().double(), None, training=False)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 5)
    (z.sum() + (kl * g).sum()).backward()
    torch.testing.assert_close(mu.grad, 1.0 + g[..., None] * mu.detach())
    lv = logvar.detach().clamp(*CLAMP)
    torch.testing.assert_close(logvar.grad, 0.5 * g[..., None] * (lv.exp() - 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_values_and_grads(backend):
    logvar = torch.tensor([[-30.0, -20.0, -1.0, 0.0, 10.0, 15.0]])
    mu = torch.full_like(logvar, 0.5)
    eps = recover_eps(mu.shape, 2, backend)
    lv_c = logvar.clamp(*CLAMP)
    mu_a, lv_a = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = vib_sample_kl(mu_a, lv_a, seed=2, backend=backend)
    torch.testing.assert_close(z.double(), mu.double() + torch.exp(0.5 * lv_c.double()) * eps, rtol=1e-5, atol=1e-6)
    kl_expected = 0.5 * (mu.double() ** 2 + lv_c.double().exp() - lv_c.double() - 1).sum(-1)
    torch.testing.assert_close(kl.double(), kl_expected, rtol=1e-5, atol=1e-5)
    kl.sum().backward()
    grad = lv_a.grad[0]
    assert grad[0] == 0 and grad[5] == 0  # outside the range
    torch.testing.assert_close(grad[1:5].double(), 0.5 * (lv_c[0, 1:5].double().exp() - 1), rtol=1e-5, atol=1e-7)

    # logvar_clamp=None: no clamping at all.
    lv_n = torch.tensor([[-25.0, 12.0]], requires_grad=True)
    z_n, kl_n = vib_sample_kl(torch.zeros(1, 2), lv_n, seed=2, logvar_clamp=None, backend=backend)
    eps_n = recover_eps((1, 2), 2, backend)
    torch.testing.assert_close(z_n.double(), torch.exp(0.5 * lv_n.detach().double()) * eps_n, rtol=1e-5, atol=1e-9)
    expected = 0.5 * (lv_n.detach().double().exp() - lv_n.detach().double() - 1).sum(-1)
    torch.testing.assert_close(kl_n.double(), expected, rtol=1e-5, atol=1e-5)
    kl_n.sum().backward()
    assert (lv_n.grad != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_per_seed(backend):
    mu, logvar = make_inputs((4, 48))
    z1, _ = vib_sample_kl(mu, logvar, seed=123, backend=backend)
    z2, _ = vib_sample_kl(mu, logvar, seed=123, backend=backend)
    z3, _ = vib_sample_kl(mu, logvar, seed=124, backend=backend)
    assert torch.equal(z1, z2)
    assert (z1 != z3).float().mean() > 0.99
    # seed=None: drawn from torch's default generator, so manual_seed reproduces it.
    torch.manual_seed(7)
    a, _ = vib_sample_kl(mu, logvar, backend=backend)
    b, _ = vib_sample_kl(mu, logvar, backend=backend)
    torch.manual_seed(7)
    a2, _ = vib_sample_kl(mu, logvar, backend=backend)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)
    # Large seeds are valid too.
    z_big, _ = vib_sample_kl(mu, logvar, seed=2**63 - 1, backend=backend)
    assert torch.isfinite(z_big).all() and not torch.equal(z_big, z1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_standard_normal(backend):
    n_rows, n_cols = 64, 100
    eps = recover_eps((n_rows, n_cols), 31, backend)
    n = eps.numel()
    assert abs(eps.mean().item()) < 4.0 / math.sqrt(n)
    assert abs(eps.std().item() - 1.0) < 4.0 * math.sqrt(0.5 / n)
    assert abs((eps**3).mean().item()) < 4.0 * math.sqrt(15.0 / n)  # no skew
    assert abs((eps**4).mean().item() - 3.0) < 4.0 * math.sqrt(96.0 / n)  # normal kurtosis
    assert abs((eps.abs() < 1.0).double().mean().item() - 0.6827) < 0.03
    # Every element gets its own draw: no repeated rows, (almost) no repeated fp32 values (a few
    # birthday collisions are expected among 6400 fp32 normals), no lag-1 correlation.
    assert torch.unique(eps, dim=0).shape[0] == n_rows
    assert torch.unique(eps).numel() >= n - 5
    flat = eps.view(-1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 4.0 / math.sqrt(n)
    rows = torch.corrcoef(eps)
    off_diag = rows[~torch.eye(n_rows, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    mu, logvar = make_inputs((6, 48), lv_scale=1.0, dtype=dtype)
    mu.requires_grad_()
    logvar.requires_grad_()
    z, kl = vib_sample_kl(mu, logvar, seed=8, backend=backend)
    assert z.dtype == dtype and kl.dtype == torch.float32
    # eps does not depend on the input dtype: fp32 zeros give the same noise.
    eps = recover_eps((6, 48), 8, backend)
    z_ref, kl_ref = reference64(mu.detach().double(), logvar.detach().double(), eps)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(z.double(), z_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-4)  # fp32 math on exact inputs
    gz, gk = torch.randn(6, 48), torch.randn(6)
    torch.autograd.backward((z, kl), (gz.to(dtype), gk))
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype
    mu_r, lv_r = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    z_r, kl_r = reference64(mu_r, lv_r, eps)
    torch.autograd.backward((z_r, kl_r), (gz.to(dtype).double(), gk.double()))
    torch.testing.assert_close(mu.grad.double(), mu_r.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(logvar.grad.double(), lv_r.grad, rtol=tol, atol=tol)


@requires_triton
def test_triton_latent_wider_than_one_tile():
    """L > the kernel's 2048-element tile: the column loop runs twice, the second one partial."""
    mu, logvar = make_inputs((2, 2100), lv_scale=1.0)
    eps = recover_eps((2, 2100), 6, "triton")
    mu.requires_grad_()
    logvar.requires_grad_()
    z, kl = vib_sample_kl(mu, logvar, seed=6, backend="triton")
    mu_r, lv_r = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    z_r, kl_r = reference64(mu_r, lv_r, eps)
    torch.testing.assert_close(z.double(), z_r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_r.detach(), rtol=1e-5, atol=1e-4)
    gk = torch.tensor([0.3, -1.2])
    torch.autograd.backward((z, kl), (torch.ones_like(z), gk))
    torch.autograd.backward((z_r, kl_r), (torch.ones_like(z_r), gk.double()))
    torch.testing.assert_close(logvar.grad.double(), lv_r.grad, rtol=1e-5, atol=1e-5)


def test_torch_path_many_row_blocks(monkeypatch):
    """Tiny CPU blocks: several row blocks and a partial last one, same results as one block."""
    mu, logvar = make_inputs((13, 10), seed=2)
    logvar[7, 2] = 30.0  # only the third block needs clamping (and its gradient mask)
    mu.requires_grad_()
    logvar.requires_grad_()
    monkeypatch.setattr(vib_mod, "_CPU_BLOCK_ELEMS", 30)  # 3 rows per block: 5 blocks, last has 1
    eps = recover_eps((13, 10), 4, "torch")
    z, kl = vib_sample_kl(mu, logvar, seed=4, backend="torch")
    gz = torch.randn(13, 10)
    gk = torch.randn(13)
    torch.autograd.backward((z, kl), (gz, gk))
    mu_r, lv_r = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    z_r, kl_r = reference64(mu_r, lv_r, eps)
    torch.autograd.backward((z_r, kl_r), (gz.double(), gk.double()))
    torch.testing.assert_close(z.double(), z_r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu.grad.double(), mu_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar.grad.double(), lv_r.grad, rtol=1e-5, atol=1e-5)
    assert logvar.grad[7, 2] == 0
    # Distinct blocks draw distinct noise (the generator advances).
    assert not torch.equal(eps[0:3], eps[3:6])


def test_torch_path_independent_of_thread_count(monkeypatch):
    """Blocks are spread over threads; the noise is per block, so results do not depend on it."""
    monkeypatch.setattr(vib_mod, "_CPU_BLOCK_ELEMS", 40)  # 4 rows per block, 5 blocks
    mu, logvar = make_inputs((18, 10), seed=5)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = vib_sample_kl(m, lv, seed=77, backend="torch")
        (z.square().sum() + kl.sum()).backward()
        results.append((z.detach(), kl.detach(), m.grad, lv.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_mode(backend, monkeypatch):
    monkeypatch.setattr(vib_mod, "_CPU_BLOCK_ELEMS", 40)
    mu, logvar = make_inputs((18, 10), seed=5)
    z_ref, kl_ref = vib_sample_kl(mu, logvar, seed=3, backend=backend)
    with torch.inference_mode():
        z, kl = vib_sample_kl(mu, logvar, seed=3, backend=backend)
    assert torch.equal(z, z_ref) and torch.equal(kl, kl_ref)
    with torch.no_grad():
        z, kl = vib_sample_kl(mu.requires_grad_(), logvar, seed=3, backend=backend)
    assert torch.equal(z, z_ref) and not z.requires_grad


def test_double_backward_is_refused():
    mu, logvar = make_inputs((2, 4))
    mu.requires_grad_()
    z, kl = vib_sample_kl(mu, logvar, seed=0, backend="torch")
    (g,) = torch.autograd.grad(kl.sum(), mu, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    mu = torch.zeros(0, 8, requires_grad=True)
    logvar = torch.zeros(0, 8, requires_grad=True)
    z, kl = vib_sample_kl(mu, logvar, seed=1, backend=backend)
    assert z.shape == (0, 8) and kl.shape == (0,)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == (0, 8)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_validation():
    mu = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="logvar"):
        vib_sample_kl(mu, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="logvar"):
        vib_sample_kl(mu, torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="mu"):
        vib_sample_kl(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="mu"):
        vib_sample_kl([0.0, 1.0], mu)
    with pytest.raises(ValueError, match="logvar"):
        vib_sample_kl(mu, torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="latent"):
        vib_sample_kl(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match="mu"):
        vib_sample_kl(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="logvar_clamp"):
        vib_sample_kl(mu, mu, logvar_clamp=(1.0, -1.0))
    with pytest.raises(ValueError, match="logvar_clamp"):
        vib_sample_kl(mu, mu, logvar_clamp=(float("nan"), 1.0))
    with pytest.raises(TypeError, match="logvar_clamp"):
        vib_sample_kl(mu, mu, logvar_clamp=(1.0,))
    with pytest.raises(TypeError, match="logvar_clamp"):
        vib_sample_kl(mu, mu, logvar_clamp=("a", 1.0))
    with pytest.raises(ValueError, match="seed"):
        vib_sample_kl(mu, mu, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        vib_sample_kl(mu, mu, seed=2**63)
    with pytest.raises(TypeError, match="seed"):
        vib_sample_kl(mu, mu, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        vib_sample_kl(mu, mu, seed=True)
    with pytest.raises(TypeError, match="training"):
        vib_sample_kl(mu, mu, training="yes")
    with pytest.raises(ValueError, match="backend"):
        vib_sample_kl(mu, mu, backend="cuda")


# ----------------------------------------------------------------------------------------------
# NaN propagation: the same on every backend (torch.clamp keeps NaN; so does the Triton clamp)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clamp", [CLAMP, None])
def test_nan_propagates_the_same_on_every_backend(clamp):
    mu, logvar = make_inputs((4, 10))
    logvar[1, 2] = math.nan
    mu[2, 5] = math.nan
    backends = ["torch"] + (["triton"] if triton_available() and triton_interpret() else [])
    grads = {}
    for backend in backends:
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = vib_sample_kl(m, lv, seed=5, backend=backend, logvar_clamp=clamp)
        # As the eager formula: NaN exactly where a NaN input enters.
        z_ref, kl_ref = vib_sample_kl_reference(mu.double(), logvar.double(), recover_eps((4, 10), 5, backend),
                                                logvar_clamp=clamp)
        assert kl.isnan().tolist() == kl_ref.isnan().tolist() == [False, True, True, False], backend
        assert z.isnan().nonzero().tolist() == z_ref.isnan().nonzero().tolist() == [[1, 2], [2, 5]], backend
        (z.nan_to_num().sum() + kl.nan_to_num().sum()).backward()
        assert torch.isfinite(m.grad[[0, 3]]).all() and torch.isfinite(lv.grad[[0, 3]]).all()
        # Eager autograd through the formula (torch.clamp drops the gradient of a NaN logvar).
        m64, lv64 = mu.double().requires_grad_(), logvar.double().requires_grad_()
        z64, kl64 = vib_sample_kl_reference(m64, lv64, recover_eps((4, 10), 5, backend), logvar_clamp=clamp)
        (z64.nan_to_num().sum() + kl64.nan_to_num().sum()).backward()
        assert torch.equal(m.grad.isnan(), m64.grad.isnan()) and torch.equal(lv.grad.isnan(), lv64.grad.isnan())
        grads[backend] = (m.grad, lv.grad)
    if "triton" in grads:
        for a, b in zip(grads["torch"], grads["triton"]):
            assert torch.equal(a.isnan(), b.isnan())
