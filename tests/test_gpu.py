"""GPU checks: every public op of ``vrpo_fast.ops`` with the COMPILED Triton kernels, on CUDA tensors,
against float64 / plain-PyTorch references; the models in bf16 autocast; keyed sampling CUDA == CPU.

Ops: token_logprobs_entropy, linear_logprobs_entropy, gae, vib_sample_kl, keyed_sample (skipped where
the tree has none), plus TokenScorer / ValueModel on the tiny model and the keyed sampler of
``generate``. Each test is meant to take well under 10 s on an H100 (first-call Triton compiles
included).

Skipped unless a CUDA device is present AND ``TRITON_INTERPRET=0`` is exported (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` by default, which would run the kernels in the interpreter instead):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py      # or: bash benchmarks/gpu_suite.sh

Developer hook (no GPU): ``VRPO_GPU_TESTS_ON_CPU=1 python -m pytest tests/test_gpu.py`` runs the same
checks on CPU tensors with ``backend="triton"`` under the interpreter at tiny shapes, to check the
tests themselves; the CUDA-vs-CPU comparisons then compare the CPU with itself.

Inputs are drawn on the CPU from seeded generators and moved to the device, so they do not depend on
the device's random number generator.
"""
import math
import os

import pytest
import torch

from vrpo_fast.ops import (
    gae,
    gae_reference,
    linear_logprobs_entropy,
    token_logprobs_entropy,
    token_logprobs_entropy_reference,
    vib_sample_kl,
)
from vrpo_fast.ops._common import resolve_backend, triton_available, triton_interpret

ON_CPU = os.environ.get("VRPO_GPU_TESTS_ON_CPU") == "1"


def _skip_reason():
    if not triton_available():
        return "triton is not installed"
    if ON_CPU:
        if not triton_interpret():
            return "VRPO_GPU_TESTS_ON_CPU=1 needs TRITON_INTERPRET=1 (the Triton interpreter)"
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False): these tests check the compiled Triton "
                "kernels on a GPU; run `bash benchmarks/gpu_suite.sh` there (it exports TRITON_INTERPRET=0)")
    if os.environ.get("TRITON_INTERPRET") != "0":
        return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} (tests/conftest.py defaults it to 1, the "
                "interpreter): export TRITON_INTERPRET=0 to test the compiled kernels")
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DEV = torch.device("cpu" if ON_CPU else "cuda")
# "auto" is what users call: on CUDA tensors it must pick the Triton kernels (checked below). On the
# CPU hook, "triton" forces the kernels (interpreter).
BACKEND = "triton" if ON_CPU else "auto"


def pick(gpu, cpu):
    """A GPU-sized parameter, or its tiny version on the CPU hook (the interpreter is slow)."""
    return cpu if ON_CPU else gpu


def cpu_gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=cpu_gen(seed), dtype=torch.float64) * scale).to(dtype=dtype, device=DEV)


