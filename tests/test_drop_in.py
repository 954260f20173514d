"""The drop-ins in ``examples/`` give what TRL, verl and OpenRLHF compute.

Each framework's semantics are re-implemented here in a few lines of plain PyTorch (our own code,
written from the upstream file named in the comment), evaluated in float64 where the point is the
exact function, and in the framework's own dtype where the point is "no worse than upstream".
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types
import zlib

import pytest
import torch
import torch._dynamo

from conftest import requires_triton
from vrpo_fast.ops import gae, linear_logprobs_entropy

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importable by name (torch.compile looks functions' modules up)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trl_drop():
    return _load_example("drop_in_trl")


@pytest.fixture(scope="module")
def verl_drop():
    return _load_example("drop_in_verl")


@pytest.fixture(scope="module")
def openrlhf_drop():
    return _load_example("drop_in_openrlhf_critic")


# ================================================================================================
# TRL semantics (huggingface/trl, trl/trainer/utils.py, v1.16): selective_log_softmax(logits, index,
# temperature, row_mask) = log_softmax(logits / T) gathered at index, in the logits' dtype, 0 where
# row_mask == 0; entropy_from_logits(logits) = -sum p log p of every row, in the logits' dtype;
# selective_log_softmax_and_entropy additionally zeroes the entropy where row_mask == 0. The GRPO
# trainer (trl/trainer/grpo_trainer.py) divides the logits by the temperature, in their dtype.
# ================================================================================================
def trl_logps(logits, index, temperature=1.0, row_mask=None):
    scaled = logits / temperature if temperature != 1.0 else logits
    out = torch.log_softmax(scaled, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def trl_entropy(logits, temperature=1.0):
    scaled = logits / temperature if temperature != 1.0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


TRL_SHAPES = [(1, 1, 5), (3, 7, 33), (2, 5, 1000)]


@pytest.mark.parametrize("shape", TRL_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_trl_logps_and_entropy_values(trl_drop, shape, temperature, dtype):
    B, T, V = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, temperature, dtype)).encode()))
    logits = (2.5 * torch.randn(B, T, V, generator=gen)).to(dtype)
    index = torch.randint(0, V, (B, T), generator=gen)

    logps = trl_drop.selective_log_softmax(logits, index, temperature)
    entropy = trl_drop.entropy_from_logits(logits, temperature=temperature)
    both_lp, both_h = trl_drop.selective_log_softmax_and_entropy(logits, index, temperature=temperature)
    assert logps.dtype == entropy.dtype == torch.float32
    assert logps.shape == entropy.shape == (B, T)

    # The exact function of the given input values (what TRL computes, without its rounding).
    exact_lp = trl_logps(logits.double(), index, temperature)
    exact_h = trl_entropy(logits.double(), temperature)
    for got, want in ((logps, exact_lp), (both_lp, exact_lp), (entropy, exact_h), (both_h, exact_h)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)

    if dtype != torch.float32:
        # TRL itself in this dtype (the division and the output are rounded): we agree to that
        # rounding, and are never further from the exact value than TRL is.
        native_lp = trl_logps(logits, index, temperature).double()
        native_h = trl_entropy(logits, temperature).double()
        tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=3e-3, atol=6e-3)
        torch.testing.assert_close(logps.double(), native_lp, **tol)
        torch.testing.assert_close(entropy.double(), native_h, **tol)
        assert (logps.double() - exact_lp).abs().max() <= (native_lp - exact_lp).abs().max() + 1e-6
        assert (entropy.double() - exact_h).abs().max() <= (native_h - exact_h).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_trl_gradients(trl_drop, dtype, temperature):
    B, T, V = 3, 6, 129
    gen = torch.Generator().manual_seed(7)
    base = (2.0 * torch.randn(B, T, V, generator=gen)).to(dtype)
    index = torch.randint(0, V, (B, T), generator=gen)
    w_lp = torch.randn(B, T, generator=gen)
    w_h = torch.randn(B, T, generator=gen)

    logits = base.clone().requires_grad_(True)
    logps, entropy = trl_drop.selective_log_softmax_and_entropy(logits, index, temperature=temperature)
    ((w_lp * logps).sum() + (w_h * entropy).sum()).backward()

    ref = base.double().requires_grad_(True)
    ((w_lp.double() * trl_logps(ref, index, temperature)).sum()
     + (w_h.double() * trl_entropy(ref, temperature)).sum()).backward()

    assert logits.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-3)
    torch.testing.assert_close(logits.grad.double(), ref.grad, **tol)


def test_trl_padding_and_row_mask(trl_drop):
    """Pad ids are ordinary ids to TRL (scored, masked later by the loss); row_mask rows give 0."""
    B, T, V, pad_id = 4, 9, 50, 3
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(B, T, V, generator=gen)
    lengths = torch.tensor([9, 5, 1, 7])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(0, V, (B, T), generator=gen).masked_fill(completion_mask == 0, pad_id)

    # No row_mask: every position, pads included, is scored exactly like TRL does.
    torch.testing.assert_close(trl_drop.selective_log_softmax(logits, ids).double(),
                               trl_logps(logits.double(), ids), rtol=1e-6, atol=1e-6)
    # row_mask: 0 where masked, TRL's value elsewhere; entropy_from_logits ignores any mask (as TRL's).
    lp = trl_drop.selective_log_softmax(logits, ids, 0.8, row_mask=completion_mask)
    torch.testing.assert_close(lp.double(), trl_logps(logits.double(), ids, 0.8, completion_mask), rtol=1e-6, atol=1e-6)
    assert bool((lp[completion_mask == 0] == 0).all())
    h_all = trl_drop.entropy_from_logits(logits)
    torch.testing.assert_close(h_all.double(), trl_entropy(logits.double()), rtol=1e-6, atol=1e-6)
    _, h_masked = trl_drop.selective_log_softmax_and_entropy(logits, ids, row_mask=completion_mask)
    torch.testing.assert_close(h_masked, h_all * completion_mask, rtol=1e-6, atol=1e-6)

    # Masked rows get no gradient.
    x = logits.clone().requires_grad_(True)
    lp, h = trl_drop.selective_log_softmax_and_entropy(x, ids, row_mask=completion_mask)
    (lp.sum() + h.sum()).backward()
    assert bool((x.grad[completion_mask == 0] == 0).all())
    assert bool((x.grad[completion_mask == 1] != 0).any())


def test_trl_entropy_requires_grad_flag_and_leading_dims(trl_drop):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 17, generator=gen, requires_grad=True)  # 4-D: flattened internally
    index = torch.randint(0, 17, (2, 3, 4), generator=gen)
    lp, h = trl_drop.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)  # keyword only
    assert lp.requires_grad and not h.requires_grad
    assert lp.shape == h.shape == (2, 3, 4)
    torch.testing.assert_close(lp.double(), trl_logps(logits.detach().double(), index), rtol=1e-6, atol=1e-6)
    flat = torch.randn(6, 17, generator=gen)  # [N, V] also works, as in TRL
    torch.testing.assert_close(trl_drop.entropy_from_logits(flat).double(), trl_entropy(flat.double()),
                               rtol=1e-6, atol=1e-6)


def test_trl_masked_vocabulary_entropy_is_finite(trl_drop):
    """-inf logits (a masked vocabulary): TRL's -sum p log p gives NaN (0 * -inf); ours gives the
    entropy of the remaining tokens (0 log 0 = 0). Log-probs of allowed tokens agree."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 20, generator=gen)
    logits[..., 10:] = float("-inf")
    index = torch.randint(0, 10, (2, 4), generator=gen)
    assert torch.isnan(trl_entropy(logits)).all()
    lp, h = trl_drop.selective_log_softmax_and_entropy(logits, index)
    torch.testing.assert_close(h.double(), trl_entropy(logits[..., :10].double()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp.double(), trl_logps(logits.double(), index), rtol=1e-6, atol=1e-6)


def test_trl_bad_input(trl_drop):
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="index"):
        trl_drop.selective_log_softmax(logits, torch.zeros(2, 3, 2, dtype=torch.long))  # top-K form
    with pytest.raises(ValueError, match="temperature"):
        trl_drop.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(TypeError, match="labels"):
        trl_drop.selective_log_softmax(logits, torch.zeros(2, 3))  # float ids


