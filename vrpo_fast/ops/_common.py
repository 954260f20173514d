"""Argument checking and backend dispatch shared by every op in :mod:`vrpo_fast.ops`.

Every public op validates its inputs here so that bad input raises a clear ``TypeError`` /
``ValueError`` naming the argument and what was expected, never a crash inside a kernel.
"""
from __future__ import annotations

import functools
import operator
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[Iterable[int]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``t`` is a tensor of an allowed dtype/rank/device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        ndim = tuple(ndim)
        if t.dim() not in ndim:
            want = " or ".join(f"{d}-D" for d in ndim)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    return t


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_leading_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must have the shape of ``ref`` without its last dimension and be on ``ref``'s device."""
    if t.shape != ref.shape[:-1]:
        raise ValueError(f"{name} must have the leading shape of {ref_name} {tuple(ref.shape[:-1])}, "
                         f"got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_uint63(name: str, value, expected: str = "an int") -> int:
    """``value`` as a Python int in ``[0, 2**63)`` (seeds, positions, counters); bools are refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or inf (costs one reduction; syncs on CUDA)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def is_compiling() -> bool:
    """True while ``torch.compile`` traces the caller (eager-only checks and options are skipped)."""
    return torch.compiler.is_compiling()


def data_checks_possible(t: torch.Tensor) -> bool:
    """False while a CUDA graph is being captured (e.g. ``torch.compile(mode="reduce-overhead")``): a
    check that reads data back to the host would break the capture, so the ops skip it there and
    their kernels stay memory-safe on bad input instead (see each op)."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_backend(backend) -> str:
    """``backend`` must be one of :data:`BACKENDS` (the device is resolved inside the custom op)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics ops accumulate (and return by default) in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_out_dtype(out_dtype, input_dtype: torch.dtype) -> torch.dtype:
    """``out_dtype="auto"``: the accumulation dtype (fp32; fp64 for fp64 inputs); ``None``: the
    input's dtype; else a floating dtype."""
    if isinstance(out_dtype, str) and out_dtype == "auto":
        return accumulation_dtype(input_dtype)
    if out_dtype is None:
        return input_dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be 'auto', None or one of float16/bfloat16/float32/float64, got {out_dtype!r}")
    return out_dtype


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Pick ``"triton"`` or ``"torch"`` for the given inputs.

    ``auto``: CUDA tensors -> Triton (when installed), CPU tensors -> the C++ / chunked-torch path.
    ``triton`` forces the kernels; on CPU tensors that needs the interpreter (``TRITON_INTERPRET=1``),
    which is how the tests check kernel numerics on a machine without a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (on_cuda and triton_available()) else "torch"
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not installed (pip install triton)")
    if not on_cuda and not triton_interpret():
        raise ValueError(
            "backend='triton' with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing vrpo_fast (or move the tensors to a CUDA device)"
        )
    return "triton"