def close(actual, expected, rel, name):
    """max |actual - expected| <= rel * max |expected| (+ tiny floor)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = float(expected.abs().max()) + 1e-6
    err = float((actual.detach().double() - expected.detach().double()).abs().max())
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"


def test_auto_backend_is_triton_on_cuda():
    x = torch.zeros(2, 3, device=DEV)
    assert resolve_backend(BACKEND, x) == "triton"


# ----------------------------------------------------------------------------------------------
# token_logprobs_entropy
# ----------------------------------------------------------------------------------------------
def token_reference64(logits, labels, grad_lp, grad_h, temperature, ignore_index=-100):
    """float64 values and closed-form gradient of sum(g_lp * lp + g_h * H) w.r.t. the logits.

    With p = softmax(x / T): d lp / dx = (onehot - p) / T, d H / dx = -p (log p + H) / T; exact where
    p underflows to 0 (no 0 * inf), ignored tokens give 0 everywhere.
    """
    x = logits.detach().double() / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    ent = -plogp.sum(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    onehot = torch.zeros_like(p).scatter_(-1, safe.unsqueeze(-1), 1.0)
    g_lp = grad_lp.double().unsqueeze(-1)
    g_h = grad_h.double().unsqueeze(-1)
    grad = (g_lp * (onehot - p) - g_h * (plogp + p * ent.unsqueeze(-1))) / temperature
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return (torch.where(valid, lp, zero), torch.where(valid, ent, zero),
            torch.where(valid.unsqueeze(-1), grad, zero))


def grad_close(grad, ref, dtype):
    """Element-wise, and as ||grad - ref|| / ||ref||.

    A logit's gradient error scales with its probability (log p = x - lse carries ~ulp(lse) of
    rounding), not with the gradient, which can be small by cancellation: element-wise, an absolute
    floor of 1e-6 (fp32) is what an fp32 computation can promise. The norm-wise bound still catches a
    systematic error on the ~V small entries of every row (they carry ~1e-3 of the norm at V = 151936).
    """
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-6)
        norm_rel = 1e-5
    else:  # rounded to bf16 (8 bits): 2^-9 relative per element
        torch.testing.assert_close(grad.double(), ref, rtol=1.6e-2, atol=1e-5)
        norm_rel = 1e-2
    err = float(torch.linalg.vector_norm(grad.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    assert err < norm_rel, f"||grad - ref|| / ||ref|| = {err:.3g} >= {norm_rel}"


def make_labels(shape, V, seed, n_ignored=3):
    g = cpu_gen(seed)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    flat[-1] = V - 1  # the last vocabulary column (inside a partial last block for most V)
    return labels.to(DEV)


def run_token_op(logits, labels, seed, **kw):
    """The op on a fresh leaf copy of ``logits``: (lp, ent, d loss / d logits, g_lp, g_h)."""
    x = logits.detach().clone().requires_grad_()
    before = logits.detach().clone()
    lp, ent = token_logprobs_entropy(x, labels, backend=BACKEND, **kw)
    g_lp = randn(*labels.shape, seed=seed + 1)
    g_h = randn(*labels.shape, seed=seed + 2)
    loss = (lp * g_lp).sum() + ((ent * g_h).sum() if ent is not None else 0.0)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(x.detach(), before), "the op modified its input logits"
    return lp, ent, grad, g_lp, g_h


# V = 151936 (Qwen2): 18.5 blocks of 8192; 50257 (GPT-2): 6.1 blocks; 1000: one partial block.
@pytest.mark.parametrize("V", [151936, 50257, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_values_and_grads(V, dtype, temperature):
    B, T = pick((4, 16), (1, 3))
    logits = randn(B, T, V, seed=V + 7, scale=3.0, dtype=dtype)
    labels = make_labels((B, T), V, seed=V)
    lp, ent, grad, g_lp, g_h = run_token_op(logits, labels, seed=11, temperature=temperature)
    lp_ref, ent_ref, grad_ref = token_reference64(logits, labels, g_lp, g_h, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape and lp.device == logits.device
    # Outputs are fp32 from the (already rounded) inputs: fp32-level agreement even for bf16 logits.
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)
    assert grad.dtype == dtype and grad.shape == logits.shape
    grad_close(grad, grad_ref, dtype)


def test_token_stats_without_entropy_and_without_grad():
    V = pick(151936, 1000)
    logits = randn(pick(64, 3), V, seed=3, scale=2.0)
    labels = make_labels((logits.shape[0],), V, seed=4)
    lp, ent, grad, g_lp, g_h = run_token_op(logits, labels, seed=5, compute_entropy=False, temperature=1.3)
    assert ent is None
    lp_ref, _, grad_ref = token_reference64(logits, labels, g_lp, torch.zeros_like(g_h), 1.3)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    grad_close(grad, grad_ref, torch.float32)
    with torch.no_grad():  # forward-only path, int32 labels
        lp2, ent2 = token_logprobs_entropy(logits.requires_grad_(), labels.int(), backend=BACKEND)
    assert not lp2.requires_grad
    lp_ref, ent_ref, _ = token_reference64(logits, labels, g_lp, g_h, 1.0)
    torch.testing.assert_close(lp2.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent2.double(), ent_ref, rtol=1e-5, atol=1e-4)


def test_token_stats_ignored_rows_are_exact_zeros():
    V = pick(50257, 300)
    logits = randn(3, pick(8, 2), V, seed=21, scale=2.0)
    labels = make_labels(logits.shape[:-1], V, seed=22, n_ignored=4)
    labels[1] = -100  # a fully ignored sequence
    lp, ent, grad, g_lp, g_h = run_token_op(logits, labels, seed=23, temperature=0.9)
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert (grad[~ignored].abs().sum(-1) > 0).all()
    lp_ref, ent_ref, grad_ref = token_reference64(logits, labels, g_lp, g_h, 0.9)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)
    grad_close(grad, grad_ref, torch.float32)
    # A custom ignore_index that is also a valid vocabulary id.
    labels = make_labels(logits.shape[:-1], V, seed=24, n_ignored=0)
    labels[0, :2] = 5
    lp, ent, grad, g_lp, g_h = run_token_op(logits, labels, seed=25, ignore_index=5)
    assert (lp[labels == 5] == 0).all() and (grad[labels == 5] == 0).all()
    lp_ref, ent_ref, grad_ref = token_reference64(logits, labels, g_lp, g_h, 1.0, ignore_index=5)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    grad_close(grad, grad_ref, torch.float32)


@pytest.mark.parametrize("V", [300, 10000])
def test_token_stats_extreme_logits(V):
    """Huge / tied / -inf logits; with V = 10000 (two blocks of 8192) the row maximum of some rows
    lies in the second block, so the running max and sum must be rescaled."""
    logits = randn(8, V, seed=31)
    logits[0, :10] = 1e4  # ten tied maxima: entropy log(10)
    logits[1] = -1e4
    logits[1, 7] = 1e4  # one-hot: entropy ~ 0, label logprob ~ -2e4 / T
    logits[2, 50:120] = -float("inf")  # masked vocabulary, off the label
    logits[3, ::2] = -float("inf")
    logits[4] *= 1e3
    logits[6, V - 3] = 60.0  # maximum in the last (partial) block
    logits[7, : V // 2] -= 40.0  # first half far below the second
    labels = torch.tensor([3, 8, 10, 1, 17, -100, V - 3, 0], device=DEV)
    lp, ent, grad, g_lp, g_h = run_token_op(logits, labels, seed=33, temperature=0.7)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    lp_ref, ent_ref, grad_ref = token_reference64(logits, labels, g_lp, g_h, 0.7)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)
    # Rows 0, 1, 4 hold logits ~1e4 / T: in fp32 their log p = x - lse carries ~ulp(1.4e4) ~ 1e-3 of
    # rounding (inherent to fp32 inputs of that size), scaled by p * |g_h| / T in the gradient.
    huge, moderate = [0, 1, 4], [2, 3, 5, 6, 7]
    torch.testing.assert_close(grad[huge].double(), grad_ref[huge], rtol=1e-4, atol=1e-3)
    grad_close(grad[moderate], grad_ref[moderate], torch.float32)
    assert lp[1] < -1e4 and ent[1].abs() < 1e-6
    torch.testing.assert_close(ent[0].double().cpu(), torch.tensor(10.0, dtype=torch.float64).log(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_stats_inplace_backward_on_shifted_view(dtype):
    """logits[:, :-1] of an intermediate (the causal shift: not flattenable to [N, V]); the in-place
    backward writes the gradient over that buffer and equals the out-of-place one bitwise."""
    V = pick(32003, 150)
    B, T = pick((4, 33), (2, 4))
    full = randn(B, T, V, seed=41, scale=3.0, dtype=dtype)
    labels = make_labels((B, T - 1), V, seed=42)
    g_lp, g_h = randn(B, T - 1, seed=43), randn(B, T - 1, seed=44)

    def grads(inplace):
        leaf = full.clone().requires_grad_()
        logits = leaf * 1.0  # an op's output, whose buffer the in-place backward may overwrite
        view = logits[:, :-1]
        seen = {}
        view.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
        lp, ent = token_logprobs_entropy(view, labels, backend=BACKEND, temperature=0.7, inplace_backward=inplace)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        return leaf.grad, seen["ptr"] == view.data_ptr(), lp, ent

    g_copy, reused_copy, lp, ent = grads(False)
    g_inplace, reused_inplace, _, _ = grads(True)
    assert reused_inplace and not reused_copy
    torch.testing.assert_close(g_inplace, g_copy, rtol=0, atol=0)
    assert (g_copy[:, -1] == 0).all()
    lp_ref, ent_ref, grad_ref = token_reference64(full[:, :-1], labels, g_lp, g_h, 0.7)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)
    grad_close(g_copy[:, :-1], grad_ref, dtype)


def test_token_stats_reference_twin_on_device():
    """The public *_reference twin agrees with the float64 closed form on the device too."""
    V = pick(50257, 200)
    logits = randn(6, V, seed=51, scale=2.0)
    labels = make_labels((6,), V, seed=52)
    lp, ent = token_logprobs_entropy_reference(logits, labels, temperature=0.8)
    lp_ref, ent_ref, _ = token_reference64(logits, labels, torch.zeros(6, device=DEV), torch.zeros(6, device=DEV), 0.8)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# linear_logprobs_entropy
# ----------------------------------------------------------------------------------------------
def linear_inputs(N, H, V, dtype, seed, bias=False):
    hidden = randn(N, H, seed=seed, dtype=dtype)
    weight = randn(V, H, seed=seed + 1, scale=2.0 / math.sqrt(H), dtype=dtype)
    b = randn(V, seed=seed + 2, scale=0.5, dtype=dtype) if bias else None
    labels = make_labels((N,), V, seed=seed + 3, n_ignored=5)
    return hidden, weight, b, labels


def linear_grads(fn, hidden, weight, bias, labels, g_lp, g_h, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
    return lp.detach(), ent.detach(), [t.grad if t is not None else None for t in leaves]


def logits64(hidden, weight, bias):
    """The float64 logits of the (already rounded) inputs, materialised."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return logits


