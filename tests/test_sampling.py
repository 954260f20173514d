"""keyed_sample: keyed Gumbel-max sampling, the fused kernel vs the plain-torch reference.

The Triton kernel runs under the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest). Its
hash is checked bit for bit; its tokens are checked against the reference exactly, except on rows whose
two best perturbed scores are within a few ulp (numpy's log vs torch's, x * (1/T) vs x / T), where it
must still pick a token whose reference score is within that tolerance of the best.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_triton

from vrpo_fast.ops import keyed_sample, keyed_sample_reference
from vrpo_fast.ops import sampling as sampling_mod
from vrpo_fast.ops._random import _srl, keyed_gumbel, keyed_hash

# The interpreter's numpy warns at log(-0.0) and at NaN
# (-inf + inf in the add), which the extreme-uniform case below reaches.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in add:RuntimeWarning")]

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
BIG_KEYS = torch.tensor([0, 1, 7, 2**40 + 3, 2**62 + 11, 2**63 - 1, 123456789, 2**41])


def _scores(logits, keys, seed, position, temperature):
    """The reference's perturbed scores, fp32 [B, V]."""
    vocab = torch.arange(logits.shape[1])[None, :]
    return logits.float() / temperature + keyed_gumbel(seed, keys.long()[:, None], position, vocab)


def _assert_tokens(tokens, logits, keys, *, seed, position, temperature, max_near_ties=1):
    """Exactly the reference's tokens, except on near-tied rows (few), where the chosen token must still
    be a maximiser of the reference scores within the tolerance."""
    s = _scores(logits, keys, seed, position, temperature)
    ref = s.argmax(-1)
    assert tokens.dtype == torch.int64 and tokens.shape == ref.shape
    top2 = s.topk(min(2, s.shape[1]), dim=-1).values
    top1 = top2[:, 0]
    # a few ulp of the winning score, plus the 1-ulp differences of g = -log(-log u) (|g| <= ~17)
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps * top1.abs().nan_to_num(0.0, 0.0, 0.0)
    gap = (top2[:, 0] - top2[:, 1]) if s.shape[1] > 1 else torch.full_like(top1, math.inf)
    near = gap.nan_to_num(math.inf) <= tol
    assert int(near.sum()) <= max_near_ties, f"{int(near.sum())} near-tied rows out of {len(near)}"
    assert torch.equal(tokens[~near], ref[~near])
    picked = s.gather(1, tokens[:, None]).squeeze(1)
    assert bool((picked[near] >= top1[near] - tol[near]).all())


def _keys(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (n,), generator=g)


# ----------------------------------------------------------------------------------------------
# the kernel's hash
# ----------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("seed,position,vocab", [(0, 0, 37), (42, 7, 1030), (2**63 - 1, 2**40 + 5, 5)])
def test_kernel_hash_is_bit_identical_to_keyed_hash(seed, position, vocab):
    from vrpo_fast.kernels.sampling import keyed_hash_rows

    keys = torch.cat([BIG_KEYS, torch.tensor([-1, -(2**63)])])  # any int64 pattern is a key
    got = keyed_hash_rows(keys, seed=seed, position=position, vocab_size=vocab)
    want = keyed_hash(seed, keys[:, None], position, torch.arange(vocab)[None, :])
    assert torch.equal(got, want)
    # int32 keys enter the hash as their int64 values
    small = torch.tensor([0, 5, -3, 2**31 - 1], dtype=torch.int32)
    assert torch.equal(keyed_hash_rows(small, seed=seed, position=position, vocab_size=vocab),
                       keyed_hash(seed, small.long()[:, None], position, torch.arange(vocab)[None, :]))


# ----------------------------------------------------------------------------------------------
# tokens vs the reference
# ----------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,temperature,num_chunks", [(1000, 0.7, None), (4099, 1.3, 3), (4099, 1.0, None)])
def test_triton_matches_reference(dtype, vocab, temperature, num_chunks):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * 4).to(dtype)
    keys = _keys(6, vocab)
    for position in (0, 3, 2**40):
        tok = keyed_sample(logits, keys, seed=11, position=position, temperature=temperature, backend="triton",
                           _num_chunks=num_chunks)
        _assert_tokens(tok, logits, keys, seed=11, position=position, temperature=temperature)


