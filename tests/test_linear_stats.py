"""linear_logprobs_entropy: values and gradients (hidden, weight, bias) vs a float64 reference that
materialises the logits, for both backends and a grid of tile shapes.

The Triton backend runs the statistics kernels under the interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest), so shapes stay tiny: H and V are deliberately not multiples
of 16 and the chunk sizes deliberately do not divide N or V.
"""
import pytest
import torch
from conftest import requires_triton
from torch.utils._python_dispatch import TorchDispatchMode

from vrpo_fast.ops import linear_logprobs_entropy, linear_logprobs_entropy_reference
from vrpo_fast.ops import linear_stats as ls
from vrpo_fast.ops.token_stats import token_logprobs_entropy_reference

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


def _inputs(N=13, H=24, V=97, dtype=torch.float32, bias=True, n_ignored=2, ignore_index=-100, lead=None):
    hidden = torch.randn(N, H) if lead is None else torch.randn(*lead, H)
    weight = torch.randn(V, H) / H**0.5 * 2.0
    b = torch.randn(V) * 0.5 if bias else None
    labels = torch.randint(0, V, hidden.shape[:-1])
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, b)]
    return cast[0], cast[1], cast[2], labels


def _run(hidden, weight, labels, bias, grad_lp, grad_h, **kw):
    """The op's values and grads of sum(g_lp * lp + g_h * H) w.r.t. hidden, weight, bias."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = linear_logprobs_entropy(leaves[0], leaves[1], labels, leaves[2], **kw)
    loss = (lp * grad_lp).sum() + ((ent * grad_h).sum() if ent is not None else 0.0)
    loss.backward()
    return lp, ent, [t.grad if t is not None else None for t in leaves]


def _reference(hidden, weight, labels, bias, grad_lp, grad_h, **kw):
    """float64 values and autograd grads through the materialised logits."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = linear_logprobs_entropy_reference(leaves[0], leaves[1], labels, leaves[2], **kw)
    loss = (lp * grad_lp.double()).sum() + ((ent * grad_h.double()).sum() if ent is not None else 0.0)
    loss.backward()
    return lp.detach(), (ent.detach() if ent is not None else None), [t.grad if t is not None else None for t in leaves]


def _close(actual, expected, rel, name):
    """|actual - expected| <= rel * max|expected| (+ tiny floor), elementwise max."""
    assert actual.shape == expected.shape, name
    scale = float(expected.abs().max()) + 1e-6
    err = float((actual.detach().double() - expected.double()).abs().max())
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"


def _check_against_reference(hidden, weight, labels, bias, rel=1e-5, **kw):
    kw_ref = {k: kw[k] for k in ("temperature", "ignore_index", "compute_entropy") if k in kw}
    grad_lp, grad_h = torch.randn(labels.shape), torch.randn(labels.shape)
    lp, ent, grads = _run(hidden, weight, labels, bias, grad_lp, grad_h, **kw)
    rlp, rent, rgrads = _reference(hidden, weight, labels, bias, grad_lp, grad_h, **kw_ref)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    _close(lp, rlp, rel, "logprobs")
    if kw.get("compute_entropy", True):
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        _close(ent, rent, rel, "entropy")
    else:
        assert ent is None
    for name, g, rg, src in zip(("hidden", "weight", "bias"), grads, rgrads, (hidden, weight, bias)):
        if src is None:
            continue
        assert g.dtype == src.dtype and g.shape == src.shape, name
        _close(g, rg, rel * 4, f"grad {name}")
    return lp, ent, grads


# ----------------------------------------------------------------------------------------------
# Values and gradients, fp32, both backends, tile grid
# ----------------------------------------------------------------------------------------------
TILES_TORCH = [
    (None, None),  # one tile
    (5, None),     # token chunks, full vocabulary (5 does not divide 13)
    (13, 30),      # vocabulary slices (30 does not divide 97)
    (4, 30),       # both
    (1, 1),        # degenerate: one logit per tile
    (16, 96),      # chunks larger than N; last slice of width 1
    (3, 200),      # chunk_vocab > V
]
TILES_TRITON = [(None, None), (5, None), (4, 30)]


@pytest.mark.parametrize("chunk_tokens,chunk_vocab", TILES_TORCH)
def test_fp32_torch_backend_matches_reference(chunk_tokens, chunk_vocab):
    hidden, weight, bias, labels = _inputs()
    _check_against_reference(hidden, weight, labels, bias, temperature=0.7, chunk_tokens=chunk_tokens,
                             chunk_vocab=chunk_vocab, backend="torch")


