"""Whether bf16 autocast pays on this CPU: detected and measured once per process.

A CPU with native bf16 matmul (AVX-512 BF16, AMX-BF16: recent Xeons, Zen 4 / Zen 5) multiplies bf16
several times faster than fp32 through oneDNN; one without it emulates bf16 through fp32 and is
*slower* in bf16. :func:`choose_cpu_mixed_precision` reads the CPU's feature flags (Linux
``/proc/cpuinfo``), then times an fp32 and a bf16 GEMM of a language-model-like shape
(``[512, 1024] @ [1024, 1024]``, a few tens of ms) on one thread and picks ``"bf16"`` only when the
flags name a native bf16 unit *and* the measured bf16 rate is at least ``min_speedup`` times the fp32
rate. One thread, because the ratio is a property of a core, and on a loaded machine a multi-threaded
GEMM waits at every barrier for a descheduled thread (measured on a shared 2-core Xeon: 2 threads
gave 1.3x with both rates collapsed, 1 thread 11.8x). The answer is cached per process.

This decides the autocast dtype only: master weights, optimiser states and the fused token
statistics stay fp32 (see :func:`vrpo_fast.ops.linear_logprobs_entropy` under autocast).

:func:`use_fp32_attention` makes a Hugging Face model's attention run SDPA in fp32 on CPU under bf16
autocast (the projections stay bf16): PyTorch's CPU flash-attention kernel is about 2x *slower* in
bf16 than in fp32 at these shapes (forward + backward, 9 heads x 92 tokens x 64: 17 ms vs 7 ms on one
core), while attention is ~1% of the step's FLOPs, so computing it in fp32 is both faster and exact-er.
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional, Tuple

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class PrecisionChoice(NamedTuple):
    """``mixed_precision`` is what ``--mixed-precision`` / ``accelerate`` take: ``"bf16"`` or ``"no"``."""

    mixed_precision: str
    reason: str
    fp32_gflops: Optional[float] = None
    bf16_gflops: Optional[float] = None


def cpu_bf16_flags(cpuinfo_path: str = "/proc/cpuinfo") -> Optional[Tuple[str, ...]]:
    """The native-bf16 feature flags this CPU reports (a subset of :data:`NATIVE_BF16_FLAGS`), or None
    when the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(name for name in NATIVE_BF16_FLAGS if name in flags)
    except OSError:
        return None
    return None


def measure_cpu_gemm_gflops(dtype: torch.dtype, m: int = 512, k: int = 1024, n: int = 1024, reps: int = 3) -> float:
    """Best-of-``reps`` rate of ``[m, k] @ [k, n]`` in ``dtype`` on the CPU, GFLOP/s (2 m k n flops).

    The best, not the median: on a shared machine other work only ever slows a repeat down.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    for name, v in (("m", m), ("k", k), ("n", n), ("reps", reps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: oneDNN picks (and caches) its kernel
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def choose_cpu_mixed_precision(min_speedup: float = 2.0) -> PrecisionChoice:
    """``"bf16"`` when this CPU multiplies bf16 natively and at least ``min_speedup`` x faster than fp32
    (measured here, one thread), else ``"no"``; with the reason. Cached per process."""
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not min_speedup > 0:
        raise ValueError(f"min_speedup must be a number > 0, got {min_speedup!r}")
    fp32, bf16, flags = _measure_once()
    if flags == ():
        return PrecisionChoice("no", "the CPU reports no native bf16 matmul (no amx_bf16 / avx512_bf16 flag): "
                                     "bf16 would be emulated, slower than fp32")
    ratio = bf16 / fp32
    where = "+".join(flags) if flags else "CPU flags unknown"
    measured = f"bf16 GEMM {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} GFLOP/s on one core ({ratio:.1f}x, {where})"
    if ratio >= min_speedup:
        return PrecisionChoice("bf16", f"{measured} >= {min_speedup:g}x: bf16 autocast", fp32, bf16)
    return PrecisionChoice("no", f"{measured} < {min_speedup:g}x: fp32", fp32, bf16)


@functools.lru_cache(maxsize=None)
def _measure_once():
    """(fp32 GFLOP/s, bf16 GFLOP/s, flags); the GEMMs are skipped when the flags rule bf16 out."""
    flags = cpu_bf16_flags()
    if flags == ():
        return 0.0, 0.0, flags
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # interleaved, so that a burst of load from other processes hits both alike
        fp32, bf16 = 0.0, 0.0
        for _ in range(2):
            fp32 = max(fp32, measure_cpu_gemm_gflops(torch.float32))
            bf16 = max(bf16, measure_cpu_gemm_gflops(torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    return fp32, bf16, flags


FP32_CPU_ATTENTION = "vrpo_sdpa_fp32_cpu"


def _sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; on CPU with bf16 / fp16 inputs it runs in fp32, outside autocast,
    and returns the value's dtype (what autocast's bf16 SDPA would have returned)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = (torch.bfloat16, torch.float16)
    if query.device.type != "cpu" or not any(t.dtype in low for t in (query, key, value)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out_dtype = value.dtype if value.dtype in low else torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(out_dtype), weights


def use_fp32_attention(model):
    """Switch ``model`` (a transformers model, or a module holding some) to :data:`FP32_CPU_ATTENTION`:
    SDPA with SDPA's masks, computed in fp32 on CPU when the inputs are bf16 / fp16. Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_CPU_ATTENTION, _sdpa_fp32_on_cpu)
    AttentionMaskInterface.register(FP32_CPU_ATTENTION, sdpa_mask)
    found = False
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            if config._attn_implementation not in ("sdpa", FP32_CPU_ATTENTION):
                raise ValueError(f"use_fp32_attention replaces SDPA attention; {type(sub).__name__} uses "
                                 f"{config._attn_implementation!r}")
            config._attn_implementation = FP32_CPU_ATTENTION
            found = True
    if not found:
        raise ValueError(f"use_fp32_attention: {type(model).__name__} holds no transformers model")
    return model