@pytest.mark.parametrize("chunks,bias", [((None, None), False), ((64, 40000), True)],
                         ids=["one-tile", "tiled-bias"])
def test_linear_stats_bf16_values_and_grads(chunks, bias):
    N, H, V = pick((256, 512, 151936), (8, 32, 1000))
    chunk_tokens, chunk_vocab = chunks if not ON_CPU else ((None, None) if chunks[0] is None else (3, 300))
    hidden, weight, b, labels = linear_inputs(N, H, V, torch.bfloat16, seed=61, bias=bias)
    g_lp, g_h = randn(N, seed=65), randn(N, seed=66)
    T = 0.8
    lp, ent, grads = linear_grads(linear_logprobs_entropy, hidden, weight, b, labels, g_lp, g_h, temperature=T,
                                  chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, backend=BACKEND)
    # Exact result: float64 logits of the bf16 inputs; gradients by the chain rule through them.
    lp_ref, ent_ref, dlogits = token_reference64(logits64(hidden, weight, b), labels, g_lp, g_h, T)
    refs = [dlogits @ weight.double(), dlogits.t() @ hidden.double(), dlogits.sum(0) if bias else None]
    close(lp, lp_ref, 0.03, "logprobs")
    close(ent, ent_ref, 0.03, "entropy")
    # The usual path materialises bf16 logits (lm_head in bf16) then an fp32 log_softmax: the fused
    # op must be no less accurate than that.
    mat_lp, mat_ent, mat_grads = linear_grads(
        lambda h, w, lab, bb: token_logprobs_entropy_reference(torch.nn.functional.linear(h, w, bb), lab,
                                                               temperature=T),
        hidden, weight, b, labels, g_lp, g_h)
    for name, g, mg, rg, src in zip(("hidden", "weight", "bias"), grads, mat_grads, refs, (hidden, weight, b)):
        if src is None:
            continue
        assert g.dtype == torch.bfloat16 and g.shape == src.shape, name
        close(g, rg, 0.05, f"grad {name}")
        err = float((g.double() - rg).abs().max())
        err_materialised = float((mg.double() - rg).abs().max())
        assert err <= 2.0 * err_materialised + 1e-3 * float(rg.abs().max()), (name, err, err_materialised)
    for got, mat, ref in ((lp, mat_lp, lp_ref), (ent, mat_ent, ent_ref)):
        err = float((got.double() - ref).abs().max())
        assert err <= 2.0 * float((mat.double() - ref).abs().max()) + 1e-3 * float(ref.abs().max())


