"""Keyed Gumbel-max sampling from logits: one read of the logits, B token ids written.

``keyed_sample(logits, keys, seed=s, position=n, temperature=T)`` returns, for every row ``i``,

    token[i] = argmax_v(logits[i, v] / T + g(s, keys[i], n, v))

with ``g`` the standard Gumbel of :func:`vrpo_fast.ops._random.keyed_gumbel`. That is an exact sample
from ``softmax(logits[i] / T)`` and a pure function of ``(seed, keys[i], position, logits[i])``: it
does not depend on the other rows of the batch, on padding, or on the process the row is on, which is
what lets a data-parallel rollout sample the tokens of a single-process one (see
:class:`vrpo_fast.rollout.KeyedSampler`, where ``position`` is the index of the token being sampled).

Backends:

* CUDA (``backend="triton"``): :mod:`vrpo_fast.kernels.sampling`. The SplitMix64 hash is recomputed
  in registers, bit-identical to :func:`vrpo_fast.ops._random.keyed_hash`; the logits are read once
  and only the B token ids are written (with few rows, the vocabulary is split over programs and a
  second tiny kernel reduces ``B x chunks`` partial maxima).
* CPU (``backend="torch"``): the reference expression itself, over blocks of rows so that its int64
  temporaries stay bounded (``_TORCH_BLOCK_ELEMS`` elements each).

Memory traffic per call, ``B x V`` logits of ``s`` bytes each (s = 2 for bf16, 4 for fp32):

* fused kernel: ``B * V * s`` read once, ``B * 8`` written (+ ``B * chunks * 8`` partials when split);
  no ``B x V`` temporary. Each element costs two SplitMix64 finalisers (four 64-bit multiplies) and two
  precise fp32 logs, so at large ``B x V`` the kernel is bound by integer arithmetic rather than by
  the bytes it reads; it is still one launch (two when split) per decoding step.
* eager torch path: 14 elementwise kernels on int64 ``B x V`` tensors (the final ``mix(h ^ mix(v))``
  and the 24-bit extraction), 9 on fp32 ones (to float, + 0.5, * 2**-24, two logs, two negations,
  / T, + noise) and the argmax: about 330 bytes of memory traffic per element for bf16 logits (~3.2 GB
  at B = 64, V = 151936, ~165x the 19.4 MB of logits), with several live ``B x V`` int64 temporaries
  (78 MB each at that shape).

Agreement between backends: both compute the same hash bits exactly; the float steps (``/ T``, two
``log``, one add) are the reference's operations in fp32, but different devices' ``log`` (and torch's
CPU ``x / T`` vs. CUDA ``x * (1 / T)``) may differ in the last ulp. The chosen token can therefore only
differ where the two best perturbed scores of a row are within a few ulp of each other (about one
row in 10**5 .. 10**7 at fp32 scale); on one device the result is deterministic and batch-invariant.

Non-finite logits (same as ``torch.argmax`` on the perturbed scores, on every backend):

* ``-inf`` entries are never chosen. A row that is entirely ``-inf`` has nothing to sample and raises
  ``ValueError`` naming the row (checked once per call from the drawn tokens: one gather of ``B``
  values and a host read).
* ``+inf`` entries win over everything finite; among several, the lowest index (no randomness).
* NaN entries win over everything (the first NaN of the row is returned), as ``torch.argmax``
  treats NaN as the maximum. ``check_nan=True`` raises ``ValueError`` instead (one reduction over the
  logits and a host sync, so it is off by default in the decoding loop).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import (FLOAT_DTYPES, check_backend, check_leading_shape, check_tensor, check_uint63,
                      data_checks_possible, is_compiling, resolve_backend)
from ._random import keyed_gumbel

__all__ = ["keyed_sample", "keyed_sample_reference"]

_KEY_DTYPES = (torch.int32, torch.int64)
# Elements per row block on the torch path: bounds each int64 temporary to 32 MiB.
_TORCH_BLOCK_ELEMS = 1 << 22


def keyed_sample_reference(logits, keys, *, seed, position, temperature=1.0):
    """Plain-PyTorch twin of :func:`keyed_sample`: materialises the ``[B, V]`` Gumbel noise."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    noise = keyed_gumbel(seed, keys.to(logits.device)[:, None], position, vocab[None, :])
    return (logits.float() / temperature + noise).argmax(-1)


