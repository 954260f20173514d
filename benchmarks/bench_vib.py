"""Benchmark: fused VIB sample + KL (vrpo_fast.ops.vib_sample_kl) vs. the eager PyTorch formula.

Eager is what a VIB head usually writes: ``eps = randn_like(mu); z = mu + exp(0.5 * lv) * eps;
kl = 0.5 * (mu**2 + lv.exp() - lv - 1).sum(-1)`` under autograd. The fused op also clamps logvar
(its default ``(-20, 10)``), i.e. it does slightly more work than the eager line.

Reported per (rows, latent): median time of the forward (autograd on, as in training) and of
forward + backward, effective GB/s (minimum traffic of the fused op: forward reads mu, logvar and
writes z; backward reads mu, logvar, grad_z and writes both gradients), peak extra memory of one
forward + backward, and the bytes autograd keeps for backward (counted with saved_tensors_hooks).

    python benchmarks/bench_vib.py            # rows=65536, latent in {64, 256, 1024}
    python benchmarks/bench_vib.py --quick    # rows=4096
"""
from __future__ import annotations

import argparse
import os
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="rows=4096 instead of 65536")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--latents", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args()
    rows = args.rows or (4096 if args.quick else 65536)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    esize = torch.finfo(dtype).bits // 8
    copy_gbps = measure_copy_gbps(device)  # the bandwidth limit of this device, measured here

    table = []
    for latent in args.latents:
        n = rows * latent
        traffic = {False: 3 * n * esize, True: 8 * n * esize}
        for backward in (False, True):
            times = {}
            for impl in IMPLS:
                step = make_step(impl, rows, latent, device, dtype, backward)
                times[impl] = time_ms(step, device=device, warmup=2, reps=args.reps)
                del step
                peak = saved = "-"
                if backward:
                    saved = fmt_bytes(saved_bytes(impl, rows, latent, device, dtype))
                    if not args.no_memory:
                        if device.type == "cuda":
                            peak = fmt_bytes(cuda_peak_extra_bytes(make_step(impl, rows, latent, device, dtype, True)))
                        else:
                            peak = fmt_bytes(cpu_peak_extra_bytes(make_step_cpu, impl, rows, latent, args.dtype, True))
                gbps = traffic[backward] / (times[impl] * 1e-3) / 1e9
                table.append([
                    f"{rows}x{latent}", "fwd+bwd" if backward else "fwd", impl,
                    f"{times[impl]:.2f}", f"{gbps:.1f}", pct_of(gbps, copy_gbps), peak, saved,
                    f"{times['eager'] / times[impl]:.2f}x" if impl == "fused" else "",
                ])
            timings = ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
            print(f"latent={latent} {'fwd+bwd' if backward else 'fwd'}: {timings}", flush=True)

    print()
    print(f"Machine: {machine()}; dtype {args.dtype}; fused uses logvar_clamp=(-20, 10), eager no clamp; "
          f"measured copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    print()
    print(markdown_table(
        ["shape", "pass", "impl", "median ms", "GB/s (eff.)", "% of copy", "peak extra mem (fwd+bwd)", "saved for bwd",
         "speedup"],
        table,
    ))


def make_step_cpu(impl, rows, latent, dtype_name, backward):
    return make_step(impl, rows, latent, torch.device("cpu"), getattr(torch, dtype_name), backward)


if __name__ == "__main__":
    main()