# TRL's fused LM head (trl/trainer/utils.py add_fused_lm_head + trl/kernels/chunked_logprob.py):
# position t scores labels[:, t + 1] from last_hidden_state[:, t] through lm_head, / T; -100 -> 0.
def trl_fused_lm_head(hidden, weight, bias, labels, temperature):
    logits = hidden[:, :-1] @ weight.t()
    if bias is not None:
        logits = logits + bias
    target = labels[:, 1:]
    keep = target != -100
    safe = target.masked_fill(~keep, 0)
    return (trl_logps(logits, safe, temperature).masked_fill(~keep, 0.0),
            trl_entropy(logits, temperature).masked_fill(~keep, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_trl_fused_lm_head(trl_drop, dtype, with_bias):
    B, T, H, V, temperature = 2, 7, 16, 45, 0.9
    gen = torch.Generator().manual_seed(13)
    head = torch.nn.Linear(H, V, bias=with_bias).to(dtype)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    lp, h = trl_drop.fused_lm_head_logps_entropy(hidden, head, labels, temperature)
    assert lp.shape == h.shape == (B, T - 1)

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    b64 = head.bias.detach().double() if with_bias else None
    ref_lp, ref_h = trl_fused_lm_head(h64, w64, b64, labels, temperature)
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(h.double(), ref_h, **tol)

    (lp.sum() + 0.5 * h.sum()).backward()
    (ref_lp.sum() + 0.5 * ref_h.sum()).backward()
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, **gtol)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, **gtol)


# TRL's helpers with their real signatures (trl/trainer/utils.py v1.9 and trl/kernels/logprob_entropy.py),
# as stand-ins when TRL is not installed. Bodies are TRL's semantics in plain PyTorch.
def _trl_selective_log_softmax(logits, index):
    return trl_logps(logits, index)


def _trl_entropy_from_logits(logits, chunk_size: int = 128):
    return trl_entropy(logits)


def _trl_selective_log_softmax_and_entropy(logits, index, temperature: float = 1.0, row_mask=None):
    x = logits if logits.dtype == torch.float64 else logits.float()  # the kernel computes in fp32
    lp, h = trl_logps(x, index, temperature, row_mask), trl_entropy(x, temperature)
    return lp, (h if row_mask is None else h.masked_fill(row_mask == 0, 0.0))