@requires_triton
@pytest.mark.parametrize("num_chunks", [None, 2, 5])
def test_triton_single_row_and_tiny_vocab(num_chunks):
    logits = torch.randn(1, 3000)
    keys = torch.tensor([2**45 + 1])
    for position in range(4):
        tok = keyed_sample(logits, keys, seed=3, position=position, temperature=0.9, backend="triton",
                           _num_chunks=num_chunks)
        _assert_tokens(tok, logits, keys, seed=3, position=position, temperature=0.9)
    one = torch.randn(3, 1)  # V = 1: always token 0
    assert keyed_sample(one, BIG_KEYS[:3], seed=1, position=0, backend="triton").tolist() == [0, 0, 0]


@requires_triton
def test_triton_strided_logits_and_int32_keys():
    base = torch.randn(10, 2 * 700)
    logits = base[::2, ::2]  # row stride 2800, column stride 2: no copy needed
    keys64 = torch.tensor([5, 9, 2**50, 0, 77])
    keys32 = keys64.clamp(max=2**31 - 1).int()
    tok = keyed_sample(logits, keys64, seed=8, position=1, temperature=1.3, backend="triton")
    _assert_tokens(tok, logits, keys64, seed=8, position=1, temperature=1.3)
    tok32 = keyed_sample(logits, keys32, seed=8, position=1, temperature=1.3, backend="triton")
    assert torch.equal(tok32, keyed_sample(logits.contiguous(), keys32.long(), seed=8, position=1,
                                           temperature=1.3, backend="triton"))


def _extreme_logits(vocab=1000):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, vocab, generator=g) * 3
    ninf = -math.inf
    x[0, ::3] = ninf  # -inf entries among finite ones
    x[1] = ninf
    x[1, 517] = -50.0  # the only finite entry
    x[2] = ninf
    x[2, vocab - 1] = -1e30  # the last entry is the only one left (an all -inf row raises: see below)
    x[3] = torch.where(torch.rand(vocab, generator=g) < 0.5, 1e4, -1e4)
    x[4] = -1e4
    x[4, [10, 600, 999]] = 1e4  # one of three, by the noise
    x[5, [40, 41, 900]] = math.inf  # +inf beats everything; ties -> lowest index
    x[6] = 1e4
    x[6, 5] = ninf
    return x


@pytest.mark.parametrize("backend,num_chunks", [("torch", None), pytest.param("triton", None, marks=requires_triton),
                                                pytest.param("triton", 4, marks=requires_triton)])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_extreme_and_infinite_logits(backend, temperature, num_chunks):
    x = _extreme_logits()
    keys = _keys(7, 5)
    for dtype in (torch.float32, torch.bfloat16):
        logits = x.to(dtype)
        tok = keyed_sample(logits, keys, seed=2, position=9, temperature=temperature, backend=backend,
                           _num_chunks=num_chunks)
        # 1e4-scale rows round the noise to ~1e-3 steps, so exact ties are common there: check those
        # rows by the near-maximiser rule only, the others exactly.
        _assert_tokens(tok, logits, keys, seed=2, position=9, temperature=temperature, max_near_ties=3)
        assert logits[0, tok[0]] > -math.inf
        assert tok[1].item() == 517 and tok[2].item() == logits.shape[1] - 1 and tok[5].item() == 40
        assert tok[4].item() in (10, 600, 999) and tok[6].item() != 5
        assert logits[3, tok[3]] == logits[3].max()  # one of the +1e4 entries (9984 in bf16)


@pytest.mark.parametrize("backend,num_chunks", [("torch", None), pytest.param("triton", None, marks=requires_triton),
                                                pytest.param("triton", 2, marks=requires_triton)])