@requires_triton
@pytest.mark.parametrize("chunk_tokens,chunk_vocab", TILES_TRITON)
def test_fp32_triton_backend_matches_reference(chunk_tokens, chunk_vocab):
    hidden, weight, bias, labels = _inputs(N=11, H=40, V=130)
    _check_against_reference(hidden, weight, labels, bias, temperature=1.3, chunk_tokens=chunk_tokens,
                             chunk_vocab=chunk_vocab, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_temperature_one_and_3d_input(backend):
    hidden, weight, _, labels = _inputs(H=40, V=130, bias=False, lead=(2, 5))
    lp, ent, grads = _check_against_reference(hidden, weight, labels, None, chunk_tokens=4, chunk_vocab=64,
                                              backend=backend)
    assert lp.shape == (2, 5) and ent.shape == (2, 5) and grads[0].shape == (2, 5, 40)


def test_non_contiguous_3d_hidden():
    # hidden[:, :-1] (the usual next-token shift) is not a view of a flat [N, H] buffer.
    hidden, weight, bias, _ = _inputs(lead=(3, 6))
    labels = torch.randint(0, weight.shape[0], (3, 5))
    _check_against_reference(hidden[:, :-1], weight, labels, bias, chunk_tokens=4, chunk_vocab=40,
                             backend="torch")


def test_compute_entropy_false():
    hidden, weight, bias, labels = _inputs()
    lp, ent, _ = _check_against_reference(hidden, weight, labels, bias, compute_entropy=False, chunk_tokens=4,
                                          chunk_vocab=30, backend="torch")
    assert ent is None
    lp_full, _ = linear_logprobs_entropy(hidden, weight, labels, bias, chunk_tokens=4, chunk_vocab=30,
                                         backend="torch")
    torch.testing.assert_close(lp, lp_full, rtol=0, atol=1e-6)


def test_extreme_logits_stay_finite_and_exact():
    # fp32 logits around 1e3 with spreads of a few hundred: many probabilities underflow to 0 in
    # fp32 (not in the float64 reference), and lse - E[z] would cancel badly if formed naively.
    hidden, weight, bias, labels = _inputs(n_ignored=0)
    hidden = hidden * 30.0
    bias = bias + 1000.0
    # fp32 logits (and per-slice lse) near 1e3 are only exact to ulp(1e3) = 6e-5: that is the floor.
    lp, ent, grads = _check_against_reference(hidden, weight, labels, bias, chunk_tokens=6, chunk_vocab=40,
                                              backend="torch", rel=3e-4)
    assert all(bool(torch.isfinite(t).all()) for t in (lp, ent, *grads))


def test_backward_with_only_one_output_used():
    hidden, weight, bias, labels = _inputs()
    h = hidden.clone().requires_grad_()
    lp, ent = linear_logprobs_entropy(h, weight, labels, bias, chunk_tokens=5, chunk_vocab=30, backend="torch")
    ent.sum().backward()
    hd = hidden.double().requires_grad_()
    _, rent = linear_logprobs_entropy_reference(hd, weight, labels, bias)
    rent.sum().backward()
    _close(h.grad, hd.grad, 1e-5, "grad hidden (entropy only)")


# ----------------------------------------------------------------------------------------------
# Ignored tokens
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_have_zero_outputs_and_no_gradient(backend):
    hidden, weight, bias, labels = _inputs(n_ignored=4)
    lp, ent, grads = _check_against_reference(hidden, weight, labels, bias, chunk_tokens=5, chunk_vocab=40,
                                              backend=backend)
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all()


def test_all_ignored_gives_zeros_everywhere():
    hidden, weight, bias, labels = _inputs()
    labels.fill_(-100)
    grad_lp, grad_h = torch.randn(labels.shape), torch.randn(labels.shape)
    lp, ent, grads = _run(hidden, weight, labels, bias, grad_lp, grad_h, chunk_tokens=4, chunk_vocab=30,
                          backend="torch")
    assert (lp == 0).all() and (ent == 0).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("chunk_vocab", [None, 30])
def test_ignore_index_inside_the_vocabulary(chunk_vocab):
    # ignore_index=0 is a real token id: labels 0 are ignored, and tile-local label 0 of another
    # vocabulary slice (labels 30, 60, 90) must NOT be.
    hidden, weight, bias, labels = _inputs(n_ignored=3, ignore_index=0)
    labels[5], labels[6], labels[7] = 30, 60, 90
    lp, _, _ = _check_against_reference(hidden, weight, labels, bias, ignore_index=0, chunk_tokens=4,
                                        chunk_vocab=chunk_vocab, backend="torch")
    assert (lp[labels == 0] == 0).all() and (lp[5:8] != 0).all()


# ----------------------------------------------------------------------------------------------
# Low precision: fp32 staging / both loop orders
# ----------------------------------------------------------------------------------------------
def _low_precision_case(dtype, backend, N, V, chunk_tokens, chunk_vocab, H=24):
    hidden, weight, bias, labels = _inputs(N=N, H=H, V=V, dtype=dtype)
    grad_lp, grad_h = torch.randn(labels.shape), torch.randn(labels.shape)
    kw = dict(temperature=0.8, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, backend=backend)
    lp, ent, grads = _run(hidden, weight, labels, bias, grad_lp, grad_h, **kw)
    rlp, rent, rgrads = _reference(hidden, weight, labels, bias, grad_lp, grad_h, temperature=0.8)
    # Against the exact result: bf16 logits carry ~2^-8 relative rounding.
    _close(lp, rlp, 0.03, "logprobs")
    _close(ent, rent, 0.03, "entropy")
    for name, g, rg, src in zip(("hidden", "weight", "bias"), grads, rgrads, (hidden, weight, bias)):
        assert g.dtype == dtype, name
        _close(g, rg, 0.05, f"grad {name}")
    # And no worse than materialising the logits in `dtype` (the usual lm_head + log_softmax path).
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    mlp, ment = token_logprobs_entropy_reference(torch.nn.functional.linear(*leaves), labels, temperature=0.8)
    ((mlp * grad_lp).sum() + (ment * grad_h).sum()).backward()
    for name, g, mg, rg in zip(("hidden", "weight", "bias"), grads, [t.grad for t in leaves], rgrads):
        err = float((g.double() - rg).abs().max())
        err_materialised = float((mg.double() - rg).abs().max())
        assert err <= 2.0 * err_materialised + 1e-3 * float(rg.abs().max()), name


@pytest.mark.parametrize(
    "N,V,chunk_tokens,chunk_vocab",
    [
        (13, 97, None, None),  # one tile: no staging
        (13, 97, 13, 30),      # d hidden staged over 4 slices
        (16, 97, 5, 30),       # both staged, vocabulary slices outer ([N,H] + [30,H] < [5,H] + [V,H])
        (16, 12, 4, 5),        # both staged, token chunks outer ([4,H] + [V,H] < [N,H] + [5,H])
        (13, 97, 5, None),     # d W staged over token chunks
    ],
)
def test_bf16_torch_backend(N, V, chunk_tokens, chunk_vocab):
    _low_precision_case(torch.bfloat16, "torch", N, V, chunk_tokens, chunk_vocab)


@requires_triton
def test_bf16_triton_backend():
    _low_precision_case(torch.bfloat16, "triton", 16, 97, 5, 30, H=40)


def test_fp16_torch_backend():
    _low_precision_case(torch.float16, "torch", 13, 97, 4, 30)


# ----------------------------------------------------------------------------------------------
# Partial gradients, no-grad path, empty input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_some_inputs_require_grad(which):
    hidden, weight, bias, labels = _inputs()
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    lp, ent = linear_logprobs_entropy(h, w, labels, bias, chunk_tokens=5, chunk_vocab=30, backend="torch")
    (lp.sum() + ent.sum()).backward()
    hd = hidden.double().requires_grad_(which == "hidden")
    wd = weight.double().requires_grad_(which == "weight")
    rlp, rent = linear_logprobs_entropy_reference(hd, wd, labels, bias)
    (rlp.sum() + rent.sum()).backward()
    got, want = (h.grad, hd.grad) if which == "hidden" else (w.grad, wd.grad)
    _close(got, want, 1e-5, f"grad {which}")
    assert (h.grad is None) == (which != "hidden") and (w.grad is None) == (which != "weight")


def test_no_grad_path_matches_autograd_path():
    hidden, weight, bias, labels = _inputs()
    with torch.no_grad():
        lp0, ent0 = linear_logprobs_entropy(hidden.requires_grad_(), weight, labels, bias, chunk_vocab=30)
    lp1, ent1 = linear_logprobs_entropy(hidden, weight, labels, bias, chunk_vocab=30)
    assert not lp0.requires_grad and lp1.requires_grad
    torch.testing.assert_close(lp0, lp1, rtol=0, atol=0)
    torch.testing.assert_close(ent0, ent1, rtol=0, atol=0)


def test_empty_input():
    weight = torch.randn(97, 24, requires_grad=True)
    hidden = torch.randn(0, 24, requires_grad=True)
    lp, ent = linear_logprobs_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 24) and (weight.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# Tile planning and the workspace bound
# ----------------------------------------------------------------------------------------------
def test_default_tiles_for_the_gpu_target_fit_the_budget():
    # H=4096, V=131072, N=8192 bf16 on CUDA: all tokens x 32768-wide slices = exactly 512 MiB.
    rows, cols = ls._plan_tiles(8192, 131072, 2, True, ls.DEFAULT_WORKSPACE_BYTES_CUDA, None, None)
    assert (rows, cols) == (8192, 32768)
    # fp32: full-vocabulary rows, token chunks.
    rows, cols = ls._plan_tiles(8192, 131072, 4, False, ls.DEFAULT_WORKSPACE_BYTES_CUDA, None, None)
    assert cols == 131072 and rows * cols * 4 <= ls.DEFAULT_WORKSPACE_BYTES_CUDA and rows >= 128


@pytest.mark.parametrize("n,v,elem,low", [(7, 50, 4, False), (100_000, 151_936, 2, True), (64, 10**7, 4, False),
                                          (300_000, 32_000, 2, True), (1, 1, 2, True)])
def test_planned_tiles_respect_budget(n, v, elem, low):
    budget = 1 << 20
    rows, cols = ls._plan_tiles(n, v, elem, low, budget, None, None)
    assert 1 <= rows <= n and 1 <= cols <= v
    assert rows * cols * elem <= max(budget, elem)


def test_backward_staging_picks_the_smaller_loop_order():
    # GPU target, default tiles: one token chunk -> d W written per slice, d hidden staged [N, H].
    assert ls._staging_plan(8192, 131072, 8192, 32768, True, True, True)[1:] == (8192, 0)
    # Full-vocabulary rows: d hidden needs no staging, d W is staged [V, H].
    assert ls._staging_plan(8192, 1000, 512, 1000, True, True, True) == (False, 0, 1000)
    # Both staged: vocabulary outer ([N + cols] rows) vs token outer ([rows + V] rows).
    assert ls._staging_plan(16, 97, 5, 30, True, True, True) == (True, 16, 30)
    assert ls._staging_plan(16, 12, 4, 5, True, True, True) == (False, 4, 12)
    # Frozen weight: only d hidden, staged per token chunk.
    assert ls._staging_plan(16, 97, 5, 30, True, True, False) == (False, 5, 0)
    # fp32 / fp64 accumulate in the gradients themselves.
    assert ls._staging_plan(16, 97, 5, 30, False, True, True)[1:] == (0, 0)


def test_explicit_chunk_sizes_are_used():
    assert ls._plan_tiles(100, 1000, 4, False, 1 << 30, 7, None) == (7, 1000)
    assert ls._plan_tiles(100, 1000, 4, False, 4000 * 4, None, 300) == (13, 300)
    assert ls._plan_tiles(100, 1000, 4, False, 1 << 30, 500, 5000) == (100, 1000)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (allocations and views alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk_tokens,chunk_vocab,dtype", [(5, 30, torch.float32), (5, None, torch.bfloat16),
                                                            (16, 30, torch.bfloat16)])