def _install_fake_trl(monkeypatch):
    utils = types.ModuleType("trl.trainer.utils")
    utils.selective_log_softmax = _trl_selective_log_softmax
    utils.entropy_from_logits = _trl_entropy_from_logits
    kernels = types.ModuleType("trl.kernels")
    kernels.selective_log_softmax_and_entropy = _trl_selective_log_softmax_and_entropy
    trainer = types.ModuleType("trl.trainer.grpo_trainer")  # `from ..trainer.utils import ...`
    trainer.selective_log_softmax = _trl_selective_log_softmax

    def selective_log_softmax(logits, index, row_mask=None, temperature=1.0):  # same name, other order
        raise AssertionError("must not be rebound")

    experimental = types.ModuleType("trl.experimental.custom")
    experimental.selective_log_softmax = selective_log_softmax
    other = types.ModuleType("trlx_other")
    other.selective_log_softmax = _trl_selective_log_softmax
    for module in (utils, kernels, trainer, experimental, other):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return utils, kernels, trainer, experimental, other


def test_patch_trl_rebinds_only_matching_signatures(trl_drop, monkeypatch):
    """patch_trl rebinds the names whose installed signature the replacement matches, in every loaded
    trl.* module, warns about the others and touches nothing outside trl."""
    utils, kernels, trainer, experimental, other = _install_fake_trl(monkeypatch)
    original = experimental.selective_log_softmax
    with pytest.warns(RuntimeWarning, match=r"trl\.experimental\.custom\.selective_log_softmax alone"):
        patched = trl_drop.patch_trl()
    assert set(patched) == {"trl.trainer.utils.selective_log_softmax", "trl.trainer.utils.entropy_from_logits",
                            "trl.kernels.selective_log_softmax_and_entropy",
                            "trl.trainer.grpo_trainer.selective_log_softmax"}
    assert trainer.selective_log_softmax is trl_drop.selective_log_softmax
    assert utils.entropy_from_logits is trl_drop.entropy_from_logits
    assert kernels.selective_log_softmax_and_entropy is trl_drop.selective_log_softmax_and_entropy
    assert experimental.selective_log_softmax is original
    assert other.selective_log_softmax is _trl_selective_log_softmax
    with pytest.warns(RuntimeWarning):
        assert trl_drop.patch_trl() == []  # idempotent: the others are the replacements already