def test_linear_stats_fp32_3d():
    B, T, H, V = pick((2, 64, 256, 50257), (2, 3, 24, 500))
    hidden = randn(B, T, H, seed=71)
    weight = randn(V, H, seed=72, scale=2.0 / math.sqrt(H))
    labels = make_labels((B, T), V, seed=73)
    g_lp, g_h = randn(B, T, seed=74), randn(B, T, seed=75)
    lp, ent, (gh, gw, _) = linear_grads(linear_logprobs_entropy, hidden, weight, None, labels, g_lp, g_h,
                                        temperature=1.2, backend=BACKEND)
    lp_ref, ent_ref, dlogits = token_reference64(logits64(hidden, weight, None), labels, g_lp, g_h, 1.2)
    # 2e-3: passes with IEEE fp32 GEMMs (~1e-6) and with TF32 ones (~3e-4) if the process enables them.
    close(lp, lp_ref, 2e-3, "logprobs")
    close(ent, ent_ref, 2e-3, "entropy")
    close(gh, torch.einsum("btv,vh->bth", dlogits, weight.double()), 5e-3, "grad hidden")
    close(gw, torch.einsum("btv,bth->vh", dlogits, hidden.double()), 5e-3, "grad weight")
    assert lp.shape == (B, T) and gh.shape == hidden.shape


# ----------------------------------------------------------------------------------------------
# gae
# ----------------------------------------------------------------------------------------------
def gae_masks(B, T, seed):
    """Rows cycling through: multi-turn with holes + right padding, left padding, all masked, full."""
    g = cpu_gen(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = b % 4
        if kind == 0:
            t, on = 0, True
            end = T - int(torch.randint(0, max(T // 3, 1), (1,), generator=g))
            while t < end:
                span = int(torch.randint(1, max(2, T // 20), (1,), generator=g))
                mask[b, t:min(t + span, end)] = on
                t, on = t + span, not on
        elif kind == 1:
            mask[b, int(torch.randint(0, T, (1,), generator=g)):] = True
        elif kind == 2:
            pass  # all masked
        else:
            mask[b] = True
    return mask.to(DEV)


def whiten64(adv, mask, shift_mean):
    """Batch whitening over unmasked tokens, unbiased variance, eps 1e-8 (as documented by gae)."""
    m = mask.double()
    n = m.sum()
    mean = (adv * m).sum() / n
    var = (((adv - mean) * m) ** 2).sum() / (n - 1)
    out = (adv - mean) / torch.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.0, 0.9), (1.0, 1.0)])
def test_gae_fp32_against_float64(gamma, lam):
    B, T = pick((64, 2500), (6, 13))  # T > the kernel's 1024-token chunk: carries between chunks
    rewards = randn(B, T, seed=81, scale=0.3)
    values = randn(B, T, seed=82)
    mask = gae_masks(B, T, seed=83)
    adv_ref, ret_ref = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    tol = dict(rtol=1e-4, atol=2e-3)  # fp32 recursions over thousands of tokens
    for whiten, shift_mean in ((False, True), (True, True), (True, False)):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, shift_mean=shift_mean,
                       backend=BACKEND)
        assert adv.dtype == ret.dtype == torch.float32 and adv.is_contiguous() and adv.device == rewards.device
        want = whiten64(adv_ref, mask, shift_mean) if whiten else adv_ref
        torch.testing.assert_close(adv.double(), want, **tol)
        torch.testing.assert_close(ret.double(), ret_ref, **tol)
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
        fast = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, shift_mean=shift_mean,
                   backend=BACKEND, validate=False)
        assert torch.equal(fast[0], adv) and torch.equal(fast[1], ret)


def python_gae(rewards, values, mask, gamma, lam):
    """Scalar loop: masked tokens are skipped, the recursion carries across them."""
    r, v, m = rewards.double().cpu().tolist(), values.double().cpu().tolist(), mask.cpu().tolist()
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        nxt, run = 0.0, 0.0
        for t in reversed(range(len(r[b]))):
            if m[b][t]:
                run = r[b][t] + gamma * nxt - v[b][t] + gamma * lam * run
                nxt = v[b][t]
                adv[b][t], ret[b][t] = run, run + v[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("B,T", [(1, 1), (7, 1), (3, 2), (5, 9), (2, 1025)])
def test_gae_small_and_length_one_against_python_loop(B, T):
    rewards = randn(B, T, seed=91 + T)
    values = randn(B, T, seed=92 + T)
    mask = (torch.rand(B, T, generator=cpu_gen(93 + T)) < 0.7).to(DEV)
    mask[0, -1] = True
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9, backend=BACKEND)
    want_adv, want_ret = python_gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv.cpu().double(), want_adv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret.cpu().double(), want_ret, rtol=1e-4, atol=1e-4)


def test_gae_mask_dtypes_and_validation():
    B, T = pick((16, 300), (4, 9))
    rewards, values = randn(B, T, seed=101), randn(B, T, seed=102)
    mask = gae_masks(B, T, seed=103)
    want = gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend=BACKEND)
    for dt in (torch.uint8, torch.int64, torch.float32):
        got = gae(rewards, values, mask.to(dt), gamma=0.99, lam=0.95, whiten=True, backend=BACKEND)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    bad = rewards.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="rewards"):
        gae(bad, values, mask, backend=BACKEND)
    with pytest.raises(ValueError, match="mask"):
        gae(rewards, values, mask.to(torch.int64) * 2, backend=BACKEND)


# ----------------------------------------------------------------------------------------------
# vib_sample_kl
# ----------------------------------------------------------------------------------------------
CLAMP = (-20.0, 10.0)


def recover_eps(shape, seed, row_ids=None):
    """With mu = 0, logvar = 0: z = 0 + exp(0) * eps = eps exactly."""
    zeros = torch.zeros(shape, device=DEV)
    eps, _ = vib_sample_kl(zeros, zeros, seed=seed, backend=BACKEND, row_ids=row_ids)
    return eps.double()


def vib_reference64(mu, logvar, eps):
    lv = logvar.clamp(*CLAMP)
    return mu + torch.exp(0.5 * lv) * eps, 0.5 * (mu * mu + torch.exp(lv) - lv - 1.0).sum(-1)


