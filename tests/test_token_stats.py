"""token_logprobs_entropy: values and gradients vs a float64 PyTorch reference, both backends.

The Triton backend runs under the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest),
so shapes stay small except for the two large-vocabulary cases.
"""
import pytest
import torch
from conftest import requires_triton

from vrpo_fast.ops import token_logprobs_entropy, token_logprobs_entropy_reference
from vrpo_fast.ops import token_stats as ts
from vrpo_fast.ops._common import triton_interpret

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


def _reference_with_grads(logits, labels, grad_lp, grad_h, *, temperature=1.0, ignore_index=-100,
                          compute_entropy=True):
    """float64 values from the reference op and gradients through autograd."""
    x = logits.detach().double().requires_grad_()
    lp, ent = token_logprobs_entropy_reference(x, labels, temperature=temperature, ignore_index=ignore_index,
                                               compute_entropy=compute_entropy)
    loss = (lp * grad_lp.double()).sum()
    if compute_entropy:
        loss = loss + (ent * grad_h.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return lp.detach(), (ent.detach() if ent is not None else None), grad


def _analytic_grad(logits, labels, grad_lp, grad_h, *, temperature=1.0, ignore_index=-100):
    """float64 closed form; safe where p == 0 exactly (-inf / extreme logits), unlike autograd through
    xlogy: d/dx = (g_lp (onehot - p) - g_H p (log p + H)) / T, zero for ignored tokens."""
    x = logits.detach().double() / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    h = -plogp.sum(-1, keepdim=True)
    valid = (labels != ignore_index).unsqueeze(-1)
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(valid, labels.unsqueeze(-1), 0), 1.0)
    glp = grad_lp.double().unsqueeze(-1)
    gh = grad_h.double().unsqueeze(-1)
    grad = glp * (onehot - p) - gh * (plogp + p * h)
    return torch.where(valid, grad, torch.zeros_like(grad)) / temperature


def _run(logits, labels, backend, grad_lp=None, grad_h=None, **kw):
    if logits._base is not None:
        # Keep the caller's layout (strides, storage offset): clone() would make it contiguous.
        base = logits._base.detach().clone().requires_grad_()
        x = base.as_strided(logits.shape, logits.stride(), logits.storage_offset())
    else:
        x = logits.detach().clone().requires_grad_()
    assert x.stride() == logits.stride()
    before = logits.detach().clone()
    lp, ent = token_logprobs_entropy(x, labels, backend=backend, **kw)
    grad_lp = torch.randn(labels.shape) if grad_lp is None else grad_lp
    grad_h = torch.randn(labels.shape) if grad_h is None else grad_h
    loss = (lp * grad_lp).sum()
    if ent is not None:
        loss = loss + (ent * grad_h).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(x.detach(), before), "the op modified its input logits"
    return lp, ent, grad, grad_lp, grad_h


def _labels(shape, V, n_ignored=1, ignore_index=-100):
    labels = torch.randint(0, V, shape)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    return labels


def _check(logits, labels, backend, *, rtol=1e-5, atol=2e-5, grad_rtol=1e-5, grad_atol=1e-6, analytic=False, **kw):
    lp, ent, grad, glp, gh = _run(logits, labels, backend, **kw)
    compute_entropy = kw.get("compute_entropy", True)
    rkw = {k: v for k, v in kw.items() if k in ("temperature", "ignore_index", "compute_entropy")}
    lp_ref, ent_ref, grad_ref = _reference_with_grads(logits, labels, glp, gh, **rkw)
    if analytic:
        grad_ref = _analytic_grad(logits, labels, glp, gh if compute_entropy else torch.zeros_like(gh),
                                  **{k: v for k, v in rkw.items() if k != "compute_entropy"})
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # out_dtype="auto"
    assert lp.dtype == out_dtype and lp.shape == labels.shape
    torch.testing.assert_close(lp.double(), lp_ref, rtol=rtol, atol=atol)
    if compute_entropy:
        assert ent.dtype == out_dtype and ent.shape == labels.shape
        torch.testing.assert_close(ent.double(), ent_ref, rtol=rtol, atol=atol)
    else:
        assert ent is None
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), grad_ref, rtol=grad_rtol, atol=grad_atol)
    return lp, ent, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 333), (2, 3, 257)])
@pytest.mark.parametrize("temperature,compute_entropy", [(1.0, True), (0.7, True), (2.0, True), (1.0, False),
                                                          (0.7, False)])