def test_signature_rule(trl_drop):
    ours = trl_drop.selective_log_softmax_and_entropy
    for upstream in (_trl_selective_log_softmax_and_entropy, _trl_selective_log_softmax):
        assert trl_drop.signature_mismatch(upstream, ours) is None

    def wrong_default(logits, index, temperature=0.9, row_mask=None):
        pass

    def old_order(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
        pass

    def more(logits, index, temperature=1.0, row_mask=None, chunk=1, extra=2, again=3, more=4, most=5):
        pass

    assert "temperature" in trl_drop.signature_mismatch(wrong_default, ours)
    assert "entropy_requires_grad" in trl_drop.signature_mismatch(old_order, ours)
    assert "more parameters" in trl_drop.signature_mismatch(more, ours)


def test_patch_trl_against_the_installed_trl():
    pytest.importorskip("trl")
    drop = _load_example("drop_in_trl")
    import trl.trainer.utils as utils

    for name in ("selective_log_softmax", "entropy_from_logits"):
        assert drop.signature_mismatch(getattr(utils, name), drop.REPLACEMENTS[name]) is None
    try:
        import trl.kernels as kernels
    except ImportError:  # older TRL: no fused kernel module
        return
    fn = getattr(kernels, "selective_log_softmax_and_entropy", None)
    if fn is not None:
        assert drop.signature_mismatch(fn, drop.selective_log_softmax_and_entropy) is None


def test_patched_trl_honours_positional_arguments(trl_drop, monkeypatch):
    """TRL's kernel takes (logits, index, temperature, row_mask): a positional 0.7 is the temperature."""
    _, kernels, trainer, _, _ = _install_fake_trl(monkeypatch)
    gen = torch.Generator().manual_seed(21)
    logits = 3 * torch.randn(2, 5, 41, generator=gen)
    index = torch.randint(0, 41, (2, 5), generator=gen)
    row_mask = torch.ones(2, 5, dtype=torch.long)
    row_mask[1, 3:] = 0
    want = _trl_selective_log_softmax_and_entropy(logits.double(), index, 0.7, row_mask)
    with pytest.warns(RuntimeWarning):
        trl_drop.patch_trl()
    got = kernels.selective_log_softmax_and_entropy(logits, index, 0.7, row_mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[0].double(), _trl_selective_log_softmax_and_entropy(logits.double(), index)[0])
    torch.testing.assert_close(trainer.selective_log_softmax(logits, index).double(), trl_logps(logits.double(), index),
                               rtol=1e-6, atol=1e-6)
    # TRL's kernel also takes a single row [V] with a 0-d index.
    lp, h = kernels.selective_log_softmax_and_entropy(logits[0, 0], index[0, 0], 0.7)
    assert lp.shape == h.shape == ()
    torch.testing.assert_close(lp, got[0][0, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trl_out_dtype_none_gives_trls_dtype(trl_drop, dtype):
    """out_dtype=None: TRL's own output dtype (the logits'), one rounding of the fp32 statistics, so
    never further from the exact value than TRL's in-dtype computation."""
    gen = torch.Generator().manual_seed(23)
    logits = (2.5 * torch.randn(3, 6, 333, generator=gen)).to(dtype)
    index = torch.randint(0, 333, (3, 6), generator=gen)
    lp = trl_drop.selective_log_softmax(logits, index, out_dtype=None)
    h = trl_drop.entropy_from_logits(logits, out_dtype=None)
    assert lp.dtype == h.dtype == dtype
    exact_lp, exact_h = trl_logps(logits.double(), index), trl_entropy(logits.double())
    # One rounding of an (fp32-accurate) exact value: within half an ulp, i.e. 2**-p of |value| (p = 8
    # for bf16, 11 for fp16), and no further from exact than TRL computing in that dtype.
    rel = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    native = (trl_logps(logits, index).double(), trl_entropy(logits).double())
    for got, exact, theirs in ((lp, exact_lp, native[0]), (h, exact_h, native[1])):
        err = (got.double() - exact).abs()
        assert bool((err <= rel * exact.abs() * (1 + 1e-3) + 1e-6).all())
        assert err.max() <= (theirs - exact).abs().max() + 1e-6


@requires_triton
def test_trl_triton_backend_matches(trl_drop):
    """The Triton kernels (what CUDA tensors run) under the interpreter give TRL's values too."""
    gen = torch.Generator().manual_seed(17)
    logits = (2.0 * torch.randn(2, 3, 37, generator=gen)).to(torch.bfloat16)
    index = torch.randint(0, 37, (2, 3), generator=gen)
    lp, h = trl_drop.selective_log_softmax_and_entropy(logits, index, temperature=0.7, backend="triton")
    torch.testing.assert_close(lp.double(), trl_logps(logits.double(), index, 0.7), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(h.double(), trl_entropy(logits.double(), 0.7), rtol=1e-5, atol=2e-5)


# ================================================================================================
# verl semantics (volcengine/verl, verl/trainer/ppo/core_algos.py compute_gae_advantage_return,
# v0.9): reverse recursion where masked positions keep the running advantage and the next value
# (multi-turn "observation" tokens are skipped); returns = advantages + values before whitening;
# advantages whitened by verl/utils/torch_functional.py masked_whiten: masked mean (denominator
# n + 1e-8), masked variance times n / (n - 1) (ValueError for n < 2), (x - mean) * rsqrt(var + 1e-8).
# ================================================================================================
def verl_gae(rewards, values, mask, gamma, lam):
    m = mask.to(values.dtype)
    B, T = values.shape
    next_value = values.new_zeros(B)
    running = values.new_zeros(B)
    columns = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        running = torch.where(m[:, t] > 0, step, running)
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        columns.append(running)
    advantages = torch.stack(columns[::-1], dim=1)
    returns = advantages + values
    n = m.sum()
    if n < 2:
        raise ValueError("mask sum < 2")
    mean = (advantages * m).sum() / (n + 1e-8)
    var = ((advantages - mean) ** 2 * m).sum() / (n + 1e-8) * (n / (n - 1))
    return (advantages - mean) * torch.rsqrt(var + 1e-8), returns


# verl before multi-turn masking (same file, early 2025): plain recursion over every position.
def verl_gae_legacy(rewards, values, mask, gamma, lam):
    B, T = values.shape
    running = values.new_zeros(B)
    columns = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else values.new_zeros(B)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        columns.append(running)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, advantages + values  # (unwhitened)


def _rollout(B, T, gen, holes=True):
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T  # one full-length response
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    if holes and T >= 6:
        mask[0, 2:4] = 0  # observation tokens inside a multi-turn response
    rewards = 0.1 * torch.randn(B, T, generator=gen)  # e.g. per-token KL penalty
    rewards[torch.arange(B), lengths - 1] += torch.randn(B, generator=gen)
    values = torch.randn(B, T, generator=gen)
    return rewards, values, mask


@pytest.mark.parametrize("shape", [(1, 2), (3, 1), (4, 9), (5, 70)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9)])
def test_verl_gae_matches(verl_drop, shape, gamma, lam):
    B, T = shape
    gen = torch.Generator().manual_seed(B * 1000 + T)
    rewards, values, mask = _rollout(B, T, gen)
    if int(mask.sum()) < 2:
        mask[0, :] = 1
    adv, ret = verl_drop.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = verl_gae(rewards.double(), values.double(), mask, gamma, lam)
    on = mask.bool()
    torch.testing.assert_close(adv.double()[on], ref_adv[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double()[on], ref_ret[on], rtol=1e-5, atol=1e-5)
    # Off the mask: 0 (verl keeps the carried advantage there; its losses never read it).
    assert bool((adv[~on] == 0).all()) and bool((ret[~on] == 0).all())
    assert adv.dtype == ret.dtype == values.dtype


def test_verl_gae_ignores_masked_rewards_and_values(verl_drop):
    """Whatever sits under the mask (padding garbage, observation-token values) changes nothing."""
    gen = torch.Generator().manual_seed(21)
    rewards, values, mask = _rollout(4, 12, gen)
    adv, ret = verl_drop.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    off = mask == 0
    noisy_r = rewards.masked_fill(off, 123.0)
    noisy_v = values.masked_fill(off, -77.0)
    adv2, ret2 = verl_drop.compute_gae_advantage_return(noisy_r, noisy_v, mask, 0.99, 0.95)
    torch.testing.assert_close(adv2, adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret2, ret, rtol=0, atol=1e-6)


def test_verl_legacy_right_padding_agrees(verl_drop):
    """With right padding and zeroed pad rewards/values, verl's older unmasked recursion is the same."""
    gen = torch.Generator().manual_seed(23)
    rewards, values, mask = _rollout(5, 10, gen, holes=False)
    rewards, values = rewards * mask, values * mask
    legacy_adv, legacy_ret = verl_gae_legacy(rewards.double(), values.double(), mask, 1.0, 0.95)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    on = mask.bool()
    torch.testing.assert_close(adv.double()[on], legacy_adv[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double()[on], legacy_ret[on], rtol=1e-5, atol=1e-5)


def test_verl_all_masked_row_and_whiten_errors(verl_drop):
    gen = torch.Generator().manual_seed(29)
    rewards, values, mask = _rollout(3, 8, gen)
    mask[1] = 0  # a fully masked row: advantages 0 there, the others unaffected
    adv, ret = verl_drop.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    ref_adv, ref_ret = verl_gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    on = mask.bool()
    torch.testing.assert_close(adv.double()[on], ref_adv[on], rtol=1e-5, atol=1e-5)
    assert bool((adv[1] == 0).all()) and bool((ret[1] == 0).all())
    one = torch.zeros_like(mask)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="at least 2"):  # verl's masked_var refuses n < 2 too
        verl_drop.compute_gae_advantage_return(rewards, values, one, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        verl_drop.compute_gae_advantage_return(rewards, values, torch.zeros_like(mask), 1.0, 1.0)


def test_verl_tensor_gamma_lam_and_mask_dtypes(verl_drop):
    """verl annotates gamma / lam as tensors and its response_mask may be int or float."""
    gen = torch.Generator().manual_seed(31)
    rewards, values, mask = _rollout(3, 6, gen)
    adv_t, ret_t = verl_drop.compute_gae_advantage_return(rewards, values, mask.float(), torch.tensor(0.99),
                                                          torch.tensor(0.9))
    adv_f, ret_f = verl_drop.compute_gae_advantage_return(rewards, values, mask.bool(), 0.99, 0.9)
    torch.testing.assert_close(adv_t, adv_f)
    torch.testing.assert_close(ret_t, ret_f)


def test_verl_patch_without_verl_is_a_no_op(verl_drop, monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # import verl -> ImportError
    assert verl_drop.patch_verl() is False


def test_verl_patch_rebinds_core_algos(verl_drop, monkeypatch):
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.compute_gae_advantage_return = None
    core_algos.ADV_ESTIMATOR_REGISTRY = {"gae": None, "grpo": "keep"}
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.core_algos = core_algos
    for name, module in (("verl", types.ModuleType("verl")), ("verl.trainer", types.ModuleType("verl.trainer")),
                         ("verl.trainer.ppo", ppo), ("verl.trainer.ppo.core_algos", core_algos)):
        monkeypatch.setitem(sys.modules, name, module)
    assert verl_drop.patch_verl() is True
    assert core_algos.compute_gae_advantage_return is verl_drop.compute_gae_advantage_return
    assert core_algos.ADV_ESTIMATOR_REGISTRY == {"gae": verl_drop.compute_gae_advantage_return, "grpo": "keep"}


@requires_triton
def test_verl_triton_backend_matches(verl_drop):
    """The Triton GAE kernel (what CUDA tensors run) under the interpreter gives verl's values too."""
    gen = torch.Generator().manual_seed(37)
    rewards, values, mask = _rollout(3, 11, gen)
    adv, ret = verl_drop.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95, backend="triton")
    ref_adv, ref_ret = verl_gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    on = mask.bool()
    torch.testing.assert_close(adv.double()[on], ref_adv[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double()[on], ref_ret[on], rtol=1e-5, atol=1e-5)


# ================================================================================================
# OpenRLHF semantics (OpenRLHF/OpenRLHF, openrlhf/models/model.py, _get_critic_model, v0.11): the
# value head (nn.Linear(hidden, 1, bias=False), attribute `score`) runs on the last hidden state;
# values[:, :-1] (state t values token t + 1); optional (v - mean) / std; the last num_actions
# columns, times action_mask.float().
# ================================================================================================
def openrlhf_critic_values(last_hidden_state, action_mask, score, normalize_reward=False, mean=0.0, std=1.0):
    values = score(last_hidden_state).squeeze(-1)
    values = values[:, :-1]
    if normalize_reward:
        values = (values - mean) / std
    return values[:, -action_mask.shape[1]:] * action_mask.float()


class FakeOpenRLHFCritic(torch.nn.Module):
    """The part of OpenRLHF's CriticModel after the backbone (the backbone is the identity here)."""

    def __init__(self, hidden_size, normalize_reward=False, mean=0.0, std=1.0):
        super().__init__()
        self.value_head_prefix = "score"
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        self.normalize_reward, self.mean, self.std = normalize_reward, mean, std

    def forward(self, last_hidden_state, action_mask):
        return openrlhf_critic_values(last_hidden_state, action_mask, getattr(self, self.value_head_prefix),
                                      self.normalize_reward, self.mean, self.std)


def _critic_batch(B, L, H, A, gen, dtype=torch.float32):
    hidden = torch.randn(B, L, H, generator=gen).to(dtype)
    lengths = torch.randint(1, A + 1, (B,), generator=gen)
    lengths[0] = A
    action_mask = (torch.arange(A)[None] < lengths[:, None]).long()  # right-padded responses
    return hidden, action_mask


def _vib_map(head, hidden64):
    """fp64 reimplementation of the VIB head's deterministic parts: mu, clamped logvar, decoder."""
    W = head.encoder.weight.detach().double()
    b = head.encoder.bias.detach().double()
    stats = hidden64 @ W.t() + b
    mu, logvar = stats[..., :head.latent_dim], stats[..., head.latent_dim:]
    lo, hi = head.logvar_clamp
    logvar = logvar.clamp(lo, hi)
    kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0).sum(-1)
    w_dec = head.decoder.weight.detach().double()
    b_dec = head.decoder.bias.detach().double()
    return mu, logvar, kl, (lambda z: z @ w_dec.t() + b_dec)


def _randomise_vib(head, gen):
    with torch.no_grad():  # default init is near the prior with a zero decoder; make the map non-trivial
        head.encoder.weight.copy_(0.3 * torch.randn(head.encoder.weight.shape, generator=gen))
        head.encoder.bias.copy_(0.1 * torch.randn(head.encoder.bias.shape, generator=gen))
        head.decoder.weight.copy_(torch.randn(head.decoder.weight.shape, generator=gen))
        head.decoder.bias.fill_(0.25)


@pytest.mark.parametrize("B,L,H,A", [(1, 2, 8, 1), (3, 12, 16, 7), (2, 9, 24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_openrlhf_scalar_head_matches(openrlhf_drop, B, L, H, A, dtype, normalize):
    """ScalarValueHead with the Linear's weights reproduces OpenRLHF's values and gradients, whether
    swapped into OpenRLHF's forward or through the sliced path (fp32: to rounding; bf16: ours is the
    bf16 head output normalised in fp32, so within bf16 rounding of OpenRLHF's and never further from
    the exact values)."""
    from vrpo_fast.models.vib_head import ScalarValueHead

    gen = torch.Generator().manual_seed(B * 100 + L)
    hidden, action_mask = _critic_batch(B, L, H, A, gen, dtype)
    norm = dict(normalize_reward=normalize, mean=0.3 if normalize else 0.0, std=2.0 if normalize else 1.0)
    critic = FakeOpenRLHFCritic(H, **norm).to(dtype)
    with torch.no_grad():
        critic.score.weight.copy_(torch.randn(1, H, generator=gen))
    scalar = ScalarValueHead(H).to(dtype)
    with torch.no_grad():
        scalar.value.weight.copy_(critic.score.weight)
    exact = openrlhf_critic_values(hidden.double(), action_mask,
                                   lambda h: h @ critic.score.weight.detach().double().t(), **norm)

    h_ref = hidden.clone().requires_grad_(True)
    want = critic(h_ref, action_mask).float()
    h_new = hidden.clone().requires_grad_(True)
    got = openrlhf_drop.critic_action_values(h_new, action_mask, scalar, **norm)
    slot = openrlhf_drop.VIBScoreHead(H, head=scalar)  # the same head in OpenRLHF's slot
    critic_swapped = FakeOpenRLHFCritic(H, **norm)
    critic_swapped.score = slot
    swapped = critic_swapped(hidden, action_mask)
    assert float(got.kl) == 0.0
    assert got.action_values.dtype == swapped.dtype == torch.float32
    if dtype == torch.float32:
        tol = dict(rtol=1e-6, atol=1e-6)
    else:
        tol = dict(rtol=1.6e-2, atol=1e-2)
        worst_upstream = (want.double() - exact).abs().max()
        assert (got.action_values.double() - exact).abs().max() <= worst_upstream + 1e-6
    for values in (got.action_values, swapped):
        torch.testing.assert_close(values, want, **tol)
        assert bool((values[action_mask == 0] == 0).all())

    weights = torch.randn(B, A, generator=gen)
    (weights * want).sum().backward()
    (weights * got.action_values).sum().backward()
    torch.testing.assert_close(h_new.grad.float(), h_ref.grad.float(), **tol)


@pytest.mark.parametrize("B,L,H,A", [(1, 2, 8, 1), (3, 12, 16, 7)])
def test_openrlhf_vib_eval_matches(openrlhf_drop, B, L, H, A):
    """Eval mode: the VIB head in OpenRLHF's slot gives OpenRLHF's pipeline over dec(mu(h)); the
    sliced path agrees; kl_loss is the masked mean KL over exactly the action states."""
    gen = torch.Generator().manual_seed(41 + L)
    hidden, action_mask = _critic_batch(B, L, H, A, gen)
    critic = FakeOpenRLHFCritic(H, normalize_reward=True, mean=-0.2, std=1.5)
    slot = openrlhf_drop.install_vib_head(critic, latent_dim=8, beta=0.01)
    assert critic.score is slot and slot.beta == 0.01
    _randomise_vib(slot.head, gen)
    slot.eval()

    mu, _, kl, decode = _vib_map(slot.head, hidden.double())
    want = openrlhf_critic_values(hidden.double(), action_mask, lambda h: decode(mu), True, -0.2, 1.5)
    want_kl = (kl[:, :-1][:, -A:] * action_mask).sum() / action_mask.sum()

    got = critic(hidden, action_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slot.kl_loss(action_mask).double(), want_kl, rtol=1e-5, atol=1e-6)
    sliced = openrlhf_drop.critic_action_values(hidden, action_mask, slot.head, normalize_reward=True,
                                                mean=-0.2, std=1.5)
    torch.testing.assert_close(sliced.action_values.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.kl.double(), want_kl, rtol=1e-5, atol=1e-6)


def test_openrlhf_vib_train_step_gradients(openrlhf_drop):
    """Training mode: a seeded step is reproducible, and d(value loss + beta * KL)/d(hidden, encoder)
    equals the fp64 reimplementation run with the same noise."""
    B, L, H, A, beta = 3, 10, 16, 6, 0.05
    gen = torch.Generator().manual_seed(43)
    hidden, action_mask = _critic_batch(B, L, H, A, gen)
    returns = torch.randn(B, A, generator=gen)
    critic = FakeOpenRLHFCritic(H)
    slot = openrlhf_drop.install_vib_head(critic, latent_dim=8, beta=beta)
    _randomise_vib(slot.head, gen)
    slot.train()
    slot.seed = 99

    def loss_of(values, kl):
        keep = action_mask.to(values.dtype)
        return 0.5 * (((values - returns.to(values.dtype)) ** 2) * keep).sum() / keep.sum() + beta * kl

    h = hidden.clone().requires_grad_(True)
    values = critic(h, action_mask)
    loss = loss_of(values, slot.kl_loss(action_mask))
    loss.backward()
    again = critic(hidden, action_mask)
    torch.testing.assert_close(again, values.detach(), rtol=0, atol=0)  # same seed, same noise

    # Recover the noise this step used from z (drawn from the seed, not from hidden), then redo it in fp64.
    z = slot.head(hidden, seed=99).z.detach().double()
    mu0, logvar0, _, _ = _vib_map(slot.head, hidden.double())
    eps = (z - mu0) / torch.exp(0.5 * logvar0)
    assert abs(float(eps.mean())) < 0.3 and 0.7 < float(eps.std()) < 1.3  # it is N(0, 1) noise

    h64 = hidden.double().requires_grad_(True)
    W = slot.head.encoder.weight.detach().double().requires_grad_(True)
    b = slot.head.encoder.bias.detach().double()
    stats = h64 @ W.t() + b
    mu, logvar = stats[..., :8], stats[..., 8:].clamp(*slot.head.logvar_clamp)
    z64 = mu + torch.exp(0.5 * logvar) * eps
    dec_w = slot.head.decoder.weight.detach().double()
    values64 = openrlhf_critic_values(z64, action_mask, lambda zz: zz @ dec_w.t() + slot.head.decoder.bias.double())
    kl64 = (0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0).sum(-1))[:, :-1][:, -A:]
    kl64 = (kl64 * action_mask).sum() / action_mask.sum()
    loss64 = loss_of(values64, kl64)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slot.head.encoder.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_openrlhf_prompt_and_padding_do_not_leak(openrlhf_drop, training):
    """Hidden states outside the action states (prompt, last position, padded response) change
    neither the action values nor the KL term."""
    B, L, H, A = 3, 11, 16, 5
    gen = torch.Generator().manual_seed(47)
    hidden, action_mask = _critic_batch(B, L, H, A, gen)
    critic = FakeOpenRLHFCritic(H)
    slot = openrlhf_drop.install_vib_head(critic, latent_dim=8)
    _randomise_vib(slot.head, gen)
    slot.train(training)
    slot.seed = 5
    values = critic(hidden, action_mask)
    kl = slot.kl_loss(action_mask)

    state_of_action = torch.zeros(B, L, dtype=torch.bool)
    state_of_action[:, L - 1 - A:L - 1] = action_mask.bool()
    noisy = torch.where(state_of_action[..., None], hidden, 50.0 * torch.randn(B, L, H, generator=gen))
    torch.testing.assert_close(critic(noisy, action_mask), values, rtol=0, atol=0)
    torch.testing.assert_close(slot.kl_loss(action_mask), kl, rtol=0, atol=0)
    assert bool((values[action_mask == 0] == 0).all())


def test_openrlhf_bf16_critic(openrlhf_drop):
    """A bf16 critic (OpenRLHF's default) gets a bf16 VIB head; values stay within bf16 rounding."""
    B, L, H, A = 2, 8, 32, 5
    gen = torch.Generator().manual_seed(53)
    hidden, action_mask = _critic_batch(B, L, H, A, gen, torch.bfloat16)
    critic = FakeOpenRLHFCritic(H).to(torch.bfloat16)
    slot = openrlhf_drop.install_vib_head(critic, latent_dim=8)
    assert slot.head.encoder.weight.dtype == torch.bfloat16
    _randomise_vib(slot.head, gen)
    slot.eval()
    got = critic(hidden, action_mask)
    assert got.dtype == torch.float32
    mu, _, _, decode = _vib_map(slot.head, hidden.double())
    want = openrlhf_critic_values(hidden.double(), action_mask, lambda h: decode(mu))
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=5e-2)


def test_openrlhf_bad_input(openrlhf_drop):
    from vrpo_fast.models.vib_head import VIBValueHead

    slot = openrlhf_drop.VIBScoreHead(8, latent_dim=4)
    with pytest.raises(RuntimeError, match="forward"):
        slot.kl_loss(torch.ones(2, 3))
    slot(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="action_mask"):
        slot.kl_loss(torch.ones(2, 6))  # more actions than states
    with pytest.raises(ValueError, match="action_mask"):
        openrlhf_drop.critic_action_values(torch.randn(2, 4, 8), torch.ones(2, 4), VIBValueHead(8, latent_dim=4))


# ================================================================================================
# verl token scoring (verl/utils/torch_functional.py): logprobs_from_logits(logits, labels,
# inplace_backward=True) = log_softmax(logits) gathered at labels; entropy_from_logits(logits) =
# logsumexp(logits) - sum(softmax(logits) * logits); both in the logits' dtype, nothing masked.
# ================================================================================================
def verl_logprobs(logits, labels):
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits):
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_logprobs_and_entropy(verl_drop, dtype):
    gen = torch.Generator().manual_seed(31)
    base = (3 * torch.randn(2, 4, 3, 77, generator=gen)).to(dtype)  # any number of leading dims
    labels = torch.randint(0, 77, (2, 4, 3), generator=gen)
    logits = base.clone().requires_grad_()
    lp = verl_drop.logprobs_from_logits(logits, labels)
    h = verl_drop.entropy_from_logits(logits)
    assert lp.shape == h.shape == (2, 4, 3) and lp.dtype == h.dtype == torch.float32
    ref = base.double().requires_grad_()
    ref_lp, ref_h = verl_logprobs(ref, labels), verl_entropy(ref)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=2e-5)
    w = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    ((w * lp).sum() + h.sum()).backward()
    ((w * ref_lp).sum() + ref_h.sum()).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-3)
    torch.testing.assert_close(logits.grad.double(), ref.grad, **tol)
    # The logits are left intact (inplace_backward is accepted, not used) and out_dtype=None is verl's dtype.
    assert torch.equal(logits.detach(), base)
    assert verl_drop.logprobs_from_logits(base, labels, out_dtype=None).dtype == dtype


def test_verl_entropy_of_a_masked_vocabulary(verl_drop):
    """-inf logits: verl's formula gives NaN (0 * -inf); ours the entropy of the remaining tokens."""
    logits = torch.randn(3, 20)
    logits[:, 12:] = -math.inf
    assert torch.isnan(verl_entropy(logits)).all()
    torch.testing.assert_close(verl_drop.entropy_from_logits(logits).double(), verl_entropy(logits[:, :12].double()),
                               rtol=1e-6, atol=1e-6)


# ================================================================================================
# torch.compile(fullgraph=True) and torch.autocast over the drop-ins, as a trainer would use them
# ================================================================================================
def test_drop_ins_compile_without_graph_breaks(trl_drop, verl_drop):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(37)
    base = 2 * torch.randn(2, 6, 53, generator=gen)
    index = torch.randint(0, 53, (2, 6), generator=gen)
    row_mask = torch.ones(2, 6, dtype=torch.long)
    row_mask[0, 4:] = 0
    head = torch.nn.Linear(8, 53)
    hidden = torch.randn(2, 7, 8, generator=gen)
    labels = torch.randint(0, 53, (2, 7), generator=gen)
    labels[:, :2] = -100

    def step(logits, h):
        lp, ent = trl_drop.selective_log_softmax_and_entropy(logits, index, 0.8, row_mask)
        flp, fent = trl_drop.fused_lm_head_logps_entropy(h, head, labels, 0.8)
        vlp = verl_drop.logprobs_from_logits(logits, index)
        return lp.sum() + 0.1 * ent.sum() + flp.sum() + 0.1 * fent.sum() + vlp.sum()

    try:
        for backend in ("eager", "aot_eager"):
            logits, h = base.clone().requires_grad_(), hidden.clone().requires_grad_()
            got = torch.compile(step, fullgraph=True, backend=backend)(logits, h)
            got_grads = torch.autograd.grad(got, [logits, h, head.weight, head.bias])
            want = step(logits, h)
            want_grads = torch.autograd.grad(want, [logits, h, head.weight, head.bias])
            torch.testing.assert_close(got, want)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w)
    finally:
        torch._dynamo.reset()


def test_fused_lm_head_under_autocast_and_with_mixed_dtypes(trl_drop):
    """TRL runs the LM head under autocast (bf16 GEMM from fp32 weights) or with bf16 hidden states and
    an fp32 head; the fused head follows: GEMMs in the autocast dtype, statistics in fp32."""
    gen = torch.Generator().manual_seed(41)
    B, T, H, V = 2, 6, 32, 300
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(B, T, H, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100

    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, h = trl_drop.fused_lm_head_logps_entropy(hidden, head, labels, 0.9)
        # TRL's unfused path under the same autocast: the Linear runs in bf16.
        logits = head(hidden[:, :-1])
    assert logits.dtype == torch.bfloat16 and lp.dtype == h.dtype == torch.float32
    target = labels[:, 1:]
    keep = target != -100
    ref_lp = trl_logps(logits.double(), target.clamp_min(0), 0.9).masked_fill(~keep, 0.0)
    ref_h = trl_entropy(logits.double(), 0.9).masked_fill(~keep, 0.0)
    # Our tiles are bf16 GEMM outputs too; only the accumulation order of the GEMMs may differ.
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=3e-2)
    torch.testing.assert_close(h.double(), ref_h, rtol=0, atol=3e-2)
    # Exactly what the op gives on bf16 copies (the autocast dtype), gradients in the inputs' dtypes.
    with torch.no_grad():
        same = linear_logprobs_entropy(hidden[:, :-1].bfloat16(), head.weight.bfloat16(), labels[:, 1:],
                                       head.bias.bfloat16(), temperature=0.9)
    assert torch.equal(lp, same[0]) and torch.equal(h, same[1])
    (lp.sum() + h.sum()).backward()
    assert hidden.grad.dtype == head.weight.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()

    # bf16 hidden states with an fp32 head, no autocast: promoted to fp32 (as hidden.float() @ W.T).
    h16 = hidden.detach().bfloat16().requires_grad_()
    lp16, _ = trl_drop.fused_lm_head_logps_entropy(h16, head, labels)
    lp32, _ = trl_drop.fused_lm_head_logps_entropy(h16.detach().float(), head, labels)
    assert torch.equal(lp16, lp32)
    lp16.sum().backward()
    assert h16.grad.dtype == torch.bfloat16
