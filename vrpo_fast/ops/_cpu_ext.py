"""The C++ extension ``vrpo_fast._C`` for the CPU paths of the ops (VIB, token statistics; GAE loads
it in :mod:`vrpo_fast.ops.gae`), with one warning per op when it is missing.

Buffers are passed by address (``tensor.data_ptr()``) with sizes, strides and a dtype code; the
extension never sees a torch header. Dtype codes are shared with ``csrc/common.h``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

# Tests set this to exercise the pure-PyTorch fallbacks even when the extension is built.
FORCE_TORCH_FALLBACK = False
_warned = set()


@functools.lru_cache(maxsize=None)
def _load(attr: str):
    try:
        from vrpo_fast import _C
    except ImportError as e:  # not built, or built for another Python / ABI
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(_C, attr):
        return None, f"vrpo_fast._C is an old build without {attr}"
    return _C, None


def extension(attr: str, op: str) -> Optional[object]:
    """``vrpo_fast._C`` if it has ``attr`` (else None, with a one-time RuntimeWarning for ``op``)."""
    if FORCE_TORCH_FALLBACK:
        return None
    ext, reason = _load(attr)
    if ext is None and op not in _warned:
        _warned.add(op)
        warnings.warn(
            f"vrpo_fast C++ extension unavailable ({reason}); {op} falls back to a slower PyTorch path on "
            "CPU. Rebuild it with `pip install -e . --no-build-isolation` (or `pip install -e .`) from the "
            "vrpo-fast checkout.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ext


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 (or size 1), else a contiguous copy."""
    return t if (t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def row_stride(t: torch.Tensor) -> int:
    """Element stride between rows of a 2-D tensor (any value when there is one row)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]