class _LowPrecisionWeight(torch.autograd.Function):
    """The cached low-precision copy of a weight, with autocast's gradient: cast back to the weight's dtype."""

    @staticmethod
    def forward(ctx, weight, low):
        ctx.weight_dtype = weight.dtype
        return low.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.weight_dtype), None


_WEIGHT_GENERATION = [0]  # bumped after every step of an optimizer given to cache_low_precision_weights


def _low_weight(module, weight, dtype):
    key = (weight._version, weight.data_ptr(), dtype, _WEIGHT_GENERATION[0])
    cached = module.__dict__.get("_vrpo_low_weight")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, weight.detach().to(dtype))
        module.__dict__["_vrpo_low_weight"] = cached
    if torch.is_grad_enabled() and weight.requires_grad:
        return _LowPrecisionWeight.apply(weight, cached[1])
    return cached[1]


def _cached_linear_forward(self, x):
    if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and self.weight.dtype == torch.float32
            and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)):
        return torch.nn.functional.linear(x, _low_weight(self, self.weight, torch.get_autocast_dtype("cpu")),
                                          self.bias)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def cache_low_precision_weights(model, optimizers=()):
    """Under CPU autocast, cast each ``nn.Linear`` weight of ``model`` to the autocast dtype once and reuse
    it until the weight changes, instead of once per autocast region (autocast's own cache lives for one
    region: the rollout, the scoring, every micro-batch each cast all weights again).

    The copy is refreshed when the weight's version counter or storage changes, and after every
    ``step()`` of each optimizer in ``optimizers`` (give the optimizers that update ``model``: fused
    AdamW updates weights in place without bumping their version counter). Values and gradients are
    those of plain autocast, bit for bit (the same rounding of the same weight, the same matmul, the
    gradient cast back to fp32). Costs one low-precision copy of the weights in memory. Only plain
    ``nn.Linear`` modules are switched (not LoRA-wrapped or sharded ones). Returns the number switched.
    """
    import types

    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_cached_linear_forward, module)
            switched += 1
    if not switched:
        raise ValueError(f"cache_low_precision_weights: {type(model).__name__} has no nn.Linear")

    def bump(*_):
        _WEIGHT_GENERATION[0] += 1

    for opt in optimizers:
        opt.register_step_post_hook(bump)
    return switched


__all__ = ["NATIVE_BF16_FLAGS", "PrecisionChoice", "cpu_bf16_flags", "measure_cpu_gemm_gflops",
           "choose_cpu_mixed_precision", "FP32_CPU_ATTENTION", "use_fp32_attention", "cache_low_precision_weights"]