def test_vib_eps_is_standard_normal():
    n_rows, n_cols = pick((4096, 256), (64, 100))
    eps = recover_eps((n_rows, n_cols), 31)
    n = eps.numel()
    assert abs(eps.mean().item()) < 4.0 / math.sqrt(n)
    assert abs(eps.std().item() - 1.0) < 4.0 * math.sqrt(0.5 / n)
    assert abs((eps**3).mean().item()) < 4.0 * math.sqrt(15.0 / n)
    assert abs((eps**4).mean().item() - 3.0) < 4.0 * math.sqrt(96.0 / n)
    assert abs((eps.abs() < 1.0).double().mean().item() - 0.6827) < 4.0 * math.sqrt(0.6827 * 0.3173 / n)
    assert torch.unique(eps, dim=0).shape[0] == n_rows  # no repeated rows
    flat = eps.view(-1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 4.0 / math.sqrt(n)
    cols = eps.t().contiguous().view(-1)  # neighbours across rows
    assert abs(torch.corrcoef(torch.stack([cols[:-1], cols[1:]]))[0, 1].item()) < 4.0 / math.sqrt(n)
    assert not torch.equal(recover_eps((n_rows, n_cols), 32), eps)  # the seed matters


@pytest.mark.parametrize("shape", [(7, 100), (3, 5, 2100), (33, 24)], ids=["7x100", "3x5x2100", "33x24"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vib_values_and_grads_against_float64(shape, dtype):
    if ON_CPU and shape[-1] == 2100:
        shape = (1, 2, 2100)
    mu = randn(*shape, seed=111, dtype=dtype)
    logvar = randn(*shape, seed=112, scale=3.0, dtype=dtype)
    flat = logvar.view(-1)
    flat[0], flat[1], flat[2], flat[3] = -25.0, 12.0, CLAMP[0], CLAMP[1]  # outside / on the clamp bounds
    eps = recover_eps(shape, 5)
    grad_z = randn(*shape, seed=113, dtype=dtype)
    grad_kl = randn(*shape[:-1], seed=114)

    mu_a, lv_a = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = vib_sample_kl(mu_a, lv_a, seed=5, backend=BACKEND)
    torch.autograd.backward((z, kl), (grad_z, grad_kl))
    mu_r, lv_r = mu.double().requires_grad_(), logvar.double().requires_grad_()
    z_r, kl_r = vib_reference64(mu_r, lv_r, eps)
    torch.autograd.backward((z_r, kl_r), (grad_z.double(), grad_kl.double()))

    assert z.dtype == dtype and kl.dtype == torch.float32 and kl.shape == shape[:-1]
    assert mu_a.grad.dtype == dtype and lv_a.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.double(), z_r.detach(), **tol)
    # KL sums L fp32 terms of the (exact) inputs; L = 2100 terms of size up to e^10 need a wider atol.
    torch.testing.assert_close(kl.double(), kl_r.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(mu_a.grad.double(), mu_r.grad, **tol)
    torch.testing.assert_close(lv_a.grad.double(), lv_r.grad, **tol)
    g = lv_a.grad.view(-1)
    assert g[0] == 0 and g[1] == 0 and g[2] != 0 and g[3] != 0


def test_vib_row_ids_batching_invariance():
    """Same (row, id) -> bitwise the same z, KL and gradients, however the rows are batched or permuted."""
    L = 24
    ids = torch.tensor([5, 2**33 + 3, 0, 17, 4, 2**40, 9, 123456789], device=DEV)
    n = ids.numel()
    mu, logvar = randn(n, L, seed=121), randn(n, L, seed=122, scale=2.0)
    gz, gkl = randn(n, L, seed=123), randn(n, seed=124)

    def run(rows):
        m = mu[rows].clone().requires_grad_()
        lv = logvar[rows].clone().requires_grad_()
        z, kl = vib_sample_kl(m, lv, seed=77, backend=BACKEND, row_ids=ids[rows])
        torch.autograd.backward((z, kl), (gz[rows], gkl[rows]))
        return z.detach(), kl.detach(), m.grad, lv.grad

    everything = torch.arange(n, device=DEV)
    whole = run(everything)
    first, second = run(everything[:3]), run(everything[3:])
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 4, 2], device=DEV)
    permuted = run(perm)
    for w, a, b, p in zip(whole, first, second, permuted):
        assert torch.equal(torch.cat([a, b]), w)
        assert torch.equal(p, w[perm])
    # Not vacuous: without ids the second shard draws other noise.
    z_plain, _ = vib_sample_kl(mu[3:], logvar[3:], seed=77, backend=BACKEND)
    assert not torch.equal(z_plain, whole[0][3:])
    # Values with ids are right too (eps recovered with the same ids).
    eps = recover_eps((n, L), 77, row_ids=ids)
    z_ref, kl_ref = vib_reference64(mu.double(), logvar.double(), eps)
    torch.testing.assert_close(whole[0].double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole[1].double(), kl_ref, rtol=1e-5, atol=1e-4)


def test_vib_triton_stream_is_philox_at_id_times_latent():
    """Documented for the Triton backend: row id r draws what row r of an id-less call draws."""
    L, n = 24, 6
    plain = recover_eps((n, L), 1234)
    assert torch.equal(recover_eps((n, L), 1234, row_ids=torch.arange(n, device=DEV)), plain)
    ids = torch.tensor([4, 1], device=DEV)
    assert torch.equal(recover_eps((2, L), 1234, row_ids=ids), plain[ids])


# ----------------------------------------------------------------------------------------------
# Models on the device: TokenScorer and ValueModel on the tiny model, bf16 autocast
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from vrpo_fast.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0, attn_implementation="sdpa")  # fp32 master weights, on CPU
    # At initialisation the next-token distribution is almost uniform (every label's log-prob ~ -log V),
    # which would hide a misaligned label; a larger final-norm scale spreads it (log-probs ~ -1 .. -6).
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    return tok, model


