"""vib_sample_kl(..., row_ids=...): noise keyed by (seed, row id, column), not by the row's position.

The property a data-parallel run needs: the same (row, id) gets bitwise the same z, KL and gradients
however the rows are permuted, split into batches or sharded. Noise is recovered by running the op
with mu = 0, logvar = 0 and the same ids (then z = eps exactly); values are checked against a
float64 formula with that eps, and the noise itself against the generator it must come from.
"""
import math

import pytest
import torch
from conftest import requires_triton

import vrpo_fast.ops.vib as vib_mod
from vrpo_fast.ops import vib_sample_kl, vib_sample_kl_reference
from vrpo_fast.ops._random import keyed_normal

CLAMP = (-20.0, 10.0)
L = 24  # not a power of two: the kernels' column masking is exercised
SEED = 1234

CASES = [
    pytest.param("torch", torch.float32, id="torch-fp32"),
    pytest.param("torch", torch.bfloat16, id="torch-bf16"),
    pytest.param("torch", torch.float64, id="torch-fp64"),
    pytest.param("triton", torch.float32, id="triton-fp32", marks=requires_triton),
    pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=requires_triton),
]
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=requires_triton)]

# Ids with gaps, out of order, and beyond 2**32 / L (so the Triton Philox offset id * L + j needs
# its high 32-bit word).
IDS7 = torch.tensor([5, 2**33 + 3, 0, 17, 4, 2**40, 9], dtype=torch.int64)


def make_inputs(n_rows, dtype, seed=0, clamp_some=True):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n_rows, L, generator=g, dtype=torch.float64)
    logvar = 2.0 * torch.randn(n_rows, L, generator=g, dtype=torch.float64)
    if clamp_some:  # some elements outside the clamp range (zero logvar gradient there)
        logvar[0, :3] = -30.0
        logvar[-1, -2:] = 15.0
    gz = torch.randn(n_rows, L, generator=g, dtype=torch.float64)
    gkl = torch.randn(n_rows, generator=g, dtype=torch.float64)
    return mu.to(dtype), logvar.to(dtype), gz.to(dtype), gkl


def run(mu, logvar, gz, gkl, ids, backend, seed=SEED, training=True):
    """(z, kl, dmu, dlogvar) for upstream gradients gz (on z) and gkl (on kl)."""
    mu = mu.detach().clone().requires_grad_()
    logvar = logvar.detach().clone().requires_grad_()
    z, kl = vib_sample_kl(mu, logvar, seed=seed, training=training, backend=backend, row_ids=ids)
    loss = (kl.double() * gkl).sum()
    if training:
        loss = loss + (z.double() * gz.double()).sum()
    loss.backward()
    return z.detach(), kl.detach(), mu.grad, logvar.grad