def _sample_torch(logits, keys, seed, position, temperature):
    n_rows, V = logits.shape
    step = max(1, _TORCH_BLOCK_ELEMS // V)
    if step >= n_rows:
        return keyed_sample_reference(logits, keys, seed=seed, position=position, temperature=temperature)
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    for i in range(0, n_rows, step):
        j = min(n_rows, i + step)
        tokens[i:j] = keyed_sample_reference(logits[i:j], keys[i:j], seed=seed, position=position,
                                             temperature=temperature)
    return tokens


def _validate(logits, keys, seed, position, temperature):
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=(2,))
    check_tensor("keys", keys, dtypes=_KEY_DTYPES)
    check_leading_shape("keys", keys, "logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"logits' vocabulary dimension must be < 2**31, got {logits.shape[1]}")
    if is_compiling():
        # No operator.index on the (symbolic) ints: that would recompile for every position. They
        # travel as 0-d tensors and the op checks their sign at run time.
        seed, position = torch.scalar_tensor(seed, dtype=torch.int64), torch.scalar_tensor(position, dtype=torch.int64)
    else:
        seed = torch.tensor(check_uint63("seed", seed), dtype=torch.int64)
        position = torch.tensor(check_uint63("position", position), dtype=torch.int64)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return seed, position, float(temperature)


def _check_rows_not_all_minus_inf(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """A drawn token whose logit is -inf means the whole row is -inf: every finite logit (plus its
    finite Gumbel) and every NaN / +inf beats -inf. One gather of B values and one host read."""
    if tokens.numel() == 0 or not data_checks_possible(tokens):
        return  # inside CUDA-graph capture: an all -inf row gives token 0 there
    drawn = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
    bad = drawn == -math.inf
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits row {row} is all -inf: there is no token to sample")


@torch.library.custom_op("vrpo_fast::keyed_sample", mutates_args=())
def _keyed_sample_op(logits: torch.Tensor, keys: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                     temperature: float, backend: str, check_nan: bool, num_chunks: Optional[int]) -> torch.Tensor:
    seed, position = int(seed), int(position)
    if seed < 0 or position < 0:
        raise ValueError(f"seed and position must be in [0, 2**63), got seed={seed}, position={position}")
    path = resolve_backend(backend, logits, keys)
    if check_nan and data_checks_possible(logits) and bool(torch.isnan(logits).any()):
        raise ValueError("logits contains NaN (check_nan=True)")
    if path == "triton":
        from vrpo_fast.kernels.sampling import keyed_sample_fwd

        tokens = keyed_sample_fwd(logits, keys.contiguous(), seed=seed, position=position, temperature=temperature,
                                  num_chunks=num_chunks)
    else:
        tokens = _sample_torch(logits, keys, seed, position, temperature)
    _check_rows_not_all_minus_inf(logits, tokens)
    return tokens


@_keyed_sample_op.register_fake
def _(logits, keys, seed, position, temperature, backend, check_nan, num_chunks):
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


def keyed_sample(logits, keys, *, seed, position, temperature=1.0, backend="auto", check_nan=False,
                 _num_chunks=None):
    """One token per row, ``argmax_v(logits[i, v] / temperature + keyed_gumbel(seed, keys[i], position, v))``.

    Args:
        logits: ``[B, V]`` fp16 / bf16 / fp32 / fp64 (read as fp32, like ``logits.float()``); any strides.
        keys: ``[B]`` int32 / int64 on the logits' device, one key per row (e.g. the row's global index
            in the rollout batch). Any int64 value is a valid key (negative ones included); equal keys
            give equal noise.
        seed: int in ``[0, 2**63)``, the run's sampling seed.
        position: int in ``[0, 2**63)``, the index of the token being sampled (keys the step).
        temperature: finite float > 0.
        backend: ``"auto"`` (CUDA -> Triton, CPU -> torch), ``"triton"`` or ``"torch"``.
        check_nan: raise ``ValueError`` if the logits hold a NaN (costs a reduction and a host sync);
            without it a NaN entry is returned as the row's token, as ``torch.argmax`` would.

    Returns:
        int64 ``[B]`` token ids on the logits' device. Non-finite logits: see the module docstring (a
        row that is all ``-inf`` raises ``ValueError``). A PyTorch custom op underneath
        (``torch.ops.vrpo_fast.keyed_sample``): ``torch.compile(fullgraph=True)`` traces it.
    """
    seed, position, temperature = _validate(logits, keys, seed, position, temperature)
    check_backend(backend)
    return _keyed_sample_op(logits, keys, seed, position, temperature, backend, bool(check_nan), _num_chunks)
