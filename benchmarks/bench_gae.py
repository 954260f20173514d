"""Benchmark GAE: the per-timestep PyTorch loop vs vrpo_fast's paths, with a memcpy for reference.

Rows (fp32 rewards/values, bool mask, gamma=1, lam=0.95, multi-turn masks with right padding):

* ``loop``     -- the per-timestep loop as TRL / OpenRLHF / verl write it (one set of column ops per
  token, masked tokens carried across), written here from scratch;
* ``verl``     -- verl's ``compute_gae_advantage_return`` semantics re-implemented plainly: the same
  per-timestep loop (observation tokens skipped through the mask), ``returns = advantages + values``,
  then masked whitening (mean and unbiased variance over the mask, shift_mean); the yardstick of
  the ``>= 100x`` target for ``cpp+whiten``;
* ``fallback`` -- vrpo_fast's vectorised PyTorch path (reverse cumulative sums, no loop over T);
* ``cpp``      -- the C++ extension (CPU);
* ``triton``   -- the Triton kernel (CUDA only; one launch, ``validate=False``: no host sync);
* ``*+whiten`` -- the same with the batch whitening fused in (C++: same pass + one rescale sweep;
  Triton: one more launch). The loop row has no whitening, so their speed-up slightly understates;
* ``memcpy``   -- ``copy_`` of rewards, values and mask into preallocated buffers: reads the op's
  input bytes and writes about its output bytes; the bandwidth yardstick.

GB/s counts the bytes the op must move once: read rewards, values, mask; write advantages, returns.

    python benchmarks/bench_gae.py            # B in {8, 256} x T in {512, 4096}, plus B=256 T=2048
    python benchmarks/bench_gae.py --quick    # small shapes
    python benchmarks/bench_gae.py --threads 1  # on a shared / loaded CPU box: steadier numbers

Columns: median and best wall time, GB/s at the median, speed-up over the loop on the benchmark
device, time relative to the memcpy on the same device, peak extra memory of one call (CPU: fresh
process, RSS; CUDA: caching allocator).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    cpu_peak_extra_bytes, cuda_peak_extra_bytes, fmt_bytes, machine, markdown_table, measure_copy_gbps, pct_of,
    time_ms,
)

GAMMA, LAM = 1.0, 0.95


def gae_loop(rewards, values, mask, gamma, lam):
    """Per-timestep GAE as the common RLHF trainers write it (one iteration per token)."""
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    reversed_adv = []
    for t in reversed(range(T)):
        m_t = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = m_t * candidate + (1.0 - m_t) * running
        next_value = m_t * values[:, t] + (1.0 - m_t) * next_value
        reversed_adv.append(running * m_t)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * m
    return advantages, returns


def verl_gae(rewards, values, mask, gamma, lam):
    """verl-style GAE + masked whitening, written from its documented semantics (no verl import)."""
    m = mask.to(rewards.dtype)
    next_values = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    last = torch.zeros_like(next_values)
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        step = delta + gamma * lam * last
        next_values = values[:, t] * m[:, t] + (1 - m[:, t]) * next_values
        last = step * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    returns = advantages + values
    n = m.sum()
    mean = (advantages * m).sum() / n
    var = (((advantages - mean) ** 2) * m).sum() / (n - 1)  # unbiased
    advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * m
    return advantages, returns


def make_inputs(B, T, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen) * 0.1
    values = torch.randn(B, T, generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # prompt-side padding stripped; response of random length, 2 tool spans inside
        n = int(torch.randint(T // 2, T + 1, (1,), generator=gen))
        mask[b, :n] = True
        for _ in range(2):
            s = int(torch.randint(0, max(n - 16, 1), (1,), generator=gen))
            mask[b, s:s + 16] = False
    return rewards.to(device), values.to(device), mask.to(device)


def make_callable(impl, B, T, device="cpu"):
    """Build inputs and return the zero-argument callable to time (module level: picklable)."""
    ops_gae = importlib.import_module("vrpo_fast.ops.gae")
    rewards, values, mask = make_inputs(B, T, device)
    if impl == "loop":
        return lambda: gae_loop(rewards, values, mask, GAMMA, LAM)
    if impl == "verl":
        return lambda: verl_gae(rewards, values, mask, GAMMA, LAM)
    if impl == "fallback":
        return lambda: ops_gae._gae_torch(rewards, values, mask, GAMMA, LAM, False, True)
    if impl == "cpp":
        return lambda: ops_gae.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="torch")
    if impl == "cpp+whiten":
        return lambda: ops_gae.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, whiten=True, backend="torch")
    if impl == "triton":
        return lambda: ops_gae.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="triton", validate=False)
    if impl == "triton+whiten":
        return lambda: ops_gae.gae(
            rewards, values, mask, gamma=GAMMA, lam=LAM, whiten=True, backend="triton", validate=False
        )
    if impl == "memcpy":
        out = (torch.empty_like(rewards), torch.empty_like(values), torch.empty_like(mask))
        return lambda: (out[0].copy_(rewards), out[1].copy_(values), out[2].copy_(mask))
    raise ValueError(impl)


def make_callable_warm(impl, B, T, device="cpu"):
    """make_callable after one warm-up call (peak memory then excludes one-time import costs)."""
    fn = make_callable(impl, B, T, device)
    fn()
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (spawns processes)")
    ap.add_argument("--reps", type=int, default=30, help="timed repeats (loop and fallback: at most 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (also used by the C++ pass); 0: default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", type=str, nargs="+", default=None, help="BxT, e.g. 256x2048")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device).type
    cuda = device == "cuda"
    shapes = [(8, 128), (64, 512)] if args.quick else [(8, 512), (8, 4096), (256, 512), (256, 2048), (256, 4096)]
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.lower().split("x")) for sh in args.shapes]
    reps = 3 if args.quick else args.reps
    ops_gae = importlib.import_module("vrpo_fast.ops.gae")
    has_cpp = ops_gae._load_extension()[0] is not None
    # (impl, device): the loop, fallback and memcpy run on the benchmark device; the C++ extension on
    # the CPU (with its own CPU memcpy when the benchmark device is a GPU).
    runs = [("loop", device), ("verl", device), ("fallback", device)]
    runs += [("triton", "cuda"), ("triton+whiten", "cuda")] if cuda else []
    runs += [("cpp", "cpu"), ("cpp+whiten", "cpu")] if has_cpp else []
    runs += [("memcpy", device)] + ([("memcpy", "cpu")] if cuda and has_cpp else [])

    # Bandwidth limit of each device used, measured here (large copy, read + write).
    copy_gbps = {dev: measure_copy_gbps(dev) for dev in sorted({dev for _, dev in runs})}
    rows, targets = [], []
    for B, T in shapes:
        op_bytes = B * T * (4 + 4 + 1 + 4 + 4)
        # Correctness first: every path against the loop.
        ref = make_callable("loop", B, T, device)()
        for impl, dev in runs:
            if impl in ("loop", "verl", "memcpy") or impl.endswith("+whiten"):
                continue
            got = make_callable(impl, B, T, dev)()
            for g, w in zip(got, ref):
                torch.testing.assert_close(g.to(device), w, rtol=1e-4, atol=2e-3)
        times, best = {}, {}
        fast = []
        for impl, dev in runs:
            fn = make_callable(impl, B, T, dev)
            if dev == "cuda":  # do_bench: its own warm-up and median
                times[impl, dev] = best[impl, dev] = time_ms(fn, device=dev)
                continue
            if impl in ("loop", "verl", "fallback"):
                fn()
                samples = [time_ms(fn, device=dev, warmup=0, reps=1) for _ in range(min(reps, 3))]
                times[impl, dev], best[impl, dev] = statistics.median(samples), min(samples)
            else:
                fast.append((impl, dev, fn))
        # The fast CPU paths interleaved rep by rep: on a shared machine they see the same load.
        for _, _, fn in fast:
            for _ in range(3):
                fn()
        samples = {(impl, dev): [] for impl, dev, _ in fast}
        for _ in range(reps):
            for impl, dev, fn in fast:
                samples[impl, dev].append(time_ms(fn, device=dev, warmup=0, reps=1))
        for key, vals in samples.items():
            times[key], best[key] = statistics.median(vals), min(vals)
        if (B, T) == (256, 2048) and ("cpp+whiten", "cpu") in times:
            targets.append((times["verl", "cpu"] / times["cpp+whiten", "cpu"],
                            times["cpp+whiten", "cpu"] / times["cpp", "cpu"]))
        for impl, dev in runs:
            if args.no_memory:
                peak = "-"
            elif dev == "cuda":
                peak = fmt_bytes(cuda_peak_extra_bytes(make_callable(impl, B, T, dev)))
            else:
                peak = fmt_bytes(cpu_peak_extra_bytes(make_callable_warm, impl, B, T, dev))
            ms = times[impl, dev]
            rows.append([
                f"{B}x{T}", impl, dev, f"{ms:.3f}", f"{best[impl, dev]:.3f}", f"{op_bytes / ms / 1e6:.2f}",
                pct_of(op_bytes / ms / 1e6, copy_gbps[dev]),
                f"{times['loop', device] / ms:.1f}x", f"{ms / times['memcpy', dev]:.2f}x", peak,
            ])
        print(f"done {B}x{T}", file=sys.stderr, flush=True)

    print(f"\n### GAE forward, fp32 rewards/values, bool mask, gamma={GAMMA}, lam={LAM}\n")
    print(f"Machine: {machine()}; measured copy bandwidth: "
          + ", ".join(f"{dev} {g:.0f} GB/s" for dev, g in copy_gbps.items()) + "\n")
    print(markdown_table(
        ["B x T", "impl", "device", "time (ms, median)", "best (ms)", "GB/s (median)", "% of copy",
         f"speed-up vs loop ({device})", "time / memcpy (same device)", "peak extra mem"],
        rows,
    ))
    for vs_verl, whiten_cost in targets:
        print(f"\nTargets (CPU, 256x2048 fp32): cpp+whiten vs verl loop + whitening: {vs_verl:.1f}x "
              f"(target >= 100x: {'met' if vs_verl >= 100 else 'NOT met'}); whitening costs "
              f"{whiten_cost:.2f}x the time without it (target <= 1.3x: {'met' if whiten_cost <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