def test_no_tensor_of_n_by_v_is_ever_made(chunk_tokens, chunk_vocab, dtype):
    # H is small so that N * V (1552) exceeds every legitimate size: V * H (776) for d W, N * H,
    # and a tile of chunk_tokens x (chunk_vocab + 16).
    hidden, weight, bias, labels = _inputs(N=16, H=8, V=97, dtype=dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as mode:
        lp, ent = linear_logprobs_entropy(h, w, labels, bias, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                                          backend="torch")
        (lp.sum() + ent.sum()).backward()
    tile = chunk_tokens * ((chunk_vocab + 16) if chunk_vocab else 97)
    assert 0 < mode.largest <= max(tile, 97 * 8) < 16 * 97
    # The check itself works: materialising the logits trips it.
    with _LargestTensor() as mode:
        torch.nn.functional.linear(hidden, weight)
    assert mode.largest == 16 * 97


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    hidden, weight, bias, labels = _inputs()
    op = linear_logprobs_entropy
    with pytest.raises(ValueError, match="hidden"):
        op(hidden[0], weight, labels[0])
    with pytest.raises(TypeError, match="hidden"):
        op(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="weight"):
        op(hidden, weight.unsqueeze(0), labels)
    with pytest.raises(ValueError, match="weight"):
        op(hidden, weight[:, :-1], labels)  # H mismatch
    with pytest.raises(ValueError, match="weight"):
        op(hidden, weight.to("meta"), labels)  # device mismatch
    with pytest.raises(ValueError, match="bias"):
        op(hidden, weight, labels, bias[:-1])
    # Mixed hidden / weight / bias dtypes are promoted, not refused (test_mixed_dtypes_promote).
    with pytest.raises(TypeError, match="labels"):
        op(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="labels"):
        op(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        op(hidden, weight, labels.to("meta"))
    for bad in (97, -5):
        bad_labels = labels.clone()
        bad_labels[1] = bad
        with pytest.raises(ValueError, match="labels"):
            op(hidden, weight, bad_labels)
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            op(hidden, weight, labels, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        op(hidden, weight, labels, temperature="1")
    with pytest.raises(ValueError, match="chunk_tokens"):
        op(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(TypeError, match="chunk_vocab"):
        op(hidden, weight, labels, chunk_vocab=2.5)
    with pytest.raises(ValueError, match="backend"):
        op(hidden, weight, labels, backend="cuda")
    with pytest.raises(TypeError, match="weight"):
        op(hidden, weight.tolist(), labels)


# ----------------------------------------------------------------------------------------------
# whole -inf vocabulary slices (a masking bias), autocast, mixed dtypes, out_dtype
# ----------------------------------------------------------------------------------------------
def _analytic_grads(hidden, weight, labels, bias, grad_lp, grad_h, temperature):
    """float64 closed form (autograd through log_softmax gives NaN at -inf logits): d logits =
    (g_lp (onehot - p) - g_H p (log p + H)) / T with p log p = 0 where p = 0, then through the GEMM."""
    h64, w64 = hidden.double(), weight.double()
    logp = torch.log_softmax((h64 @ w64.t() + bias.double()) / temperature, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, 0.0)
    ent = -plogp.sum(-1, keepdim=True)
    valid = (labels != -100).double().unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), p.shape[-1]).double()
    g = grad_lp.double().unsqueeze(-1) * (onehot - p) - grad_h.double().unsqueeze(-1) * (plogp + p * ent)
    dlogits = g * valid / temperature
    return dlogits @ w64, dlogits.t() @ h64


def _masked_head(V, n_masked, dtype, N=8, H=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 2).to(dtype)
    bias = torch.zeros(V)
    bias[:n_masked] = -float("inf")  # e.g. tokens a constrained decoder may not emit
    labels = torch.randint(n_masked, V, (N,), generator=gen)
    labels[-1] = -100
    return hidden, weight, bias.to(dtype), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["bf16_default_tiles", "fp32_chunk_vocab_4"])
def test_whole_minus_inf_vocabulary_slices(backend, case, monkeypatch):
    if case == "bf16_default_tiles":
        # The default bf16 plan (all tokens x vocabulary slices) with a budget that makes the slices
        # 8192 wide, as at full scale (N = 4096, 64 MiB): the first slice is entirely -inf.
        hidden, weight, bias, labels = _masked_head(8192 * 2 + 100, 8192, torch.bfloat16)
        monkeypatch.setattr(ls, "DEFAULT_WORKSPACE_BYTES_CPU", hidden.shape[0] * 8192 * 2)
        n, v = hidden.shape[0], weight.shape[0]
        assert ls._plan_tiles(n, v, 2, True, ls.DEFAULT_WORKSPACE_BYTES_CPU, None, None) == (n, 8192)
        kw, rel = {}, 1e-2
    else:
        hidden, weight, bias, labels = _masked_head(37, 8, torch.float32)
        kw, rel = dict(chunk_vocab=4, chunk_tokens=3), 1e-5
    grad_lp, grad_h = torch.randn(labels.shape), torch.randn(labels.shape)
    lp, ent, grads = _run(hidden, weight, labels, bias, grad_lp, grad_h, temperature=0.8, backend=backend, **kw)
    ref_lp, ref_ent = linear_logprobs_entropy_reference(hidden, weight, labels, bias, temperature=0.8)
    ref_grads = _analytic_grads(hidden, weight, labels, bias, grad_lp, grad_h, 0.8)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    _close(lp, ref_lp, rel, "logprobs")
    _close(ent, ref_ent, rel, "entropy")
    for got, want, name in zip(grads[:2], ref_grads, ("hidden", "weight")):
        assert torch.isfinite(got).all(), name
        _close(got, want, 3e-2 if hidden.dtype == torch.bfloat16 else 1e-5, name)


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    hidden, weight, bias, labels = _inputs(N=11, H=32, V=200)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = linear_logprobs_entropy(*leaves[:2], labels, leaves[2], temperature=0.9, chunk_vocab=64)
    assert lp.dtype == ent.dtype == torch.float32  # statistics in fp32
    # Exactly the op on bf16 copies: the GEMMs ran in bf16, nothing was cast back up in between.
    same = linear_logprobs_entropy(hidden.bfloat16(), weight.bfloat16(), labels, bias.bfloat16(), temperature=0.9,
                                   chunk_vocab=64)
    assert torch.equal(lp, same[0]) and torch.equal(ent, same[1])
    fp32 = linear_logprobs_entropy(hidden, weight, labels, bias, temperature=0.9)
    assert not torch.equal(lp, fp32[0])
    ref_lp, ref_ent = linear_logprobs_entropy_reference(hidden, weight, labels, bias, temperature=0.9)
    _close(lp, ref_lp, 2e-2, "logprobs")
    (lp.sum() + ent.sum()).backward()
    assert [t.grad.dtype for t in leaves] == [torch.float32] * 3  # gradients in the inputs' dtypes
    # fp64 inputs are not autocast (as nn.Linear): computed and returned in fp64.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp64, _ = linear_logprobs_entropy(hidden.double(), weight.double(), labels, bias.double())
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64, linear_logprobs_entropy_reference(hidden, weight, labels, bias)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h_dtype,w_dtype,want", [(torch.bfloat16, torch.float32, torch.float32),
                                                  (torch.float32, torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.float16, torch.float32),
                                                  (torch.float64, torch.float32, torch.float64)])
