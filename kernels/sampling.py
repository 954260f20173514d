"""Triton kernels for keyed Gumbel-max sampling: ``token[i] = argmax_v(logits[i, v] / T + g(i, v))``.

``g(i, v)`` is the standard Gumbel of :func:`vrpo_fast.ops._random.keyed_gumbel` for the keys
``(seed, keys[i], position, v)``, recomputed here bit for bit: SplitMix64 in ``uint64`` arithmetic
(multiplies wrap modulo 2**64, ``>>`` on unsigned values is the logical shift that ``_random.py``
emulates with masks), the top 24 bits of the hash as ``u = min((bits + 0.5) * 2**-24, 1 - 2**-24)`` and
``g = -log(-log(u))`` in fp32. The noise never touches memory: each program streams its part of a row
of logits once, in ``BLOCK_V`` chunks, and keeps a running (value, index) maximum per lane.

How the hash is split: ``seed`` and ``position`` are the same for the whole call, so their hashes
(``mix(seed * G + G)`` and ``mix(position + G)``) are computed once on the host in Python ints; the
row's key is mixed in once per program; every element then costs two SplitMix64 finalisers.

Work split: one program per (row, chunk of the vocabulary). With enough rows to fill the GPU there is
one chunk per row and the kernel writes the token directly; with few rows (e.g. B = 1 at V = 151936)
the vocabulary is cut into chunks, each program writes its chunk's (max, argmax) and a second, tiny
kernel reduces them per row. Ties go to the lowest index within a lane, across lanes and across chunks,
so the result does not depend on the split (nor on which other rows share the call), and matches
``torch.argmax``: NaN counts as the maximum (first NaN wins), an all ``-inf`` row gives index 0.

Arithmetic, chosen to reproduce what eager PyTorch does on CUDA for the reference expression:

* ``logits.float() / T``: PyTorch's CUDA division by a Python scalar multiplies by the fp32 reciprocal
  ``1 / float32(T)``; so does the kernel (``inv_temperature``), and mul + add are not fused into an
  FMA (``enable_fp_fusion=False``) since eager PyTorch rounds the two separately.
* ``log``: ``tl.log`` is the fast approximate log on NVIDIA GPUs; the kernel uses libdevice's
  ``log`` (the CUDA math library's ``logf``, which ``torch.log`` calls). The CPU interpreter has no
  libdevice, so there ``tl.log`` (numpy) is used and may differ from torch's CPU log in the last ulp.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import next_power_of_2, num_warps_for

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Vocabulary elements one program handles per loop iteration (8 per thread at 4 warps).
_BLOCK_V = 1024
# Programs to aim for per SM when the vocabulary is split (a few waves hide the tail).
_PROGRAMS_PER_SM = 4
# "No index yet" marker of a lane (larger than any vocabulary index).
_NO_INDEX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# host side: the call-wide part of the hash, in exact Python integers
# ----------------------------------------------------------------------------------------------
def _mix_int(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _as_int64(x: int) -> int:
    """A 64-bit pattern as a signed value: Triton types scalar ints >= 2**63 as uint64, others as
    int32/int64, and the kernel sign-extends then bitcasts, recovering the pattern either way."""
    return x - (1 << 64) if x >= 1 << 63 else x


def seed_hash(seed: int) -> int:
    """``_random.keyed_hash``'s initial state for ``seed`` (signed int64 value)."""
    return _as_int64(_mix_int(seed * _GOLDEN + _GOLDEN))


def key_hash(key: int) -> int:
    """The mixed form ``mix(key + G)`` in which every key enters the hash (signed int64 value)."""
    return _as_int64(_mix_int(key + _GOLDEN))


def fp32_reciprocal(temperature: float) -> float:
    """``1 / float32(T)`` rounded to fp32, as PyTorch's CUDA ``tensor / scalar`` computes it."""
    t = torch.tensor(float(temperature), dtype=torch.float32)
    return float(torch.reciprocal(t).item())


