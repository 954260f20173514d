"""Benchmark: fused VIB sample + KL (vrpo_fast.ops.vib_sample_kl) vs. the eager PyTorch formula.

Eager is what a VIB head usually writes: ``eps = randn_like(mu); z = mu + exp(0.5 * lv) * eps;
kl = 0.5 * (mu**2 + lv.exp() - lv - 1).sum(-1)`` under autograd. The fused op also clamps logvar
(its default ``(-20, 10)``), i.e. it does slightly more work than the eager line.

Reported per (rows, latent): median time of the forward (autograd on, as in training) and of
forward + backward, effective GB/s (minimum traffic of the fused op: forward reads mu, logvar and
writes z; backward reads mu, logvar, grad_z and writes both gradients), peak extra memory of one
forward + backward, and the bytes autograd keeps for backward (counted with saved_tensors_hooks).
Eager and fused calls are interleaved rep by rep (on a shared, noisy machine both see the same
load), and "fused / eager" is the ratio of the two medians; the CPU targets are <= 1.0x at
2560 x 64 (one VRPO micro-batch) and <= 0.6x at 65536 x 64 (forward + backward).

    python benchmarks/bench_vib.py            # 2560 x 64, 65536 x 64, 65536 x 256
    python benchmarks/bench_vib.py --quick    # 2560 x 64, 4096 x 64
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
    measure_copy_gbps,
    pct_of,
    time_ms,
)

from vrpo_fast.ops import vib_sample_kl  # noqa: E402

SEED = 1234
# CPU targets, fused fwd+bwd time / eager fwd+bwd time, per (rows, latent).
TARGETS = {(2560, 64): 1.0, (65536, 64): 0.6}


def eager_vib(mu, logvar):
    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1.0).sum(-1)
    return z, kl


def fused_vib(mu, logvar):
    return vib_sample_kl(mu, logvar, seed=SEED)


IMPLS = {"eager": eager_vib, "fused": fused_vib}


def make_inputs(rows, latent, device, dtype):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(rows, latent, generator=g).to(device=device, dtype=dtype).requires_grad_()
    logvar = (0.5 * torch.randn(rows, latent, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    grad_z = torch.randn(rows, latent, generator=g).to(device=device, dtype=dtype)
    grad_kl = torch.randn(rows, generator=g).to(device=device)
    return mu, logvar, grad_z, grad_kl


def make_step(impl, rows, latent, device, dtype, backward):
    """Zero-argument callable running one forward (and backward); module level so spawn can pickle it."""
    fn = IMPLS[impl]
    mu, logvar, grad_z, grad_kl = make_inputs(rows, latent, device, dtype)

    def step():
        z, kl = fn(mu, logvar)
        if backward:
            torch.autograd.backward((z, kl), (grad_z, grad_kl))
            mu.grad = logvar.grad = None
        return z

    return step


def saved_bytes(impl, rows, latent, device, dtype) -> int:
    """Bytes autograd keeps between forward and backward (distinct storages)."""
    mu, logvar, _, _ = make_inputs(rows, latent, device, dtype)
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        IMPLS[impl](mu, logvar)
    return sum(seen.values())


def interleaved_ms(steps, device, warmup=3, reps=21):
    """Median ms per callable, calls interleaved rep by rep (CUDA: do_bench each)."""
    if device.type == "cuda":
        return {k: time_ms(f, device=device) for k, f in steps.items()}
    for f in steps.values():
        for _ in range(warmup):
            f()
    samples = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            samples[k].append(time_ms(f, device=device, warmup=0, reps=1))
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2560 x 64 and 4096 x 64 only")
    ap.add_argument("--shapes", type=str, nargs="+", default=None, help="ROWSxLATENT, e.g. 2560x64")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU); 0: default")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.lower().split("x")) for sh in args.shapes]
    else:
        shapes = [(2560, 64), (4096, 64)] if args.quick else [(2560, 64), (65536, 64), (65536, 256)]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    esize = torch.finfo(dtype).bits // 8
    copy_gbps = measure_copy_gbps(device)  # the bandwidth limit of this device, measured here

    table = []
    for rows, latent in shapes:
        n = rows * latent
        traffic = {False: 3 * n * esize, True: 8 * n * esize}
        for backward in (False, True):
            steps = {impl: make_step(impl, rows, latent, device, dtype, backward) for impl in IMPLS}
            reps = args.reps if n * (8 if backward else 3) < (1 << 26) else max(5, args.reps // 3)
            times = interleaved_ms(steps, device, reps=reps)
            del steps
            for impl in IMPLS:
                peak = saved = "-"
                if backward:
                    saved = fmt_bytes(saved_bytes(impl, rows, latent, device, dtype))
                    if not args.no_memory:
                        if device.type == "cuda":
                            peak = fmt_bytes(cuda_peak_extra_bytes(make_step(impl, rows, latent, device, dtype, True)))
                        else:
                            peak = fmt_bytes(cpu_peak_extra_bytes(make_step_cpu, impl, rows, latent, args.dtype, True))
                gbps = traffic[backward] / (times[impl] * 1e-3) / 1e9
                ratio = target = ""
                if impl == "fused":
                    ratio = f"{times['fused'] / times['eager']:.2f}x"
                    limit = TARGETS.get((rows, latent)) if (backward and device.type == "cpu") else None
                    if limit is not None:
                        ok = times["fused"] / times["eager"] <= limit
                        target = f"<= {limit:.1f}x: {'met' if ok else 'NOT met'}"
                table.append([
                    f"{rows}x{latent}", "fwd+bwd" if backward else "fwd", impl,
                    f"{times[impl]:.3f}", f"{gbps:.1f}", pct_of(gbps, copy_gbps), peak, saved, ratio, target,
                ])
            timings = ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
            print(f"{rows}x{latent} {'fwd+bwd' if backward else 'fwd'}: {timings}", flush=True)

    print()
    print(f"Machine: {machine()}; dtype {args.dtype}; fused uses logvar_clamp=(-20, 10), eager no clamp; "
          f"measured copy bandwidth {copy_gbps:.0f} GB/s (read + write); eager and fused interleaved, "
          f"median of {args.reps} (large shapes: fewer) after warm-up")
    print()
    print(markdown_table(
        ["shape", "pass", "impl", "median ms", "GB/s (eff.)", "% of copy", "peak extra mem (fwd+bwd)", "saved for bwd",
         "fused / eager", "target (CPU)"],
        table,
    ))


def make_step_cpu(impl, rows, latent, dtype_name, backward):
    """For the peak-memory child: one warm-up call first, so that one-time costs (lazy imports, op
    registration) are not counted as the per-call memory."""
    step = make_step(impl, rows, latent, torch.device("cpu"), getattr(torch, dtype_name), backward)
    step()
    return step


if __name__ == "__main__":
    main()