def recover_eps(ids, backend, dtype, seed=SEED):
    """eps of each id (in the compute precision of ``dtype``: fp64 for fp64, else fp32)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = torch.zeros(*ids.shape, L, dtype=cdt)
    eps, _ = vib_sample_kl(zeros, zeros, seed=seed, backend=backend, row_ids=ids)
    return eps.double()


def assert_equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# (a) permutation and (b) batching invariance, bitwise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", CASES)
def test_permuting_rows_with_their_ids_permutes_everything(backend, dtype):
    mu, logvar, gz, gkl = make_inputs(7, dtype)
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    z, kl, dmu, dlv = run(mu, logvar, gz, gkl, IDS7, backend)
    zp, klp, dmup, dlvp = run(mu[perm], logvar[perm], gz[perm], gkl[perm], IDS7[perm], backend)
    for full, permuted in ((z, zp), (kl, klp), (dmu, dmup), (dlv, dlvp)):
        assert_equal(permuted, full[perm])
    # Not vacuous: permuting the rows but keeping the ids in place changes z.
    z_fixed_ids, _, _, _ = run(mu[perm], logvar[perm], gz[perm], gkl[perm], IDS7, backend)
    assert not torch.equal(z_fixed_ids, z[perm])


@pytest.mark.parametrize("backend,dtype", CASES)
def test_split_batches_match_the_whole_batch(backend, dtype):
    mu, logvar, gz, gkl = make_inputs(7, dtype)
    whole = run(mu, logvar, gz, gkl, IDS7, backend)
    first = run(mu[:3], logvar[:3], gz[:3], gkl[:3], IDS7[:3], backend)
    second = run(mu[3:], logvar[3:], gz[3:], gkl[3:], IDS7[3:], backend)
    for w, a, b in zip(whole, first, second):
        assert_equal(torch.cat([a, b]), w)
    # Without ids the second shard draws the noise of rows 0..3, not 3..7.
    z_no_ids, _ = vib_sample_kl(mu[3:], logvar[3:], seed=SEED, backend=backend)
    z_whole_no_ids, _ = vib_sample_kl(mu, logvar, seed=SEED, backend=backend)
    assert not torch.equal(z_no_ids, z_whole_no_ids[3:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_int32_ids(backend):
    """[B, T, L] inputs with [B, T] ids: one row of a batch equals the same row computed alone,
    and int32 ids key the same noise as int64 ids with the same values."""
    mu, logvar, gz, gkl = make_inputs(12, torch.float32)
    mu, logvar, gz, gkl = (t.view(3, 4, *t.shape[1:]) for t in (mu, logvar, gz, gkl))
    ids = torch.arange(12, dtype=torch.int64).view(3, 4) * 1000 + 7
    whole = run(mu, logvar, gz, gkl, ids, backend)
    alone = run(mu[1:2], logvar[1:2], gz[1:2], gkl[1:2], ids[1:2].to(torch.int32), backend)
    for w, a in zip(whole, alone):
        assert_equal(a, w[1:2])


def test_torch_path_independent_of_blocks_and_threads(monkeypatch):
    mu, logvar, gz, gkl = make_inputs(7, torch.float32)
    ref = run(mu, logvar, gz, gkl, IDS7, "torch")
    monkeypatch.setattr(vib_mod, "_CPU_BLOCK_ELEMS", 2 * L)  # 2 rows per block, 4 blocks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        blocked = run(mu, logvar, gz, gkl, IDS7, "torch")
    finally:
        torch.set_num_threads(threads)
    for r, b in zip(ref, blocked):
        assert_equal(b, r)


# ----------------------------------------------------------------------------------------------
# (c) values and gradients vs. float64 with the recovered eps; the noise is the documented stream
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", CASES)
def test_values_and_grads_match_float64_reference(backend, dtype):
    mu, logvar, gz, gkl = make_inputs(7, dtype)
    assert (logvar.double() < CLAMP[0]).any() and (logvar.double() > CLAMP[1]).any()
    z, kl, dmu, dlv = run(mu, logvar, gz, gkl, IDS7, backend)
    eps = recover_eps(IDS7, backend, dtype)

    mu64 = mu.double().requires_grad_()
    lv64 = logvar.double().requires_grad_()
    z_ref, _ = vib_sample_kl_reference(mu64, lv64, eps, logvar_clamp=CLAMP)
    lv_c = lv64.clamp(*CLAMP)  # the reference twin sums its KL in fp32: write it out in float64
    kl_ref = 0.5 * (mu64 * mu64 + lv_c.exp() - lv_c - 1.0).sum(-1)
    ((z_ref * gz.double()).sum() + (kl_ref * gkl).sum()).backward()

    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert z.dtype == dtype and dmu.dtype == dtype and dlv.dtype == dtype
    torch.testing.assert_close(z.double(), z_ref.detach(), **tol)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), **tol)
    torch.testing.assert_close(dmu.double(), mu64.grad, **tol)
    torch.testing.assert_close(dlv.double(), lv64.grad, **tol)
    assert (dlv[0, :3] == 0).all() and (dlv[-1, -2:] == 0).all()  # clamped elements
    assert (dlv[1] != 0).all()


def test_torch_noise_is_keyed_normal_of_seed_id_column():
    ids = IDS7.view(7, 1)
    cols = torch.arange(L).view(1, L)
    eps32 = recover_eps(IDS7, "torch", torch.float32)
    assert_equal(eps32, keyed_normal(SEED, ids, cols, dtype=torch.float32).double())
    eps64 = recover_eps(IDS7, "torch", torch.float64)
    assert_equal(eps64, keyed_normal(SEED, ids, cols, dtype=torch.float64))


@requires_triton
def test_triton_noise_is_philox_at_id_times_latent_plus_column():
    """The row with id r draws what row r of a plain (id-less) call draws: Philox offset r * L + j.
    In particular row_ids = arange(rows) reproduces the id-less stream."""
    n = 6
    zeros = torch.zeros(n, L)
    eps_plain, _ = vib_sample_kl(zeros, zeros, seed=SEED, backend="triton")
    eps_arange, _ = vib_sample_kl(zeros, zeros, seed=SEED, backend="triton", row_ids=torch.arange(n))
    assert_equal(eps_arange, eps_plain)
    ids = torch.tensor([4, 1])
    eps_ids, _ = vib_sample_kl(zeros[:2], zeros[:2], seed=SEED, backend="triton", row_ids=ids)
    assert_equal(eps_ids, eps_plain[ids])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_changes_the_noise(backend):
    a = recover_eps(IDS7, backend, torch.float32, seed=1)
    b = recover_eps(IDS7, backend, torch.float32, seed=2)
    assert (a != b).float().mean() > 0.99


# ----------------------------------------------------------------------------------------------
# (d) noise statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,n_rows", [
    pytest.param("torch", 4096, id="torch"),
    pytest.param("triton", 512, id="triton", marks=requires_triton),
])
def test_keyed_eps_is_standard_normal(backend, n_rows):
    n_cols = 16
    # Spread-out, shuffled ids, as a data-parallel run would give (global row * T + position).
    ids = torch.randperm(n_rows) * 37 + 11
    zeros = torch.zeros(n_rows, n_cols)
    eps, _ = vib_sample_kl(zeros, zeros, seed=SEED, backend=backend, row_ids=ids)
    eps = eps.double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 4.0 / math.sqrt(n)
    assert abs(eps.std().item() - 1.0) < 4.0 * math.sqrt(0.5 / n)
    assert abs((eps**3).mean().item()) < 4.0 * math.sqrt(15.0 / n)
    assert abs((eps**4).mean().item() - 3.0) < 4.0 * math.sqrt(96.0 / n)
    assert abs((eps.abs() < 1.0).double().mean().item() - 0.6827) < 0.02
    assert torch.unique(eps, dim=0).shape[0] == n_rows  # rows with different ids differ
    # Columns are independent: no correlation between neighbouring columns of a row.
    r = torch.corrcoef(torch.stack([eps[:, :-1].reshape(-1), eps[:, 1:].reshape(-1)]))[0, 1]
    assert abs(r.item()) < 4.0 / math.sqrt(n)
    # Consecutive ids are not correlated either.
    order = torch.argsort(ids)
    r_ids = torch.corrcoef(torch.stack([eps[order[:-1]].reshape(-1), eps[order[1:]].reshape(-1)]))[0, 1]
    assert abs(r_ids.item()) < 4.0 / math.sqrt(n)


# ----------------------------------------------------------------------------------------------
# (e) bad row_ids, (f) eval mode, memory
# ----------------------------------------------------------------------------------------------


def test_bad_row_ids_are_rejected():
    mu = torch.zeros(2, 3, L)
    good = torch.zeros(2, 3, dtype=torch.int64)
    vib_sample_kl(mu, mu, seed=0, row_ids=good)  # fine
    with pytest.raises(ValueError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(2, 3, L, dtype=torch.int64))
    with pytest.raises(TypeError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(2, 3, dtype=torch.int16))
    with pytest.raises(TypeError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=[[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="row_ids"):
        vib_sample_kl(mu, mu, seed=0, row_ids=torch.zeros(2, 3, dtype=torch.int64, device="meta"))
    negative = good.clone()
    negative[1, 2] = -1
    with pytest.raises(ValueError, match="row_ids must be non-negative"):
        vib_sample_kl(mu, mu, seed=0, row_ids=negative)
    with pytest.raises(ValueError, match="row_ids must be non-negative"):
        vib_sample_kl(mu, mu, seed=0, row_ids=negative.to(torch.int32), backend="torch")
    too_big = good.clone()
    too_big[0, 0] = (2**63 - L) // L + 1  # id * L + j would overflow int64
    with pytest.raises(ValueError, match="row_ids must be at most"):
        vib_sample_kl(mu, mu, seed=0, row_ids=too_big)
    too_big[0, 0] -= 1
    z, _ = vib_sample_kl(mu, mu, seed=0, row_ids=too_big)  # the largest valid id
    assert torch.isfinite(z).all()
    # Empty batch: nothing to check or draw.
    z0, kl0 = vib_sample_kl(torch.zeros(0, L), torch.zeros(0, L), seed=0, row_ids=torch.zeros(0, dtype=torch.int64))
    assert z0.shape == (0, L) and kl0.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_ignores_row_ids(backend):
    mu, logvar, gz, gkl = make_inputs(7, torch.float32)
    mu_a = mu.clone().requires_grad_()
    z, kl = vib_sample_kl(mu_a, logvar, training=False, backend=backend, row_ids=IDS7)
    assert z is mu_a
    _, kl_plain = vib_sample_kl(mu, logvar, training=False, backend=backend)
    assert_equal(kl, kl_plain)
    with_ids = run(mu, logvar, gz, gkl, IDS7, backend, training=False)
    without = run(mu, logvar, gz, gkl, None, backend, training=False)
    for a, b in zip(with_ids[1:], without[1:]):
        assert_equal(a, b)
    # Ids are not used in eval, so their range is not checked there (shape/dtype still are).
    vib_sample_kl(mu, logvar, training=False, backend=backend, row_ids=-IDS7)
    with pytest.raises(ValueError, match="row_ids"):
        vib_sample_kl(mu, logvar, training=False, backend=backend, row_ids=IDS7[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_only_mu_logvar_and_ids(backend):
    mu, logvar, _, _ = make_inputs(7, torch.float32)
    mu.requires_grad_()
    logvar.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vib_sample_kl(mu, logvar, seed=1, backend=backend, row_ids=IDS7)
    # mu, logvar (the inputs themselves), the 0-d int64 seed, the ids.
    assert len(saved) == 4 and [t.data_ptr() for t in saved[:2]] == [mu.data_ptr(), logvar.data_ptr()]
    assert saved[2].dim() == 0 and int(saved[2]) == 1
    assert saved[3].dtype == torch.int64 and torch.equal(saved[3], IDS7)


# ----------------------------------------------------------------------------------------------
# heads and the value model: pass-through
# ----------------------------------------------------------------------------------------------


def test_vib_head_passes_row_ids_and_scalar_head_ignores_them():
    from vrpo_fast.models.vib_head import ScalarValueHead, VIBValueHead

    torch.manual_seed(0)
    head = VIBValueHead(8, latent_dim=L)
    hidden = torch.randn(2, 5, 8)
    ids = torch.arange(10).view(2, 5) + 100
    whole = head(hidden, seed=3, row_ids=ids)
    part = head(hidden[1:], seed=3, row_ids=ids[1:])
    # The noise is keyed by id, so it is the same; mu and logvar come from the encoder's matmul,
    # which BLAS may round differently for another batch size (seen on AVX-512 CPUs: 1.5e-8), so
    # z and KL agree to fp32 rounding, far below the noise's own scale (checked next).
    torch.testing.assert_close(part.z, whole.z[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.kl_per_token, whole.kl_per_token[1:], rtol=1e-5, atol=1e-6)
    unkeyed = head(hidden[1:], seed=3)
    assert (unkeyed.z - whole.z[1:]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="row_ids"):
        head(hidden, seed=3, row_ids=ids[:, :4])

    scalar = ScalarValueHead(8)
    assert_equal(scalar(hidden, seed=3, row_ids=ids).values, scalar(hidden).values)


def test_value_model_noise_ids_make_values_batching_invariant():
    transformers = pytest.importorskip("transformers")
    from vrpo_fast.models.value_model import ValueModel

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = ValueModel(transformers.LlamaForCausalLM(config), latent_dim=8, aux_hidden=0)
    with torch.no_grad():  # move the heads off their zero-init output layers
        g = torch.Generator().manual_seed(11)
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.train()
    B, T = 3, 6
    input_ids = torch.randint(1, 50, (B, T), generator=torch.Generator().manual_seed(1))
    noise_ids = torch.arange(B * T).view(B, T) + 1000  # global (row, position) ids

    together = model(input_ids, seed=5, noise_ids=noise_ids)
    alone = model(input_ids[2:], seed=5, noise_ids=noise_ids[2:])
    # Same noise; the backbone's matmuls may round differently for another batch size, so the
    # tolerance is at fp32 rounding level, far below the noise's effect (checked next).
    torch.testing.assert_close(alone.values, together.values[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.ent_pred, together.ent_pred[2:], rtol=1e-5, atol=1e-5)
    unkeyed = model(input_ids[2:], seed=5)
    assert (unkeyed.values - together.values[2:]).abs().max() > 1e-2

    with pytest.raises(ValueError, match="noise_ids"):
        model(input_ids, seed=5, noise_ids=noise_ids[:, :-1])
    with pytest.raises(TypeError, match="noise_ids"):
        model(input_ids, seed=5, noise_ids=noise_ids.float())
