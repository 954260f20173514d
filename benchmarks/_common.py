"""Shared benchmark helpers: timing (median after warm-up), peak memory, machine description, tables.

* CUDA: time with ``triton.testing.do_bench`` (median), peak memory from the CUDA caching allocator.
* CPU: time with ``time.perf_counter`` (median of repeats after warm-up); peak *extra* memory of one
  call measured in a fresh spawned process (peak RSS minus RSS after the inputs were built), because
  PyTorch's CPU allocator keeps no peak statistics.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> None:
    # ru_maxrss survives exec (a spawned child inherits its parent's high-water mark), so reset the
    # kernel's high-water mark to the current RSS before measuring ("5" -> clear VmHWM).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - non-Linux
        pass


def _child(target, args, q):
    try:
        fn = target(*args)  # builds inputs, returns the callable to measure
        base = _rss_bytes()
        _reset_hwm()
        fn()
        q.put(max(0, _hwm_bytes() - base))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put(e)


def cpu_peak_extra_bytes(make_fn, *args) -> int:
    """Peak extra resident memory of one call, measured in a fresh process.

    ``make_fn(*args)`` must be a module-level function (picklable) that builds the inputs and returns
    a zero-argument callable; only the memory that callable adds on top of its inputs is counted.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(make_fn, args, q))
    p.start()
    out = q.get()
    p.join()
    if isinstance(out, BaseException):
        raise out
    return int(out)


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Measured limits ("roofline"): what the device in hand actually reaches, so that a benchmark can
# state achieved GB/s or TFLOP/s as a fraction of a measured number instead of a datasheet constant.
# ----------------------------------------------------------------------------------------------
def measure_copy_gbps(device="cuda", nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read + bytes written.

    ``dst.copy_(src)`` of ``nbytes`` of fp32 random data (default 1 GiB on CUDA, far beyond any L2;
    64 MiB on CPU), timed with :func:`time_ms` (``do_bench`` median on CUDA).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (64 << 20)
    n = max(1, int(nbytes) // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device, warmup=2, reps=5)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n * 4 / ms / 1e6


def measure_matmul_tflops(device="cuda", dtype=torch.bfloat16, *, n: int | None = None,
                          allow_tf32: bool = False) -> float:
    """Dense ``n x n @ n x n`` GEMM rate in TFLOP/s (2 n^3 flops), random inputs (zeros run faster).

    Default ``n`` = 8192 on CUDA, 512 on CPU. ``allow_tf32`` (fp32 only) times fp32 GEMMs with
    TF32 tensor cores (``torch.set_float32_matmul_precision("high")``); the previous setting is
    restored afterwards.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if n is None:
        n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        ms = time_ms(lambda: torch.mm(a, b, out=out), device=device, warmup=1, reps=3)
    finally:
        torch.set_float32_matmul_precision(previous)
    del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    return 2.0 * n**3 / ms / 1e9


_LIMITS_CACHE: dict = {}


def measured_limits(device="cuda") -> dict:
    """``{"copy_gbps", "bf16_tflops", "fp32_tflops"}`` for ``device``, measured once per process.

    For benchmarks that print "achieved / measured limit": a few hundred ms on a GPU, ~1 s on CPU.
    """
    key = str(torch.device(device))
    if key not in _LIMITS_CACHE:
        _LIMITS_CACHE[key] = {
            "copy_gbps": measure_copy_gbps(device),
            "bf16_tflops": measure_matmul_tflops(device, torch.bfloat16),
            "fp32_tflops": measure_matmul_tflops(device, torch.float32),
        }
    return _LIMITS_CACHE[key]


def pct_of(value: float, limit: float) -> str:
    """``"83%"`` of a measured limit (``"-"`` when the limit is unknown or zero)."""
    if not limit or limit <= 0:
        return "-"
    return f"{100.0 * value / limit:.0f}%"