def test_ties_go_to_the_lowest_index_across_blocks(backend, num_chunks):
    # 1100 and 2124 share a lane of the kernel's 1024-wide blocks; 76 too.
    x = torch.randn(4, 3000)
    x[0, [2124, 1100]] = math.inf
    x[1, [2124, 1100, 76]] = math.inf
    x[2, [2999, 2124, 1100]] = math.nan
    x[3] = -math.inf
    x[3, 2124] = 0.0
    tok = keyed_sample(x, _keys(4), seed=1, position=2, temperature=1.3, backend=backend, _num_chunks=num_chunks)
    assert tok.tolist() == [1100, 76, 1100, 2124]
    assert torch.equal(tok, keyed_sample_reference(x, _keys(4), seed=1, position=2, temperature=1.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_follow_argmax_or_raise(backend):
    logits = torch.randn(3, 300)
    logits[1, 9] = math.nan
    logits[1, 200] = math.nan
    logits[2, 0] = math.inf
    logits[2, 7] = math.nan  # NaN beats +inf, as in torch.argmax
    keys = _keys(3)
    tok = keyed_sample(logits, keys, seed=0, position=0, backend=backend)
    ref = keyed_sample_reference(logits, keys, seed=0, position=0)
    assert tok[1].item() == ref[1].item() == 9 and tok[2].item() == ref[2].item() == 7
    with pytest.raises(ValueError, match="logits contains NaN"):
        keyed_sample(logits, keys, seed=0, position=0, backend=backend, check_nan=True)
    keyed_sample(logits.nan_to_num(0.0), keys, seed=0, position=0, backend=backend, check_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rows_token_does_not_depend_on_the_other_rows(backend):
    logits = torch.randn(8, 2500)
    keys = _keys(8, 3)
    kw = dict(seed=5, position=4, temperature=0.8, backend=backend)
    together = keyed_sample(logits, keys, **kw)
    alone = torch.cat([keyed_sample(logits[i:i + 1], keys[i:i + 1], **kw) for i in range(8)])
    perm = torch.randperm(8)
    permuted = keyed_sample(logits[perm], keys[perm], **kw)
    assert torch.equal(together, alone) and torch.equal(together[perm], permuted)
    if backend == "triton":  # nor on how the vocabulary is split over programs
        for chunks in (2, 3):
            assert torch.equal(together, keyed_sample(logits, keys, _num_chunks=chunks, **kw))
    # the token is a function of the key: equal keys and logits give equal tokens, others differ
    same = keyed_sample(logits[:1].expand(64, -1), torch.full((64,), 3), **kw)
    assert (same == same[0]).all()
    varied = keyed_sample(logits[:1].expand(64, -1), torch.arange(64), **kw)
    assert len(set(varied.tolist())) > 20


# (seed, key, position, v) whose hash has its top 24 bits all set: the fp32 uniform
# (bits + 0.5) * 2**-24 of vrpo_fast.ops._random rounds to exactly 1.0 there (2**24 - 0.5 needs 25
# significant bits), so that entry's Gumbel is +inf. Such an element turns up in ~V / 2**24 of all
# sampling steps (~0.9% at V = 151936).
_EXTREME = dict(seed=2, key=8309, position=9, v=18)


def _extreme_row_logits():
    seed, key, position, v = _EXTREME.values()
    assert _srl(keyed_hash(seed, key, position, v), 40).item() == 2**24 - 1
    logits = torch.randn(2, 512)
    logits[1, v] = -math.inf
    return logits, torch.tensor([key, key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_chunks", [None, 3])
def test_matches_reference_where_the_uniform_is_extreme(backend, num_chunks):
    logits, keys = _extreme_row_logits()
    kw = dict(seed=_EXTREME["seed"], position=_EXTREME["position"], temperature=0.7)
    tok = keyed_sample(logits, keys, backend=backend, _num_chunks=num_chunks, **kw)
    assert torch.equal(tok, keyed_sample_reference(logits, keys, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_minus_inf_logit_is_never_chosen_even_at_the_extreme_uniform(backend):
    logits, keys = _extreme_row_logits()
    tok = keyed_sample(logits, keys, seed=_EXTREME["seed"], position=_EXTREME["position"], backend=backend)
    assert tok[1].item() != _EXTREME["v"]


# ----------------------------------------------------------------------------------------------
# distribution and the CPU path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_frequencies_match_softmax_over_temperature(temperature):
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5, -math.inf, -3.0]])
    n = 20000
    p = torch.softmax(logits[0].double() / temperature, -1)
    for keys, position in ((torch.arange(n), 3), (torch.full((n,), 7), None)):
        if position is None:  # one key, many positions: successive steps are independent draws too
            tok = torch.cat([keyed_sample(logits, keys[:1], seed=9, position=t, temperature=temperature)
                             for t in range(2000)])
        else:
            tok = keyed_sample(logits.expand(n, -1), keys, seed=9, position=position, temperature=temperature)
        m = tok.numel()
        counts = torch.bincount(tok, minlength=7).double()
        assert counts[5] == 0  # -inf is never drawn
        sd = torch.sqrt(m * p * (1 - p)).clamp_min(1.0)
        assert bool(((counts - m * p).abs() <= 5 * sd).all()), (counts, m * p)
    # and the chi-square statistic of the big sample is plausible (6 dof: 99.99% quantile ~ 27.9)
    tok = keyed_sample(logits.expand(n, -1), torch.arange(n) + 10**6, seed=1, position=0, temperature=temperature)
    counts = torch.bincount(tok, minlength=7).double()
    live = p > 0
    chi2 = ((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum().item()
    assert chi2 < 27.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_default_backend_equals_reference_exactly(dtype, monkeypatch):
    logits = (torch.randn(9, 1000) * 5).to(dtype)
    keys = _keys(9, 2)
    ref = keyed_sample_reference(logits, keys, seed=4, position=6, temperature=0.7)
    assert torch.equal(keyed_sample(logits, keys, seed=4, position=6, temperature=0.7), ref)
    monkeypatch.setattr(sampling_mod, "_TORCH_BLOCK_ELEMS", 2000)  # rows in blocks of 2
    assert torch.equal(keyed_sample(logits, keys, seed=4, position=6, temperature=0.7), ref)


def test_matches_keyed_sampler_of_the_rollout():
    from vrpo_fast.rollout import KeyedSampler

    scores = torch.randn(5, 400)
    keys = _keys(5, 8)
    sampler = KeyedSampler(13, keys, prompt_length=6, temperature=0.9)
    for step in range(3):
        input_ids = torch.zeros(5, 6 + step, dtype=torch.long)
        want = sampler(input_ids, scores).argmax(-1)
        assert torch.equal(keyed_sample(scores, keys, seed=13, position=step, temperature=0.9), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = keyed_sample(torch.empty(0, 10), torch.empty(0, dtype=torch.long), seed=0, position=0, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------
def test_argument_errors():
    x = torch.randn(3, 10)
    k = torch.arange(3)
    kw = dict(seed=0, position=0)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        keyed_sample([[1.0]], k, **kw)
    with pytest.raises(TypeError, match="logits must have dtype"):
        keyed_sample(torch.zeros(3, 10, dtype=torch.long), k, **kw)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        keyed_sample(torch.randn(10), k[:1], **kw)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        keyed_sample(torch.randn(2, 3, 10), k, **kw)
    with pytest.raises(ValueError, match="non-empty last"):
        keyed_sample(torch.randn(3, 0), k, **kw)
    with pytest.raises(TypeError, match="keys must have dtype"):
        keyed_sample(x, k.float(), **kw)
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        keyed_sample(x, [0, 1, 2], **kw)
    with pytest.raises(ValueError, match="keys must have the leading shape of logits"):
        keyed_sample(x, k[:, None], **kw)
    with pytest.raises(ValueError, match="keys must have the leading shape of logits"):
        keyed_sample(x, k[:2], **kw)
    with pytest.raises(ValueError, match="keys must be on the same device as logits"):
        keyed_sample(x, k.to("meta"), **kw)
    for bad in (0, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            keyed_sample(x, k, temperature=bad, **kw)
    for bad in ("1", True, None):
        with pytest.raises(TypeError, match="temperature must be a float"):
            keyed_sample(x, k, temperature=bad, **kw)
    for name in ("seed", "position"):
        for bad in (-1, 2**63):
            with pytest.raises(ValueError, match=rf"{name} must be in \[0, 2\*\*63\)"):
                keyed_sample(x, k, **{**kw, name: bad})
        for bad in (1.5, True, "3", None):
            with pytest.raises(TypeError, match=f"{name} must be an int"):
                keyed_sample(x, k, **{**kw, name: bad})
    with pytest.raises(ValueError, match="backend must be one of"):
        keyed_sample(x, k, backend="cuda", **kw)
    # integer tensors / ints are accepted where ints are expected
    keyed_sample(x, k, seed=torch.tensor(3), position=2, temperature=2)


@requires_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        keyed_sample(torch.randn(2, 5), torch.arange(2), seed=0, position=0, backend="triton")


# ----------------------------------------------------------------------------------------------
# the real GPU compile path (no GPU needed): the kernels build for sm_90, with precise logs,
# logical shifts only and no FMA contraction of x * (1/T) + g
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vrpo_fast.kernels import sampling as ks
sig = dict(logits_ptr="*bf16", keys_ptr="*i64", tokens_ptr="*i64", part_val_ptr="*fp32", part_idx_ptr="*i32",
           V="i32", stride_row="i64", stride_v="constexpr", seed_h="i64", position_h="i64",
           inv_temperature="fp32", chunk_len="i32", n_chunks="i32", SCALE="constexpr", PRECISE_LOG="constexpr",
           WRITE_TOKEN="constexpr", BLOCK_V="constexpr", NO_INDEX="constexpr")
const = dict(stride_v=1, SCALE=True, PRECISE_LOG=True, WRITE_TOKEN=False, BLOCK_V=1024, NO_INDEX=2**31 - 1)
target = GPUTarget("cuda", 90, 32)
k = triton.compile(ASTSource(ks._keyed_sample_kernel, sig, constexprs=const), target=target,
                   options={"enable_fp_fusion": False, "num_warps": 4})
sig2 = dict(part_val_ptr="*fp32", part_idx_ptr="*i32", tokens_ptr="*i64", n_chunks="i32", BLOCK_C="constexpr",
            NO_INDEX="constexpr")
r = triton.compile(ASTSource(ks._reduce_chunks_kernel, sig2, constexprs=dict(BLOCK_C=256, NO_INDEX=2**31 - 1)),
                   target=target)
ptx = k.asm["ptx"]
assert len(k.asm["cubin"]) > 0 and len(r.asm["cubin"]) > 0
assert "lg2.approx" not in ptx, "fast log used"
assert "shr.s64" not in ptx and "shr.u64" in ptx, "arithmetic shift in the hash"
assert "mul.lo.s64" in ptx
assert "fma.rn.f32" not in ptx  # only libdevice's explicit (ftz) fmas, no contraction of our mul + add
print("ok")
"""


@requires_triton
def test_kernels_compile_for_sm90_with_precise_log():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:  # pragma: no cover
        pytest.skip("no ptxas in this triton install")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("backend,num_chunks", [("torch", None), pytest.param("triton", None, marks=requires_triton),
                                                pytest.param("triton", 3, marks=requires_triton)])
def test_an_all_minus_inf_row_raises(backend, num_chunks):
    """Nothing can be drawn from a row whose logits are all -inf: ValueError naming the row (checked
    once from the drawn tokens), not a silent token 0."""
    x = torch.randn(4, 3000)
    x[2] = -math.inf
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        keyed_sample(x, _keys(4), seed=1, position=0, backend=backend, _num_chunks=num_chunks)
    x[2, 2999] = -1e38  # one finite entry left: that is the token
    assert keyed_sample(x, _keys(4), seed=1, position=0, backend=backend, _num_chunks=num_chunks)[2] == 2999
    x[2, 2999] = -math.inf
    x[2, 5] = math.nan  # NaN follows torch.argmax (or check_nan=True), not the -inf rule
    assert keyed_sample(x, _keys(4), seed=1, position=0, backend=backend, _num_chunks=num_chunks)[2] == 5
    with pytest.raises(ValueError, match="NaN"):
        keyed_sample(x, _keys(4), seed=1, position=0, backend=backend, check_nan=True)
