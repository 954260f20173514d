"""The public ops are PyTorch custom ops: ``torch.compile(fullgraph=True)`` traces a function that
calls them (no graph break), compiled values and gradients equal eager ones, data checks still raise
inside compiled code, and meta tensors go through the fake kernels.

``backend="eager"`` checks the tracing (Dynamo + the fake kernels + the autograd formula) quickly;
the default inductor backend (which compiles C++ on this CPU) is run once per differentiable op.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo

from vrpo_fast.ops import gae, keyed_sample, linear_logprobs_entropy, token_logprobs_entropy, vib_sample_kl

COMPILERS = ["eager", "aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=backend)


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


def _assert_same(got, want, **tol):
    tol = tol or dict(rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# ------------------------------------------------------------------------------------------------
# differentiable ops: values and gradients, compiled == eager (== float64 reference, in their tests)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", COMPILERS)
def test_token_logprobs_entropy_compiles(backend):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 6, 37, generator=gen)).requires_grad_()
    labels = torch.randint(0, 37, (2, 5), generator=gen)
    labels[0, 1] = -100
    weights = torch.randn(2, 5, generator=gen)

    def loss(x, y):
        # The causal shift view (leading strides, no copy), temperature, an fp64 output.
        lp, h = token_logprobs_entropy(x[:, :-1], y, temperature=0.7, out_dtype=torch.float64)
        return (weights * lp).sum() + 0.3 * h.sum()

    out = _compiled(loss, backend)(logits, labels)
    ref = loss(logits, labels)
    assert out.dtype == torch.float64
    _assert_same([out, *_grads(out, [logits])], [ref, *_grads(ref, [logits])])


@pytest.mark.parametrize("backend", COMPILERS)
def test_linear_logprobs_entropy_compiles(backend):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 16, generator=gen).requires_grad_()
    weight = (0.3 * torch.randn(45, 16, generator=gen)).requires_grad_()
    bias = torch.randn(45, generator=gen).requires_grad_()
    labels = torch.randint(0, 45, (2, 7), generator=gen)
    labels[1, 5:] = -100

    def loss(h, w, b, y):
        # Vocabulary slices and token chunks: the tiled merge runs inside the op.
        lp, ent = linear_logprobs_entropy(h, w, y, b, temperature=0.9, chunk_tokens=5, chunk_vocab=16)
        return lp.sum() + 0.5 * ent.sum()

    inputs = [hidden, weight, bias]
    out = _compiled(loss, backend)(hidden, weight, bias, labels)
    ref = loss(hidden, weight, bias, labels)
    _assert_same([out, *_grads(out, inputs)], [ref, *_grads(ref, inputs)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", COMPILERS)
def test_vib_sample_kl_compiles(backend):
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(3, 4, 8, generator=gen).requires_grad_()
    logvar = torch.randn(3, 4, 8, generator=gen).requires_grad_()
    ids = torch.arange(12).view(3, 4) * 5

    def loss(m, lv, seed):
        z, kl = vib_sample_kl(m, lv, seed=seed, row_ids=ids)
        return (z * z).sum() + kl.sum()

    compiled = _compiled(loss, backend)
    for seed in (3, 4, 5):  # a new seed is a new value, not a new graph (at most one recompile)
        out = compiled(mu, logvar, seed)
        ref = loss(mu, logvar, seed)
        _assert_same([out, *_grads(out, [mu, logvar])], [ref, *_grads(ref, [mu, logvar])])


def test_vib_seed_none_and_eval_trace():
    mu, logvar = torch.randn(5, 8), torch.randn(5, 8)

    def draw(m, lv):
        z, kl = vib_sample_kl(m, lv)  # the seed is drawn inside the graph
        z_eval, kl_eval = vib_sample_kl(m, lv, training=False)
        return z, kl, z_eval, kl_eval

    z, kl, z_eval, kl_eval = _compiled(draw, "eager")(mu, logvar)
    _, kl_ref = vib_sample_kl(mu, logvar, seed=0)
    torch.testing.assert_close(kl, kl_ref)  # the KL does not depend on the noise
    assert not torch.equal(z, mu)
    assert torch.equal(z_eval, mu) and torch.equal(kl_eval, kl_ref)


def test_seeds_and_positions_do_not_recompile_every_call():
    counts = {"frames": 0}

    def counting_backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    logits, keys = torch.randn(4, 50), torch.arange(4)
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)

    def step(x, m, lv, seed, position):
        return keyed_sample(x, keys, seed=seed, position=position, temperature=0.7), vib_sample_kl(m, lv, seed=seed)

    compiled = torch.compile(step, fullgraph=True, backend=counting_backend)
    for n in range(6):
        tokens, (z, kl) = compiled(logits, mu, logvar, 10 + n, n)
        assert torch.equal(tokens, keyed_sample(logits, keys, seed=10 + n, position=n, temperature=0.7))
        assert torch.equal(z, vib_sample_kl(mu, logvar, seed=10 + n)[0])
    assert counts["frames"] <= 2  # the first graph plus, at most, the one with symbolic ints


def test_dynamic_shapes_one_graph_for_every_op():
    """dynamic=True: the fake kernels take symbolic shapes; new shapes reuse the graph."""
    def step(x, y, h, w, mu):
        lp, ent = token_logprobs_entropy(x, y, temperature=1.3)
        lp2, ent2 = linear_logprobs_entropy(h, w, y)
        z, kl = vib_sample_kl(mu, mu * 0.5, seed=1)
        adv, _ = gae(lp.detach(), ent.detach(), torch.ones_like(lp), lam=0.9)
        tokens = keyed_sample(x.detach().flatten(0, 1), torch.arange(y.numel()), seed=1, position=2)
        return lp.sum() + ent2.sum() + lp2.sum() + z.sum() + kl.sum() + adv.sum() + tokens.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(4)
    for B, T, V in ((2, 5, 33), (3, 7, 40), (1, 1, 7)):
        x = torch.randn(B, T, V, generator=gen).requires_grad_()
        h = torch.randn(B, T, 8, generator=gen).requires_grad_()
        w = torch.randn(V, 8, generator=gen).requires_grad_()
        mu = torch.randn(B, T, 4, generator=gen).requires_grad_()
        y = torch.randint(0, V, (B, T), generator=gen)
        inputs = [x, h, w, mu]
        out, ref = compiled(x, y, h, w, mu), step(x, y, h, w, mu)
        _assert_same([out, *_grads(out, inputs)], [ref, *_grads(ref, inputs)], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# non-differentiable ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_gae_and_keyed_sample_compile(backend):
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:4] = False
    logits, keys = torch.randn(3, 40, generator=gen), torch.tensor([7, 1, 2**40])

    def step(r, v, m, x):
        adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, whiten=True)
        return adv * m, ret, keyed_sample(x, keys, seed=1, position=4)

    got = _compiled(step, backend)(rewards, values, mask, logits)
    want = step(rewards, values, mask, logits)
    assert torch.equal(got[2], want[2])
    _assert_same(got[:2], want[:2])


# ------------------------------------------------------------------------------------------------
# data checks run inside the ops: same ValueError from compiled code
# ------------------------------------------------------------------------------------------------
def test_data_checks_still_raise_when_compiled():
    logits = torch.randn(2, 3, 11)
    bad_labels = torch.tensor([[1, 2, 11], [0, -100, 3]])
    fn = _compiled(lambda x, y: token_logprobs_entropy(x, y)[0], "eager")
    assert fn(logits, bad_labels.clamp(max=10)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*got 11"):
        fn(logits, bad_labels)

    hidden, weight = torch.randn(2, 3, 4), torch.randn(11, 4)
    lin = _compiled(lambda h, w, y: linear_logprobs_entropy(h, w, y)[0], "eager")
    with pytest.raises(ValueError, match="labels"):
        lin(hidden, weight, bad_labels)

    rewards = torch.randn(2, 5)
    g = _compiled(lambda r, m: gae(r, r, m)[0], "eager")
    with pytest.raises(ValueError, match="mask"):
        g(rewards, torch.full((2, 5), 2.0))
    with pytest.raises(ValueError, match="rewards"):
        g(rewards.masked_fill(rewards > 0, math.nan), torch.ones(2, 5))

    mu = torch.randn(2, 3)
    v = _compiled(lambda m, ids: vib_sample_kl(m, m, seed=1, row_ids=ids)[1], "eager")
    with pytest.raises(ValueError, match="row_ids"):
        v(mu, torch.tensor([0, -4]))

    all_minus_inf = torch.randn(3, 20)
    all_minus_inf[1] = -math.inf
    s = _compiled(lambda x: keyed_sample(x, torch.arange(3), seed=0, position=0), "eager")
    with pytest.raises(ValueError, match="row 1 is all -inf"):
        s(all_minus_inf)


# ------------------------------------------------------------------------------------------------
# meta tensors: the fake kernels give shapes and dtypes (forward and backward), no data is read
# ------------------------------------------------------------------------------------------------
def test_meta_tensors_use_the_fake_kernels():
    meta = dict(device="meta")
    logits = torch.empty(2, 5, 33, **meta, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(2, 5, dtype=torch.int16, **meta)
    lp, h = token_logprobs_entropy(logits, labels, out_dtype=None)
    assert lp.shape == h.shape == (2, 5) and lp.dtype == torch.bfloat16 and lp.is_meta
    (lp.float().sum() + h.float().sum()).backward()
    assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.bfloat16

    hidden = torch.empty(2, 5, 16, **meta, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(40, 16, **meta, requires_grad=True)  # fp32: promoted
    lp, h = linear_logprobs_entropy(hidden, weight, labels)
    assert lp.shape == (2, 5) and lp.dtype == torch.float32 and lp.is_meta
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.shape == (40, 16) and weight.grad.dtype == torch.float32

    mu = torch.empty(3, 4, 8, **meta, requires_grad=True)
    z, kl = vib_sample_kl(mu, mu * 1, seed=1, row_ids=torch.zeros(3, 4, dtype=torch.long, **meta))
    assert z.shape == mu.shape and kl.shape == (3, 4) and kl.dtype == torch.float32 and z.is_meta
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == mu.shape

    adv, ret = gae(torch.empty(3, 7, **meta, dtype=torch.float64), torch.empty(3, 7, **meta, dtype=torch.float64),
                   torch.empty(3, 7, **meta, dtype=torch.bool), whiten=True)
    assert adv.shape == ret.shape == (3, 7) and adv.dtype == torch.float64 and adv.is_meta
    tokens = keyed_sample(torch.empty(4, 50, **meta), torch.empty(4, dtype=torch.long, **meta), seed=1, position=2)
    assert tokens.shape == (4,) and tokens.dtype == torch.int64 and tokens.is_meta
