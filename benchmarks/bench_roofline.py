"""Measured limits of the device in hand: copy bandwidth and dense GEMM rate.

Every other benchmark states achieved GB/s or TFLOP/s; this one measures what they should be
compared with, on the same card, in the same session (datasheet figures are leads, not limits):

* ``copy``: ``dst.copy_(src)`` of a large fp32 buffer (1 GiB on CUDA, far beyond any L2; 64 MiB on
  CPU). GB/s counts bytes read + bytes written (2 x the buffer), 1 GB = 1e9 B.
* ``GEMM``: ``torch.mm`` of two random ``n x n`` matrices (n = 8192 on CUDA, 512 on CPU), 2 n^3
  flops; bf16, fp32 with IEEE fp32 math, and (CUDA) fp32 with TF32 tensor cores.

Timing: ``triton.testing.do_bench`` median on CUDA, median of a few repeats after warm-up on CPU
(``_common.time_ms``). The functions live in ``benchmarks/_common.py`` (``measure_copy_gbps``,
``measure_matmul_tflops``, ``measured_limits``) for other benchmarks to reuse.

    python benchmarks/bench_roofline.py                  # CUDA if available, else CPU
    python benchmarks/bench_roofline.py --json out.json  # also write the numbers
    python benchmarks/bench_roofline.py --quick          # smaller sizes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, markdown_table, measure_copy_gbps, measure_matmul_tflops  # noqa: E402


def device_details(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - depends on the environment
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            cuda=torch.version.cuda,
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    cores=os.cpu_count())
    return info


def measure(device: torch.device, copy_bytes: int, n: int, log=print) -> dict:
    """All measurements; one that fails is recorded as its error message, the others still run."""
    cuda = device.type == "cuda"
    results = {"copy": None, "gemm": {}, "errors": {}}
    try:
        results["copy"] = {"bytes": copy_bytes, "gbps": measure_copy_gbps(device, copy_bytes)}
        log(f"copy {copy_bytes / 2**20:.0f} MiB: {results['copy']['gbps']:.1f} GB/s")
    except Exception as e:  # a run on a one-shot machine must not die here
        results["errors"]["copy"] = f"{type(e).__name__}: {e}"
        log(f"copy FAILED: {results['errors']['copy']}")
    cases = [("bfloat16", torch.bfloat16, False), ("float32", torch.float32, False)]
    if cuda:
        cases.append(("tf32", torch.float32, True))
    for name, dtype, tf32 in cases:
        try:
            tflops = measure_matmul_tflops(device, dtype, n=n, allow_tf32=tf32)
            results["gemm"][name] = {"n": n, "tflops": tflops}
            log(f"GEMM {name} {n}^3: {tflops:.2f} TFLOP/s")
        except Exception as e:
            results["errors"][f"gemm_{name}"] = f"{type(e).__name__}: {e}"
            log(f"GEMM {name} FAILED: {results['errors'][f'gemm_{name}']}")
    return results


def render(results: dict, details: dict, date: str) -> str:
    rows = []
    copy = results["copy"]
    if copy is not None:
        nbytes = copy["bytes"]
        ms = 2 * nbytes / copy["gbps"] / 1e6
        rows.append(["copy (dst.copy_(src), fp32)", f"{nbytes / 2**20:.0f} MiB", f"{ms:.3f}",
                     f"{copy['gbps']:.1f} GB/s (read + write)"])
    for name, g in results["gemm"].items():
        n = g["n"]
        ms = 2.0 * n**3 / g["tflops"] / 1e9
        label = {"bfloat16": "GEMM bf16", "float32": "GEMM fp32 (IEEE)", "tf32": "GEMM fp32 (TF32)"}[name]
        rows.append([label, f"{n}x{n}x{n}", f"{ms:.3f}", f"{g['tflops']:.2f} TFLOP/s"])
    for name, err in results["errors"].items():
        rows.append([name, "-", "FAILED", err.replace("|", "/")[:120]])
    lines = [
        "## Measured limits (roofline)",
        "",
        f"Machine: {machine()}",
        f"Date: {date}",
        "Details: " + ", ".join(f"{k}={v}" for k, v in details.items() if v is not None),
        "Timing: triton.testing.do_bench median (CUDA) / median after warm-up (CPU)",
        "",
        markdown_table(["measurement", "size", "median ms", "rate"], rows),
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller buffers and matrices")
    ap.add_argument("--copy-mib", type=int, default=None, help="copy buffer size in MiB (default 1024 CUDA, 64 CPU)")
    ap.add_argument("--n", type=int, default=None, help="GEMM size (default 8192 CUDA, 512 CPU)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    cuda = device.type == "cuda"
    copy_mib = args.copy_mib or ((256 if args.quick else 1024) if cuda else (16 if args.quick else 64))
    n = args.n or ((4096 if args.quick else 8192) if cuda else (256 if args.quick else 512))

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    details = device_details(device)
    results = measure(device, copy_mib << 20, n, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(render(results, details, date))
    if args.json:
        payload = {
            "machine": machine(),
            "date": date,
            "details": details,
            "copy_gbps": results["copy"]["gbps"] if results["copy"] else None,
            "copy_bytes": results["copy"]["bytes"] if results["copy"] else None,
            "gemm_tflops": {k: v["tflops"] for k, v in results["gemm"].items()},
            "gemm_n": n,
            "errors": results["errors"],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return results


if __name__ == "__main__":
    main()