def _autocast():
    return torch.autocast(DEV.type, dtype=torch.bfloat16)


def _rollout(tok, model_dev, seed=3):
    from vrpo_fast.rollout import generate

    prompts = ["1+2=", "31+40=", "7+7=", "123+4=", "9+90="]
    return generate(model_dev, tok, prompts, max_new_tokens=12, temperature=1.0, seed=seed)


def test_token_scorer_bf16_autocast_matches_fp32_cpu(tiny):
    import copy

    from vrpo_fast.scoring import TokenScorer, next_token_labels

    tok, model = tiny
    model_dev = copy.deepcopy(model).to(DEV)
    roll = _rollout(tok, model_dev)
    labels = next_token_labels(roll.input_ids, roll.action_mask)
    on = labels != -100
    assert on.any()

    def run(scorer, ids, att, lab):
        scorer.zero_grad(set_to_none=True)
        with _autocast():
            lp, ent = scorer(ids, att, lab, temperature=0.9)
        loss = (lp * on.to(lp.device)).sum() + 0.1 * (ent * on.to(ent.device)).sum()
        loss.backward()
        grad = scorer.lm.get_output_embeddings().weight.grad  # tied with the input embedding
        return lp.detach(), ent.detach(), grad.detach().clone()

    fused = run(TokenScorer(model_dev), roll.input_ids, roll.attention_mask, labels)
    plain = run(TokenScorer(model_dev, fused=False), roll.input_ids, roll.attention_mask, labels)
    # CPU, fp32, no autocast, plain path: independent of the kernels and of bf16.
    cpu_model = copy.deepcopy(model)
    cpu_scorer = TokenScorer(cpu_model, fused=False)
    lp_c, ent_c = cpu_scorer(roll.input_ids.cpu(), roll.attention_mask.cpu(), labels.cpu(), temperature=0.9)
    on_c = on.cpu()
    ((lp_c * on_c).sum() + 0.1 * (ent_c * on_c).sum()).backward()
    grad_c = cpu_model.get_output_embeddings().weight.grad
    assert lp_c[on_c].max() - lp_c[on_c].min() > 1.0  # spread out: a misaligned label would show
    # bf16 autocast vs fp32 was ~5e-3 (values) and ~0.5% of the largest gradient on CPU autocast.
    for name, i, want in (("logprobs", 0, lp_c), ("entropy", 1, ent_c)):
        assert fused[i].dtype == torch.float32 and fused[i].shape == labels.shape
        assert (fused[i][~on] == 0).all()
        torch.testing.assert_close(fused[i], plain[i], rtol=0, atol=0.05, msg=f"{name}: fused vs plain (bf16)")
        torch.testing.assert_close(fused[i].cpu(), want.detach(), rtol=0, atol=0.05,
                                   msg=f"{name}: bf16 on the device vs fp32 on the CPU")
    close(fused[2], plain[2], 0.02, "lm_head grad: fused vs plain")
    close(fused[2].cpu(), grad_c, 0.02, "lm_head grad: bf16 on the device vs fp32 on the CPU")