# ----------------------------------------------------------------------------------------------
# device side
# ----------------------------------------------------------------------------------------------
@triton.jit
def _splitmix64(x):
    """SplitMix64 finaliser of ``uint64`` values (wrapping multiplies, logical shifts)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _bits64(x):
    """Any integer (int32 / int64, tensor or scalar argument) -> its int64 value's bits as uint64."""
    return x.to(tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _row_hash(keys_ptr, row, seed_h, position_h):
    """Hash state after ``(seed, keys[row], position)``: ``mix(mix(s ^ mix(k + G)) ^ mix(p + G))``."""
    key = _bits64(tl.load(keys_ptr + row))
    h = _splitmix64(_bits64(seed_h) ^ _splitmix64(key + 0x9E3779B97F4A7C15))
    return _splitmix64(h ^ _bits64(position_h))


@triton.jit
def _element_hash(row_h, vocab_ids):
    """Final hash of ``(seed, key, position, v)`` for a block of non-negative vocabulary ids."""
    return _splitmix64(row_h ^ _splitmix64(vocab_ids.to(tl.uint64) + 0x9E3779B97F4A7C15))


@triton.jit
def _gumbel(h, PRECISE_LOG: tl.constexpr):
    # Top 24 bits -> (bits + 0.5) * 2**-24 in fp32; bits = 2**24 - 1 rounds to exactly 1.0 there, so
    # clamp to the largest float below 1, as vrpo_fast.ops._random._unit does (u stays inside (0, 1)).
    u = ((h >> 40).to(tl.int32).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u = tl.minimum(u, 0.99999994039535522)
    if PRECISE_LOG:
        g = -libdevice.log(-libdevice.log(u))
    else:
        g = -tl.log(-tl.log(u))
    return g


@triton.jit
def _first_argmax(vals, idxs, NO_INDEX: tl.constexpr):
    """(max, lowest index holding it) of a 1-D block, NaN counting as the maximum like torch.argmax.

    Lanes that hold -inf with ``NO_INDEX`` (never updated) only win when everything is -inf; the
    returned index is then ``NO_INDEX`` and the caller substitutes the first index of its range.
    """
    is_nan = vals != vals
    nan_idx = tl.min(tl.where(is_nan, idxs, NO_INDEX), axis=0)
    clean = tl.where(is_nan, -float("inf"), vals)
    best = tl.max(clean, axis=0)
    best_idx = tl.min(tl.where(clean == best, idxs, NO_INDEX), axis=0)
    has_nan = nan_idx < NO_INDEX
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_idx, best_idx)


@triton.jit(do_not_specialize=["seed_h", "position_h"])
def _keyed_sample_kernel(
    logits_ptr, keys_ptr, tokens_ptr, part_val_ptr, part_idx_ptr,
    V, stride_row, stride_v, seed_h, position_h, inv_temperature, chunk_len, n_chunks,
    SCALE: tl.constexpr, PRECISE_LOG: tl.constexpr, WRITE_TOKEN: tl.constexpr, BLOCK_V: tl.constexpr,
    NO_INDEX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_h = _row_hash(keys_ptr, row, seed_h, position_h)
    row_ptr = logits_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK_V)
    first = chunk * chunk_len
    # Per-lane running maximum: a lane sees increasing indices, so a strict '>' keeps its lowest
    # maximising index; a NaN replaces anything but an earlier NaN. One cross-lane reduction at the end.
    best_val = tl.full([BLOCK_V], -float("inf"), tl.float32)
    best_idx = tl.full([BLOCK_V], NO_INDEX, tl.int32)
    for start in range(0, chunk_len, BLOCK_V):
        idx = first + start + lanes
        # Padding loads -inf: -inf + g = -inf is never strictly greater than a lane's maximum.
        x = tl.load(row_ptr + idx.to(tl.int64) * stride_v, mask=idx < V, other=-float("inf")).to(tl.float32)
        if SCALE:
            x = x * inv_temperature
        x = x + _gumbel(_element_hash(row_h, idx), PRECISE_LOG)
        take = (x > best_val) | ((x != x) & (best_val == best_val))
        best_val = tl.where(take, x, best_val)
        best_idx = tl.where(take, idx, best_idx)
    val, idx = _first_argmax(best_val, best_idx, NO_INDEX)
    idx = tl.where(idx == NO_INDEX, first, idx)  # all -inf: torch.argmax gives the first index
    if WRITE_TOKEN:
        tl.store(tokens_ptr + row, idx.to(tl.int64))
    else:
        tl.store(part_val_ptr + row * n_chunks + chunk, val)
        tl.store(part_idx_ptr + row * n_chunks + chunk, idx)


@triton.jit
def _reduce_chunks_kernel(part_val_ptr, part_idx_ptr, tokens_ptr, n_chunks,
                          BLOCK_C: tl.constexpr, NO_INDEX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    in_row = c < n_chunks
    vals = tl.load(part_val_ptr + row * n_chunks + c, mask=in_row, other=-float("inf"))
    idxs = tl.load(part_idx_ptr + row * n_chunks + c, mask=in_row, other=NO_INDEX)
    # Chunk c's index is the lowest maximiser in chunk c and chunks are in index order, so the lowest
    # index among the chunks holding the row maximum is the row's lowest maximiser.
    _, idx = _first_argmax(vals, idxs, NO_INDEX)
    tl.store(tokens_ptr + row, idx.to(tl.int64))


@triton.jit(do_not_specialize=["seed_h", "position_h"])
def _keyed_hash_kernel(keys_ptr, out_ptr, V, seed_h, position_h, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_h = _row_hash(keys_ptr, row, seed_h, position_h)
    for start in range(0, V, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        h = _element_hash(row_h, idx)
        tl.store(out_ptr + row * V + idx, h.to(tl.int64, bitcast=True), mask=idx < V)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _num_chunks(n_rows: int, V: int, block_v: int, device: torch.device) -> int:
    """Chunks per row: enough programs to fill the GPU when rows are few, one chunk otherwise."""
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(V, block_v), triton.cdiv(_PROGRAMS_PER_SM * n_sm, n_rows), 65535))


def keyed_sample_fwd(
    logits: torch.Tensor, keys: torch.Tensor, *, seed: int, position: int, temperature: float,
    num_chunks: Optional[int] = None,
) -> torch.Tensor:
    """Token ids ``[B]`` (int64). ``logits``: ``[B, V]`` float (any strides); ``keys``: ``[B]``
    int32/int64, contiguous, on the same device; arguments already validated. ``num_chunks`` forces the
    vocabulary split (tests); the result does not depend on it."""
    n_rows, V = logits.shape
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if n_rows == 0:
        return tokens
    block_v = min(_BLOCK_V, next_power_of_2(V))
    n_chunks = num_chunks if num_chunks is not None else _num_chunks(n_rows, V, block_v, logits.device)
    n_chunks = max(1, min(int(n_chunks), triton.cdiv(V, block_v)))
    chunk_len = triton.cdiv(triton.cdiv(V, n_chunks), block_v) * block_v
    n_chunks = triton.cdiv(V, chunk_len)
    split = n_chunks > 1
    part_val = torch.empty((n_rows, n_chunks), dtype=torch.float32, device=logits.device) if split else tokens
    part_idx = torch.empty((n_rows, n_chunks), dtype=torch.int32, device=logits.device) if split else tokens
    inv_t = fp32_reciprocal(temperature)
    _keyed_sample_kernel[(n_rows, n_chunks)](
        logits, keys, tokens, part_val, part_idx,
        V, logits.stride(0), logits.stride(1), seed_hash(seed), key_hash(position), inv_t, chunk_len, n_chunks,
        SCALE=inv_t != 1.0, PRECISE_LOG=logits.device.type != "cpu", WRITE_TOKEN=not split, BLOCK_V=block_v,
        NO_INDEX=_NO_INDEX, num_warps=num_warps_for(block_v), enable_fp_fusion=False,
    )
    if split:
        block_c = next_power_of_2(n_chunks)
        _reduce_chunks_kernel[(n_rows,)](part_val, part_idx, tokens, n_chunks, BLOCK_C=block_c,
                                         NO_INDEX=_NO_INDEX, num_warps=num_warps_for(block_c))
    return tokens


def keyed_hash_rows(keys: torch.Tensor, *, seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """The kernel's hashes ``keyed_hash(seed, keys[i], position, v)`` as an int64 ``[B, vocab_size]``
    tensor (for tests: it must equal :func:`vrpo_fast.ops._random.keyed_hash` bit for bit)."""
    out = torch.empty((keys.shape[0], vocab_size), dtype=torch.int64, device=keys.device)
    if keys.shape[0] == 0 or vocab_size == 0:
        return out
    block_v = min(_BLOCK_V, next_power_of_2(vocab_size))
    _keyed_hash_kernel[(keys.shape[0],)](keys, out, vocab_size, seed_hash(seed), key_hash(position),
                                         BLOCK_V=block_v, num_warps=num_warps_for(block_v))
    return out
