"""Triton kernels of vrpo-fast, installed as ``vrpo_fast.kernels`` (never a top-level ``kernels``).

Kernels are pure: tensors in, tensors out, no config objects, no global state. Each module holds the
``@triton.jit`` kernels of one op plus a thin launcher; autograd glue lives in :mod:`vrpo_fast.ops`.
Importing a module here requires ``triton``.
"""