def test_value_model_bf16_autocast(tiny):
    import copy

    from vrpo_fast.models.loading import build_value_model

    tok, model = tiny
    torch.manual_seed(0)
    critic_cpu = build_value_model(copy.deepcopy(model), algo="vrpo")
    g = cpu_gen(11)
    with torch.no_grad():  # heads zero-initialise their output layers: move them off zero
        for name, p in critic_cpu.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    critic = copy.deepcopy(critic_cpu).to(DEV)
    roll = _rollout(tok, copy.deepcopy(model).to(DEV), seed=4)
    B, L = roll.input_ids.shape
    noise_ids = torch.arange(B * L, device=DEV).view(B, L)

    critic.train()
    with _autocast():
        out = critic(roll.input_ids, roll.attention_mask, response_mask=roll.response_mask, seed=5,
                     noise_ids=noise_ids)
    assert out.values.shape == (B, L) and out.values.dtype == torch.float32
    assert torch.isfinite(out.values).all() and out.kl.item() > 0
    assert (out.values[roll.attention_mask == 0] == 0).all()
    assert out.ent_pred.shape == out.nll_pred.shape == (B, L)
    (out.values.square().mean() + out.kl + out.ent_pred.mean() + out.nll_pred.mean()).backward()
    grads = [p.grad for p in critic.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    emb = critic.backbone.get_input_embeddings().weight.grad
    assert emb.abs().sum() > 0  # the loss reaches the backbone

    # Eval mode (z = mu, no noise): bf16 autocast on the device vs fp32 on the CPU.
    critic.eval()
    critic_cpu.eval()
    with torch.no_grad(), _autocast():
        dev_values = critic(roll.input_ids, roll.attention_mask, response_mask=roll.response_mask).values
    with torch.no_grad():
        cpu_values = critic_cpu(roll.input_ids.cpu(), roll.attention_mask.cpu(),
                                response_mask=roll.response_mask.cpu()).values
    assert cpu_values.abs().max() > 0
    close(dev_values.cpu(), cpu_values, 0.05, "eval values: bf16 device vs fp32 CPU")


# ----------------------------------------------------------------------------------------------
# Keyed sampling: the same draws on CUDA as on the CPU
# ----------------------------------------------------------------------------------------------
def test_keyed_hash_and_uniform_are_bit_identical_to_cpu():
    from vrpo_fast.ops._random import keyed_gumbel, keyed_hash, keyed_normal, keyed_uniform

    g = cpu_gen(131)
    keys = torch.cat([
        torch.tensor([0, 1, 7, 2**31, 2**40 + 3, 123456789, 2**62, -1, -(2**63)]),
        torch.randint(-(2**63), 2**63 - 1, (4096,), generator=g, dtype=torch.int64),
    ])
    for seed in (0, 42, 2**62 + 5):
        assert torch.equal(keyed_hash(seed, keys.to(DEV), 5).cpu(), keyed_hash(seed, keys, 5))
    # The sampler's shape: [rows, 1] x position x [1, V].
    rows = torch.tensor([[3], [10], [2**35]])
    vocab = torch.arange(pick(151936, 5000))[None, :]
    for dtype in (torch.float32, torch.float64):
        u_dev = keyed_uniform(9, rows.to(DEV), 17, vocab.to(DEV), dtype=dtype).cpu()
        u_cpu = keyed_uniform(9, rows, 17, vocab, dtype=dtype)
        assert torch.equal(u_dev, u_cpu)  # 24 hash bits + 0.5, times 2^-24: exact IEEE ops
        # log / cos / sqrt may differ by an ulp between the devices' math libraries
        torch.testing.assert_close(keyed_gumbel(9, rows.to(DEV), 17, vocab.to(DEV), dtype=dtype).cpu(),
                                   keyed_gumbel(9, rows, 17, vocab, dtype=dtype), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keyed_normal(9, rows.to(DEV), vocab.to(DEV), dtype=dtype).cpu(),
                                   keyed_normal(9, rows, vocab, dtype=dtype), rtol=1e-5, atol=1e-5)


def reference_scores(logits, keys, seed, position, temperature):
    """The sampler's perturbed scores on the CPU: logits.float() / T + keyed Gumbel (the documented draw)."""
    from vrpo_fast.ops._random import keyed_gumbel

    vocab = torch.arange(logits.shape[-1])
    return logits.cpu().float() / temperature + keyed_gumbel(seed, keys.cpu()[:, None], position, vocab[None, :])


def assert_same_picks(picks, scores, where):
    """``picks`` [B] equal ``scores.argmax(-1)`` except where the two best perturbed scores of a row
    tie within float rounding (another device's log may differ in the last ulp): at most one such row."""
    want = scores.argmax(-1)
    differ = (picks.cpu() != want).nonzero().view(-1).tolist()
    for i in differ:
        gap = float(scores[i, want[i]] - scores[i, picks[i]])
        assert gap < 1e-4, f"{where}, row {i}: token {int(picks[i])} instead of {int(want[i])}, score gap {gap:.3g}"
    assert len(differ) <= 1, f"{where}: {len(differ)} rows differ from the reference draw"


def test_keyed_sampler_picks_the_same_tokens_as_on_cpu():
    """KeyedSampler (the logits processor of ``generate``): the same draws on the device as on the CPU."""
    from vrpo_fast.rollout import KeyedSampler

    n, V = pick((64, 151936), (8, 3000))
    logits = randn(n, V, seed=141, scale=2.0, dtype=torch.bfloat16)
    keys = torch.arange(n) * 7 + 3
    prefix = torch.zeros(n, 9, dtype=torch.long)  # prompt_length 4: the token at position 5 is drawn
    scores = reference_scores(logits, keys, seed=3, position=5, temperature=0.8)
    picks_cpu = KeyedSampler(3, keys, prompt_length=4, temperature=0.8)(prefix, logits.cpu()).argmax(-1)
    assert torch.equal(picks_cpu, scores.argmax(-1))  # the CPU path is the reference expression
    picks_dev = KeyedSampler(3, keys.to(DEV), prompt_length=4, temperature=0.8)(prefix.to(DEV), logits).argmax(-1)
    assert picks_dev.device == logits.device
    assert_same_picks(picks_dev, scores, "KeyedSampler on the device")


def _keyed_sample_ops():
    import vrpo_fast.ops as ops

    if not hasattr(ops, "keyed_sample"):
        pytest.skip("vrpo_fast.ops has no keyed_sample in this tree")
    return ops.keyed_sample, ops.keyed_sample_reference


@pytest.mark.parametrize("B,V,dtype", [
    (64, 151936, torch.bfloat16), (64, 151936, torch.float32), (1, 151936, torch.bfloat16),
    (5, 50257, torch.float32), (3, 1000, torch.float16),
], ids=["64x151936-bf16", "64x151936-fp32", "1x151936-bf16", "5x50257-fp32", "3x1000-fp16"])
def test_keyed_sample_matches_the_reference_draw(B, V, dtype):
    keyed_sample, keyed_sample_reference = _keyed_sample_ops()
    B, V = pick((B, V), (min(B, 3), min(V, 2000)))
    logits = randn(B, V, seed=151 + B, scale=2.0, dtype=dtype)
    keys = torch.randint(-(2**62), 2**62, (B,), generator=cpu_gen(152)).to(DEV)  # negative keys are valid
    got = keyed_sample(logits, keys, seed=7, position=11, temperature=0.8, backend=BACKEND)
    assert got.dtype == torch.int64 and got.shape == (B,) and got.device == logits.device
    scores = reference_scores(logits, keys, seed=7, position=11, temperature=0.8)
    assert_same_picks(got, scores, "keyed_sample vs the CPU reference")
    twin = keyed_sample_reference(logits, keys, seed=7, position=11, temperature=0.8)  # eager, on the device
    assert_same_picks(twin, scores, "keyed_sample_reference on the device vs the CPU")
    # A row's token does not depend on the other rows (with one row the vocabulary is split over programs).
    for i in sorted({0, B // 2, B - 1}):
        alone = keyed_sample(logits[i:i + 1], keys[i:i + 1], seed=7, position=11, temperature=0.8, backend=BACKEND)
        assert torch.equal(alone, got[i:i + 1])


def test_keyed_sample_non_finite_logits():
    keyed_sample, _ = _keyed_sample_ops()
    V = pick(151936, 3000)
    logits = randn(4, V, seed=161, scale=2.0)
    logits[0, : V - 5] = -float("inf")  # only the last 5 are possible
    logits[1] = -float("inf")
    logits[1, V - 1] = -1e30  # one possible token left
    logits[2, [17, V - 2]] = float("inf")  # +inf wins; the lowest index among several
    keys = torch.arange(4, device=DEV)
    for position in range(3):
        got = keyed_sample(logits, keys, seed=5, position=position, temperature=1.3, backend=BACKEND).cpu()
        assert got[0] >= V - 5 and got[1] == V - 1 and got[2] == 17
        assert_same_picks(got, reference_scores(logits, keys, 5, position, 1.3), "non-finite logits")
    logits[1, V - 1] = -float("inf")  # nothing possible: a ValueError naming the row, not token 0
    with pytest.raises(ValueError, match="row 1 is all -inf"):
        keyed_sample(logits, keys, seed=5, position=0, temperature=1.3, backend=BACKEND)


def test_generate_on_device_is_deterministic_and_batch_invariant(tiny):
    """fp32 tiny model: a completion depends only on (prompt, seed, key), on the device too."""
    import copy

    from vrpo_fast.rollout import generate

    tok, model = tiny
    model_dev = copy.deepcopy(model).to(DEV)
    prompts = ["1+2=", "31+40=", "7+7=", "123+4="]
    keys = torch.tensor([10, 11, 12, 13])
    kw = dict(max_new_tokens=10, temperature=0.9, seed=5)
    whole = generate(model_dev, tok, prompts, row_keys=keys, **kw)
    again = generate(model_dev, tok, prompts, row_keys=keys, **kw)
    assert torch.equal(whole.input_ids, again.input_ids)
    assert whole.input_ids.device.type == DEV.type
    first = generate(model_dev, tok, prompts[:2], row_keys=keys[:2], **kw)
    second = generate(model_dev, tok, prompts[2:][::-1], row_keys=keys[2:].flip(0), **kw)
    # Differences could only come from an argmax tie within float rounding between batch shapes
    # (probability ~1e-5 per token): a mismatch here is a bug, not noise.
    assert first.completions + second.completions[::-1] == whole.completions
    on_cpu = generate(model, tok, prompts, row_keys=keys, **kw)
    assert on_cpu.completions == whole.completions, "keyed sampling drew different tokens on the CPU"


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_ops_compile_fullgraph_on_device(compiler):
    """The custom ops under torch.compile(fullgraph=True) on the device: one graph, the Triton kernels
    inside, values and gradients equal to eager, bad labels still raise."""
    import torch._dynamo

    keyed_sample, _ = _keyed_sample_ops()
    torch._dynamo.reset()
    g = cpu_gen(171)
    B, T, H, V = 2, pick(64, 5), pick(256, 16), pick(32000, 300)
    logits = randn(B, T + 1, V, seed=172, scale=2.0, dtype=torch.bfloat16).requires_grad_()
    hidden = randn(B, T, H, seed=173).requires_grad_()
    weight = randn(V, H, seed=174, scale=H ** -0.5).requires_grad_()
    mu, logvar = randn(B, T, 16, seed=175).requires_grad_(), randn(B, T, 16, seed=176).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(DEV)
    labels[0, :2] = -100
    mask = torch.ones(B, T, device=DEV)
    keys = torch.arange(B, device=DEV)

    def step(x, h, w, m, lv, y, seed):
        lp, ent = token_logprobs_entropy(x[:, :-1], y, temperature=0.8, backend=BACKEND)
        lp2, ent2 = linear_logprobs_entropy(h, w, y, temperature=0.8, backend=BACKEND)
        z, kl = vib_sample_kl(m, lv, seed=seed, backend=BACKEND)
        adv, ret = gae(lp.detach(), ent.detach(), mask, gamma=1.0, lam=0.95, whiten=True, backend=BACKEND)
        tokens = keyed_sample(x.detach()[:, -1], keys, seed=seed, position=3, backend=BACKEND)
        loss = lp.sum() + 0.1 * ent.sum() + lp2.sum() + 0.1 * ent2.sum() + (z * z).sum() + kl.sum()
        return loss, adv, ret, tokens

    inputs = [logits, hidden, weight, mu, logvar]
    try:
        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        for seed in (1, 2):
            got = compiled(*inputs, labels, seed)
            want = step(*inputs, labels, seed)
            got_grads = torch.autograd.grad(got[0], inputs)
            want_grads = torch.autograd.grad(want[0], inputs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[3], want[3])
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4)
        bad = labels.clone()
        bad[1, 0] = V
        with pytest.raises(ValueError, match="labels"):
            compiled(*inputs, bad, 1)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs need a GPU")
def test_ops_capture_in_a_cuda_graph():
    """torch.compile(mode="reduce-overhead") captures CUDA graphs: inside a capture the ops skip their
    host-side data checks (no sync possible) and replay gives the eager results."""
    keyed_sample, _ = _keyed_sample_ops()
    logits = randn(4, 7, 1000, seed=181, scale=2.0, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (4, 7), generator=cpu_gen(182)).to(DEV)
    mask = torch.ones(4, 7, device=DEV)
    keys = torch.arange(4, device=DEV)
    mu = randn(4, 7, 16, seed=184)

    def step():
        lp, ent = token_logprobs_entropy(logits, labels)
        adv, _ = gae(lp, ent, mask, gamma=1.0, lam=0.95, whiten=True)
        z, kl = vib_sample_kl(mu, mu * 0.5, seed=3)
        tokens = keyed_sample(logits[:, -1], keys, seed=1, position=2)
        return lp, ent, adv, z, kl, tokens

    want = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (kernels compiled, caches filled)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