def test_values_and_grads(backend, shape, temperature, compute_entropy):
    logits = torch.randn(shape) * 4
    labels = _labels(shape[:-1], shape[-1])
    _check(logits, labels, backend, temperature=temperature, compute_entropy=compute_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_leading_strides(backend):
    # logits[:, :-1] (the usual causal-LM shift) is not flattenable to [N, V] without a copy.
    full = (torch.randn(3, 5, 129) * 3).requires_grad_()
    labels = _labels((3, 4), 129)
    view = full[:, :-1]
    assert view.stride(0) != view.shape[1] * view.stride(1)
    lp, ent = token_logprobs_entropy(view, labels, backend=backend, temperature=0.7)
    glp, gh = torch.randn(3, 4), torch.randn(3, 4)
    (grad,) = torch.autograd.grad((lp * glp).sum() + (ent * gh).sum(), full)
    lp_ref, ent_ref, grad_ref = _reference_with_grads(view, labels, glp, gh, temperature=0.7)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad[:, :-1].double(), grad_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[:, -1] == 0)
    # A [N, V] view with a row stride larger than V.
    rows = full.detach()[0, :, :100]
    lp, ent, _ = _check(rows, _labels((5,), 100), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", [(slice(1, 2), slice(1, None)), (slice(1, None), slice(2, 3)),
                                   (slice(None), slice(1, None))])
def test_views_with_offsets(backend, index):
    # Views starting inside the storage (B == 1, T == 1 and flattenable layouts).
    view = (torch.randn(3, 6, 50) * 3)[index]
    assert view.storage_offset() > 0
    _check(view, _labels(view.shape[:-1], 50), backend)


@requires_triton
@pytest.mark.parametrize("V,block_v", [(1000, 128), (1024, 256), (64, 64), (1, 16), (200, 512)])
def test_triton_blocks_and_tails(V, block_v):
    """Kernel launchers directly with small blocks: several blocks per row, partial last block."""
    from vrpo_fast.kernels.token_stats import token_stats_bwd, token_stats_fwd

    logits = torch.randn(4, V) * 5
    labels = _labels((4,), V)
    lp, ent, lse = token_stats_fwd(logits, labels, inv_temperature=1 / 0.7, ignore_index=-100, compute_entropy=True,
                                   block_v=block_v)
    glp, gh = torch.randn(4), torch.randn(4)
    lp_ref, ent_ref, grad_ref = _reference_with_grads(logits, labels, glp, gh, temperature=0.7)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double() / 0.7, -1), rtol=1e-6, atol=1e-5)
    out = torch.empty_like(logits)
    token_stats_bwd(logits, labels, lse, ent, glp, gh, out, inv_temperature=1 / 0.7, ignore_index=-100,
                    block_v=block_v)
    torch.testing.assert_close(out.double(), grad_ref, rtol=1e-5, atol=1e-6)