def test_mixed_dtypes_promote(h_dtype, w_dtype, want):
    hidden, weight, bias, labels = _inputs(N=9, H=16, V=70)
    hidden, weight = hidden.to(h_dtype).requires_grad_(), weight.to(w_dtype).requires_grad_()
    lp, ent = linear_logprobs_entropy(hidden, weight, labels, bias)  # bias fp32
    cast = [t.detach().to(want) for t in (hidden, weight, bias)]
    same = linear_logprobs_entropy(cast[0], cast[1], labels, cast[2])
    assert torch.equal(lp, same[0]) and torch.equal(ent, same[1])
    assert lp.dtype == (torch.float64 if want == torch.float64 else torch.float32)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == h_dtype and weight.grad.dtype == w_dtype


def test_out_dtype_and_float64():
    hidden, weight, bias, labels = _inputs(N=7, H=12, V=50)
    lp, ent = linear_logprobs_entropy(hidden.bfloat16(), weight.bfloat16(), labels, bias.bfloat16(), out_dtype=None)
    assert lp.dtype == ent.dtype == torch.bfloat16
    lp32, _ = linear_logprobs_entropy(hidden.bfloat16(), weight.bfloat16(), labels, bias.bfloat16())
    assert torch.equal(lp, lp32.bfloat16())
    # fp64 in, fp64 out, to fp64 rounding (also with vocabulary slices).
    h64, w64, b64 = hidden.double(), weight.double(), bias.double()
    ref_lp, ref_ent = linear_logprobs_entropy_reference(h64, w64, labels, b64)
    for kw in ({}, dict(chunk_vocab=16, chunk_tokens=4)):
        lp64, ent64 = linear_logprobs_entropy(h64, w64, labels, b64, **kw)
        assert lp64.dtype == torch.float64
        torch.testing.assert_close(lp64, ref_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent64, ref_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrow_label_dtypes_with_a_large_vocabulary(label_dtype):
    hidden, weight, bias, _ = _inputs(N=3, H=8, V=300)
    labels = torch.tensor([5, 120, 7], dtype=label_dtype)  # V = 300 does not fit in int8 / uint8
    lp, _ = linear_logprobs_entropy(hidden, weight, labels, bias)
    ref_lp, _ = linear_logprobs_entropy_reference(hidden, weight, labels.long(), bias)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
