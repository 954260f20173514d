"""Benchmark: per-token label log-prob + entropy from logits (vrpo_fast.ops.token_logprobs_entropy).

Variants (each forward, and forward + backward of ``sum(lp * g1) + sum(H * g2)``):

* ``naive``: what RL code usually writes -- ``log_softmax`` + ``gather`` + ``-(p * logp).sum(-1)``
  under autograd (fp32 math; materialises several N x V tensors).
* ``cpp``: ``backend="torch"`` on CPU, i.e. the C++ extension (csrc/token_stats.cpp: one read of the
  logits forward, one read + one write backward, vectorised, threads over rows).
* ``cpp-inplace``: the same with ``inplace_backward=True`` (gradient written over the logits).
* ``chunked`` / ``chunked-inplace``: the chunked PyTorch path (what CPU ran before the C++ kernels,
  and still the fallback without the extension; rows in chunks, O(chunk) temporaries).
* ``read``: CPU only, ``torch.sum`` over the same logits -- the measured read rate, the limit of the
  forward (target: forward >= 30% of it, 2 threads, N=4096 V=32000 fp32).
  Its logits must come from an op (a leaf is refused): a clone stands in for the lm_head output,
  timed separately and subtracted (shown in the notes); for memory it is made before the call.
* ``triton`` / ``triton-inplace``: CUDA only.
* ``copy``: CUDA only, a plain device-to-device copy of the logits, the bandwidth reference (the
  target is forward >= 85% of it).
* ``fused-linear`` vs ``naive-linear``: ``linear_logprobs_entropy(hidden, weight, labels)`` vs
  ``hidden @ weight.T`` followed by ``naive``; TFLOP/s counts 8 * M * H * V per forward + backward
  (2 forward, 2 recompute, 4 for both backward matmuls) and 2 * M * H * V per forward.

GB/s is effective: logits bytes read + gradient bytes written by the fused op (forward: N*V*elt,
forward+backward: 3*N*V*elt), the same figure for every variant. Peak extra memory is measured for
one call in a fresh process (CPU) or from the caching allocator (CUDA), inputs excluded, outputs
(incl. the gradient) included.

    python benchmarks/bench_token_stats.py            # CPU: N=4096, V=32000 fp32; CUDA: N=16384, V=151936 bf16
    python benchmarks/bench_token_stats.py --quick    # small shapes
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    cpu_peak_extra_bytes,
    cuda_peak_extra_bytes,
    fmt_bytes,
    machine,
    markdown_table,
    measure_matmul_tflops,
    pct_of,
    time_ms,
)

from vrpo_fast.ops import _cpu_ext, linear_logprobs_entropy, token_logprobs_entropy  # noqa: E402


def naive_token_stats(logits, labels, ignore_index=-100):
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != ignore_index
    lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return lp, ent


def _token_fn(variant):
    if variant == "naive":
        return naive_token_stats
    backend = "triton" if variant.startswith("triton") else "torch"
    inplace = variant.endswith("inplace")
    chunked = variant.startswith("chunked")

    def fn(logits, labels):
        # Benchmark inputs are known-good: skip the label range check (a device sync on CUDA).
        _cpu_ext.FORCE_TORCH_FALLBACK = chunked
        try:
            return token_logprobs_entropy(logits, labels, backend=backend, inplace_backward=inplace,
                                          _check_label_range=False)
        finally:
            _cpu_ext.FORCE_TORCH_FALLBACK = False

    return fn


def make_token_inputs(N, V, device, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::17] = -100
    g1 = torch.randn(N, generator=g).to(device)
    g2 = torch.randn(N, generator=g).to(device)
    return logits, labels, g1, g2


def make_token_step(variant, N, V, device, dtype, backward, restore=False, warm=False):
    """Zero-argument callable for one forward (+ backward). Module level so spawn can pickle it.

    In-place variants need logits produced by an op (their buffer is overwritten): a ``clone`` of a
    leaf stands in for the lm_head output. With ``restore`` the clone is made inside every call (for
    timing; its cost is measured by :func:`make_restore_step` and subtracted), otherwise once,
    before the call, for the single-call memory measurement.
    """
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    logits, labels, g1, g2 = make_token_inputs(N, V, device, dtype)
    if variant == "copy":
        out = torch.empty_like(logits)
        return lambda: out.copy_(logits)
    if variant == "read":
        return lambda: torch.sum(logits)
    fn = _token_fn(variant)
    if not backward:
        def step():
            with torch.no_grad():
                return fn(logits, labels)

        if warm:
            step()
        return step
    inplace = variant.endswith("inplace")
    leaf = logits.requires_grad_()
    produced = [None if (restore or not inplace) else leaf.clone() for _ in range(2 if warm else 1)]

    def step():
        x = leaf
        if inplace:
            x = leaf.clone() if restore else produced.pop()
        lp, ent = fn(x, labels)
        return torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), leaf)

    if warm:  # one call first: one-time costs (lazy imports, op registration) are not per-call memory
        step()
    return step


def make_token_step_warm(variant, N, V, device, dtype, backward):
    return make_token_step(variant, N, V, device, dtype, backward, warm=True)


def make_restore_step(N, V, device, dtype):
    logits, _, _, _ = make_token_inputs(N, V, torch.device(device), dtype)
    return lambda: logits.clone()


def make_linear_inputs(M, H, V, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(M, H, generator=g) / H**0.25).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (M,), generator=g).to(device)
    g1 = torch.randn(M, generator=g).to(device)
    g2 = torch.randn(M, generator=g).to(device)
    return hidden, weight, labels, g1, g2


def make_linear_step(variant, M, H, V, device, dtype, backward):
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hidden, weight, labels, g1, g2 = make_linear_inputs(M, H, V, device, dtype)

    def run(h, w):
        if variant == "naive-linear":
            return naive_token_stats(h @ w.t(), labels)
        return linear_logprobs_entropy(h, w, labels)

    def step():
        if not backward:
            with torch.no_grad():
                return run(hidden, weight)
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        lp, ent = run(h, w)
        return torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))

    return step


def _peak(device, make, *args):
    if torch.device(device).type == "cuda":
        # Kernels were compiled by the timing run of the same shape in this process.
        return cuda_peak_extra_bytes(make(*args))
    return cpu_peak_extra_bytes(make, *args)


def _measure(device, timed, peak, args):
    """(median ms, peak extra bytes or None); (None, None) when the variant runs out of GPU memory."""
    try:
        ms = timed()
        mem = None if args.no_memory else peak()
        return ms, mem
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def bench_token(args, device, dtype_name, N, V, table, notes):
    dtype = getattr(torch, dtype_name)
    esize = torch.finfo(dtype).bits // 8
    nbytes = N * V * esize
    on_cuda = device.type == "cuda"
    variants = ["naive", "chunked", "chunked-inplace"]
    variants += ["triton", "triton-inplace"] if on_cuda else ["cpp", "cpp-inplace"]
    kw = dict(warmup=args.warmup, reps=args.reps)
    restore_ms = time_ms(make_restore_step(N, V, device, dtype), device=device, **kw)
    read_gbps = None
    if on_cuda:
        copy_ms = time_ms(make_token_step("copy", N, V, device, dtype, False), device=device, **kw)
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        table.append([f"{N}x{V}", dtype_name, "copy (reference)", "-", f"{copy_ms:.2f}", f"{copy_gbps:.0f} GB/s",
                      "-", "-", "-"])
    else:
        read_ms = time_ms(make_token_step("read", N, V, device, dtype, False), device=device, warmup=2,
                          reps=max(5, args.reps))
        read_gbps = nbytes / read_ms / 1e6
        table.append([f"{N}x{V}", dtype_name, "read: torch.sum (limit)", "-", f"{read_ms:.2f}",
                      f"{read_gbps:.1f} GB/s", "-", "-", "-"])
    times = {}
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        traffic = (3 if backward else 1) * nbytes
        base_ms = base_mem = None
        for variant in variants:
            if variant.endswith("inplace") and not backward:
                continue
            restore = variant.endswith("inplace")
            ms, mem = _measure(
                device,
                lambda: time_ms(make_token_step(variant, N, V, device, dtype, backward, restore), device=device, **kw),
                lambda: _peak(device, make_token_step_warm, variant, N, V, device, dtype_name, backward),
                args,
            )
            if ms is None:
                table.append([f"{N}x{V}", dtype_name, variant, mode, "OOM", "-", "-", "-", "-"])
                continue
            if restore:
                if ms - restore_ms <= 0.05 * ms:  # the clone dominates: difference is noise
                    table.append([f"{N}x{V}", dtype_name, variant, mode, "below clone-time noise", "-",
                                  fmt_bytes(mem) if mem is not None else "-", "-",
                                  f"{mem / base_mem:.2f}x" if (mem is not None and base_mem) else "-"])
                    continue
                ms -= restore_ms
            if variant == "naive":
                base_ms, base_mem = ms, mem
            times[variant, mode] = ms
            gbps = traffic / ms / 1e6
            extra = ""
            if on_cuda:  # fwd+bwd moves 3 N x V (read, re-read, write): the same copy is its limit
                extra = f" ({pct_of(gbps, copy_gbps)} of copy)"
            elif read_gbps and not backward:
                extra = f" ({pct_of(gbps, read_gbps)} of read)"
            table.append([
                f"{N}x{V}", dtype_name, variant, mode, f"{ms:.2f}", f"{gbps:.1f} GB/s{extra}",
                fmt_bytes(mem) if mem is not None else "-",
                f"{ms / base_ms:.2f}x" if base_ms else "-",
                f"{mem / base_mem:.2f}x" if (mem is not None and base_mem) else "-",
            ])
            print(f"  {variant:16s} {mode:8s} {ms:9.2f} ms", flush=True)
    notes.append(f"in-place timings for {N}x{V} {dtype_name} exclude the clone that produces the logits "
                 f"({restore_ms:.2f} ms)")
    if read_gbps and ("cpp", "fwd") in times:
        # The forward target, measured with the read and the forward interleaved rep by rep (on a shared
        # machine both then see the same load).
        read_step = make_token_step("read", N, V, device, dtype, False)
        fwd_step = make_token_step("cpp", N, V, device, dtype, False)
        for f in (read_step, fwd_step, read_step, fwd_step):
            f()
        pairs = [(time_ms(read_step, warmup=0, reps=1), time_ms(fwd_step, warmup=0, reps=1))
                 for _ in range(max(7, args.reps))]
        r_ms = statistics.median(p[0] for p in pairs)
        f_ms = statistics.median(p[1] for p in pairs)
        r_gbps, f_gbps = nbytes / r_ms / 1e6, nbytes / f_ms / 1e6
        notes.append(f"target (CPU, interleaved reps): cpp forward {f_ms:.2f} ms = {f_gbps:.1f} GB/s, the read "
                     f"(torch.sum) {r_ms:.2f} ms = {r_gbps:.1f} GB/s: {100 * f_gbps / r_gbps:.0f}% of the measured "
                     f"read rate (target >= 30%: {'met' if f_gbps >= 0.3 * r_gbps else 'NOT met'})")
        # fwd+bwd against the chunked path, interleaved too (in-place variants include the clone that
        # stands in for the lm_head output in both, so their ratio is conservative).
        for v_new, v_old in (("cpp", "chunked"), ("cpp-inplace", "chunked-inplace")):
            a = make_token_step(v_new, N, V, device, dtype, True, restore=True)
            b = make_token_step(v_old, N, V, device, dtype, True, restore=True)
            a(), b()
            ta, tb = [], []
            for _ in range(max(3, args.reps)):
                ta.append(time_ms(a, warmup=0, reps=1))
                tb.append(time_ms(b, warmup=0, reps=1))
            r = statistics.median(ta) / statistics.median(tb)
            notes.append(f"target (CPU, interleaved reps): {v_new} fwd+bwd {statistics.median(ta):.1f} ms vs "
                         f"{v_old} {statistics.median(tb):.1f} ms = {r:.2f}x (target <= 1.0x: "
                         f"{'met' if r <= 1.0 else 'NOT met'})")
            del a, b


def bench_linear(args, device, dtype_name, M, H, V, table, notes):
    flops = {False: 2 * M * H * V, True: 8 * M * H * V}
    kw = dict(warmup=args.warmup, reps=args.reps)
    # Limit: this device's dense GEMM rate in the same dtype, measured here (CUDA: 8192^3).
    gemm_tflops = measure_matmul_tflops(device, dtype_name) if device.type == "cuda" else None
    if gemm_tflops:
        notes.append(f"measured {dtype_name} GEMM (8192^3): {gemm_tflops:.0f} TFLOP/s")
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        base_ms = base_mem = None
        for variant in ("naive-linear", "fused-linear"):
            ms, mem = _measure(
                device,
                lambda: time_ms(make_linear_step(variant, M, H, V, device, dtype_name, backward), device=device,
                                **kw),
                lambda: _peak(device, make_linear_step, variant, M, H, V, device, dtype_name, backward),
                args,
            )
            if ms is None:
                table.append([f"M={M} H={H} V={V}", dtype_name, variant, mode, "OOM", "-", "-", "-", "-"])
                continue
            if variant == "naive-linear":
                base_ms, base_mem = ms, mem
            tflops = flops[backward] / ms / 1e9
            of_gemm = f" ({pct_of(tflops, gemm_tflops)} of GEMM)" if gemm_tflops else ""
            table.append([
                f"M={M} H={H} V={V}", dtype_name, variant, mode, f"{ms:.2f}",
                f"{tflops:.2f} TFLOP/s{of_gemm}", fmt_bytes(mem) if mem is not None else "-",
                f"{ms / base_ms:.2f}x" if base_ms else "-",
                f"{mem / base_mem:.2f}x" if (mem is not None and base_mem) else "-",
            ])
            print(f"  {variant:16s} {mode:8s} {ms:9.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--N", type=int, default=None, help="token rows")
    ap.add_argument("--V", type=int, default=None, help="vocabulary size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--linear", type=int, nargs=3, metavar=("M", "H", "V"), default=None,
                    help="fused-linear shape (rows, hidden, vocab)")
    ap.add_argument("--no-linear", action="store_true", help="skip the fused-linear comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        N, V, dtype_name = (2048, 32000, "bfloat16") if args.quick else (16384, 151936, "bfloat16")
        lin = (1024, 1024, 32000) if args.quick else (8192, 4096, 131072)
    else:
        N, V, dtype_name = (512, 8000, "float32") if args.quick else (4096, 32000, "float32")
        lin = (128, 256, 8000) if args.quick else (512, 512, 32000)
    N, V = args.N or N, args.V or V
    dtype_name = args.dtype or dtype_name
    lin = tuple(args.linear) if args.linear else lin

    table, notes = [], []
    print(f"token stats N={N} V={V} {dtype_name} on {device}", flush=True)
    bench_token(args, device, dtype_name, N, V, table, notes)
    if not args.no_linear:
        print(f"fused linear M={lin[0]} H={lin[1]} V={lin[2]} {dtype_name}", flush=True)
        bench_linear(args, device, dtype_name, *lin, table, notes)

    print()
    print(f"Machine: {machine()}; median of {args.reps} reps after {args.warmup} warm-up (CPU) / do_bench (CUDA)")
    for note in notes:
        print(f"Note: {note}")
    print()
    print(markdown_table(
        ["shape", "dtype", "variant", "pass", "median ms", "throughput", "peak extra mem", "time vs naive",
         "mem vs naive"],
        table,
    ))


if __name__ == "__main__":
    main()