def test_torch_multiple_chunks(monkeypatch):
    # 3 rows per chunk, so the 10 rows span a partial last chunk.
    monkeypatch.setattr(ts, "_CHUNK_BYTES", 3 * 4 * 300)
    logits = torch.randn(10, 300) * 3
    _check(logits, _labels((10,), 300, n_ignored=2), "torch", temperature=0.7)
    _check(logits.to(torch.bfloat16), _labels((10,), 300, n_ignored=2), "torch", grad_rtol=1.6e-2, grad_atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,N", [(50257, 3), (151937, 2)])
def test_large_vocab(backend, V, N):
    logits = torch.randn(N, V) * 2
    labels = torch.randint(0, V, (N,))
    labels[0] = V - 1  # last column, inside the final partial block
    _check(logits, labels, backend, rtol=1e-5, atol=1e-4, grad_rtol=1e-4, grad_atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index(backend):
    logits = torch.randn(4, 6, 97)
    labels = _labels((4, 6), 97, n_ignored=7)
    labels[2] = -100  # one fully ignored sequence
    lp, ent, grad = _check(logits, labels, backend)
    ignored = labels == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(grad[~ignored].abs().sum(-1) > 0)
    # A custom ignore_index that is also a valid vocabulary id.
    labels = torch.randint(0, 97, (4, 6))
    labels[0, :3] = 5
    lp, ent, grad = _check(logits, labels, backend, ignore_index=5)
    assert torch.all(lp[labels == 5] == 0) and torch.all(grad[labels == 5] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    logits = torch.randn(3, 50).requires_grad_()
    labels = torch.full((3,), -100)
    lp, ent = token_logprobs_entropy(logits, labels, backend=backend)
    assert torch.all(lp == 0) and torch.all(ent == 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1, 77), (1, 1, 77), (1, 77)])
def test_length_one(backend, shape):
    _check(torch.randn(shape) * 3, torch.randint(0, 77, shape[:-1]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    # Outputs are fp32 computed from the half inputs: compare with the float64 reference of the same
    # (rounded) inputs. Gradients are rounded to the input dtype.
    logits = (torch.randn(2, 5, 300) * 4).to(dtype)
    labels = _labels((2, 5), 300, n_ignored=2)
    _check(logits, labels, backend, temperature=0.7, rtol=1e-5, atol=2e-5, grad_rtol=1.6e-2, grad_atol=1e-5)


def test_float64_torch_path():
    logits = torch.randn(5, 123, dtype=torch.float64) * 3
    # fp64 in, fp64 out (accumulated in fp64): agrees with the reference to fp64 rounding.
    _check(logits, _labels((5,), 123), "torch", temperature=2.0, rtol=1e-12, atol=1e-12, grad_rtol=1e-12,
           grad_atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    V = 300
    logits = torch.randn(6, V)
    logits[0, :10] = 1e4  # huge, several tied at the max
    logits[1] = -1e4
    logits[1, 7] = 1e4  # one-hot-like distribution: entropy ~ 0
    logits[2, 50:120] = -float("inf")  # masked vocabulary, off the label
    logits[3, ::2] = -float("inf")
    logits[4] *= 1e3
    labels = torch.tensor([3, 8, 10, 1, 17, -100])
    lp, ent, grad = _check(logits, labels, backend, temperature=0.7, analytic=True, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert lp[1] < -1e4 and ent[1].abs() < 1e-6
    torch.testing.assert_close(ent[0], torch.tensor(10.0).log(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    full = (torch.randn(2, 6, 150) * 3).to(dtype)
    labels = _labels((2, 5), 150)
    glp, gh = torch.randn(2, 5), torch.randn(2, 5)

    def grads(inplace):
        leaf = full.clone().requires_grad_()
        logits = leaf * 1.0  # intermediate whose buffer the in-place backward may overwrite
        seen = {}
        view = logits[:, :-1]
        view.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
        lp, ent = token_logprobs_entropy(view, labels, backend=backend, temperature=0.7, inplace_backward=inplace)
        ((lp * glp).sum() + (ent * gh).sum()).backward()
        return leaf.grad, seen["ptr"] == view.data_ptr()

    g_copy, reused_copy = grads(False)
    g_inplace, reused_inplace = grads(True)
    assert reused_inplace and not reused_copy
    torch.testing.assert_close(g_inplace, g_copy, rtol=0, atol=0)
    assert torch.all(g_inplace[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_vocab_sized_tensor(backend):
    logits = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = token_logprobs_entropy(logits, torch.randint(0, 64, (4,)), backend=backend)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.data_ptr() == logits.data_ptr() for t in big)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_int32_labels(backend):
    logits = torch.randn(2, 3, 40)
    labels = torch.randint(0, 40, (2, 3))
    with torch.no_grad():
        lp, ent = token_logprobs_entropy(logits.requires_grad_(), labels.int(), backend=backend)
    assert not lp.requires_grad
    lp_ref, ent_ref = token_logprobs_entropy_reference(logits.detach().double(), labels)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=2e-5)


def test_only_one_output_used():
    logits = torch.randn(3, 20, requires_grad=True)
    labels = torch.randint(0, 20, (3,))
    lp, ent = token_logprobs_entropy(logits, labels)
    (g,) = torch.autograd.grad(ent.sum(), logits)
    _, _, g_ref = _reference_with_grads(logits, labels, torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)


def test_errors():
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match="labels"):
        token_logprobs_entropy(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        token_logprobs_entropy(labels, labels)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs_entropy(logits, labels[:, :2])
    with pytest.raises(ValueError, match="logits"):
        token_logprobs_entropy(torch.randn(10), labels)
    with pytest.raises(ValueError, match="contiguous"):
        token_logprobs_entropy(torch.randn(2, 10, 3).transpose(1, 2), labels)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_entropy(logits, labels, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature"):
        token_logprobs_entropy(logits, labels, temperature="hot")
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        token_logprobs_entropy(logits, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="labels"):
        token_logprobs_entropy(logits, bad)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs_entropy(logits, labels, backend="cuda")
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs_entropy(logits, labels, ignore_index=1.5)
    leaf = torch.randn(2, 3, 10, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        token_logprobs_entropy(leaf, labels, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        token_logprobs_entropy(leaf[:, :2], labels[:, :2], inplace_backward=True)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        with pytest.raises(ValueError, match="device"):
            token_logprobs_entropy(logits.cuda(), labels)


# ----------------------------------------------------------------------------------------------
# dtypes: narrow integer labels with any V, out_dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrow_label_dtypes_with_a_large_vocabulary(label_dtype):
    # V far above the label dtype's range: every label that fits is valid (the range check runs on
    # int64, so V is never wrapped into the narrow dtype), and a uint8 156 is not ignore_index -100.
    V = 40000
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=gen)
    top = 200 if label_dtype == torch.uint8 else 100
    labels = torch.tensor([5, top, 7, 3 if label_dtype == torch.uint8 else -100], dtype=label_dtype)
    lp, ent = token_logprobs_entropy(logits, labels)
    ref_lp, ref_ent = token_logprobs_entropy_reference(logits.double(), labels.long())
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    assert lp[1] != 0  # scored, not mistaken for ignore_index
    small = torch.randn(4, 50)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 50\).*got {top}"):
        token_logprobs_entropy(small, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype(backend):
    gen = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(3, 4, 77, generator=gen)).to(torch.bfloat16).requires_grad_()
    labels = _labels((3, 4), 77)
    ref_lp, ref_ent = token_logprobs_entropy_reference(logits.detach().double(), labels, temperature=0.8)
    lp32, ent32 = token_logprobs_entropy(logits, labels, temperature=0.8, backend=backend)
    assert lp32.dtype == ent32.dtype == torch.float32  # "auto"
    (grad32,) = torch.autograd.grad(lp32.sum() + ent32.sum(), logits)
    for out_dtype, want in ((None, torch.bfloat16), (torch.float16, torch.float16), (torch.float64, torch.float64)):
        lp, ent = token_logprobs_entropy(logits, labels, temperature=0.8, backend=backend, out_dtype=out_dtype)
        assert lp.dtype == ent.dtype == want
        # One rounding of the fp32 statistics.
        assert torch.equal(lp, lp32.to(want)) and torch.equal(ent, ent32.to(want))
        (grad,) = torch.autograd.grad(lp.double().sum() + ent.double().sum(), logits)
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), grad32.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lp32.double(), ref_lp, rtol=1e-5, atol=2e-5)
    with pytest.raises(TypeError, match="out_dtype"):
        token_logprobs_entropy(logits, labels, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        token_logprobs_entropy(logits, labels, out_dtype="fp32")


# ----------------------------------------------------------------------------------------------
# non-finite logits: same on every backend
# ----------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("block_v", [16, 64])
def test_triton_whole_minus_inf_blocks(block_v):
    # The first blocks of every row entirely -inf (a masking bias over the head of the vocabulary),
    # then finite logits: finite outputs equal to the reference, also with temperature.
    from vrpo_fast.kernels.token_stats import token_stats_bwd, token_stats_fwd

    gen = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(4, 200, generator=gen)
    logits[:, :128] = -float("inf")
    logits[1, 150:] = -float("inf")  # -inf after finite blocks too
    labels = torch.tensor([130, 140, 199, -100])
    lp, ent, lse = token_stats_fwd(logits, labels, inv_temperature=1 / 0.7, ignore_index=-100, compute_entropy=True,
                                   block_v=block_v)
    ref_lp, ref_ent = token_logprobs_entropy_reference(logits.double(), labels, temperature=0.7)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    grad = token_stats_bwd(logits, labels, lse, ent, torch.ones(4), torch.ones(4), torch.empty_like(logits),
                           inv_temperature=1 / 0.7, ignore_index=-100, block_v=block_v)
    assert torch.isfinite(grad).all() and bool((grad[:, :128] == 0).all())


def test_nan_logits_propagate_the_same_on_every_backend():
    logits = torch.randn(4, 300)
    logits[1, 17] = float("nan")
    logits[2, 250] = float("nan")  # in the second block of a 256-wide Triton block
    labels = torch.tensor([3, 5, 250, 9])
    results = {}
    for backend in ["torch"] + (["triton"] if triton_interpret() else []):
        x = logits.clone().requires_grad_()
        lp, ent = token_logprobs_entropy(x, labels, backend=backend)
        (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
        results[backend] = (lp, ent, grad)
        assert lp.isnan().tolist() == ent.isnan().tolist() == [False, True, True, False]
        assert grad[[1, 2]].isnan().all() and not grad[[0, 3]].isnan().any()
    if "triton" in results:
        for a, b in zip(results["torch"], results["triton"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


@requires_triton
def test_triton_kernel_is_memory_safe_for_unchecked_labels():
    """Inside CUDA-graph capture the host-side label check is skipped; the kernel then reads nothing
    out of bounds and gives NaN for the bad row only (no one-hot in its gradient)."""
    logits = torch.randn(3, 40).requires_grad_()
    labels = torch.tensor([3, 40, -7])
    lp, ent = token_logprobs_entropy(logits, labels, backend="triton", _check_label_range=False)
    assert lp.isnan().tolist() == [False, True, True] and torch.isfinite(ent).all()
    ref_lp, _ = token_logprobs_entropy_reference(logits.detach().double(), labels.clamp(0, 39))
    torch.testing.assert_close(lp[0].double(), ref_lp[0], rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(ent.sum(), logits)
    assert torch.isfinite(grad).all()
