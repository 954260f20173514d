"""VIB reparameterisation + per-row KL to N(0, I), fused, with noise regenerated in backward.

For ``mu``, ``logvar`` of shape ``[..., L]`` and ``lv = clamp(logvar, *logvar_clamp)``::

    z  = mu + exp(lv / 2) * eps,          eps ~ N(0, I)      (z = mu when training=False)
    kl = 0.5 * sum_j (mu_j^2 + exp(lv_j) - lv_j - 1)           per row, shape [...]

``eps`` is never stored: the backward draws it again from the seed, so the only tensors kept for
backward are ``mu`` and ``logvar`` (and ``row_ids`` when given; eager PyTorch keeps ``eps``,
``exp(lv / 2)`` and ``exp(lv)`` as well). What ``eps`` is a function of:

* ``row_ids=None``: the seed and the element's position in the tensor, so a row's noise depends on
  which rows were batched with it.
* ``row_ids`` given (an integer id per row, shape ``mu.shape[:-1]``): the seed, the row's id and
  the column only. Give the same id to the same item (e.g. ``sequence * T + position``) and it gets
  the same noise however rows are batched, permuted or sharded over processes: a data-parallel run
  then draws exactly what a single-process run with the same global batch draws.

Backends:

* CUDA (``backend="triton"``): Philox, ``tl.randn(seed, i)`` with ``i`` the flat row-major index, or
  ``i = row_id * L + j`` (64-bit) with ``row_ids``; one kernel for the forward (writes z and the KL),
  one for the backward.
* CPU (``backend="torch"``): the C++ extension (``csrc/vib.cpp``; one pass per row, threads over
  rows with the GIL released) drawing the counter-based
  :func:`vrpo_fast.ops._random.keyed_normal` of ``(seed, key, j)``, key = the row id, or the flat
  row index when ``row_ids`` is None (so ``row_ids=arange(rows)`` reproduces the id-less stream).
  Without the extension (one-time warning), the same math and the same stream, bit for bit, in
  cache-sized torch blocks.

The two backends draw different streams for the same seed (Philox vs. the SplitMix64 hash), with or
without ``row_ids``. Each is deterministic for a given (seed, shape[, row_ids]). Arithmetic is
in fp32 (fp64 for fp64 inputs) on both; outputs are stored in the input dtype, the KL in fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import (FLOAT_DTYPES, check_backend, check_leading_shape, check_same_shape, check_tensor, check_uint63,
                      data_checks_possible, is_compiling, resolve_backend)
from . import _cpu_ext
from ._random import keyed_normal

_SEED_LIMIT = 2**63
_ROW_ID_DTYPES = (torch.int32, torch.int64)


def vib_sample_kl_reference(mu, logvar, eps=None, *, training=True, logvar_clamp=(-20.0, 10.0)):
    """Plain PyTorch twin of :func:`vib_sample_kl` with explicit noise ``eps`` (``randn_like`` if None).

    Every intermediate (``eps``, ``exp(lv / 2)``, the KL terms) stays alive for autograd.
    """
    lv = logvar.clamp(*logvar_clamp) if logvar_clamp is not None else logvar
    kl = 0.5 * (mu.float() ** 2 + lv.float().exp() - lv.float() - 1.0).sum(-1)
    if not training:
        return mu, kl
    if eps is None:
        eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * lv) * eps
    return z, kl


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------


def _check_clamp(logvar_clamp) -> Optional[Tuple[float, float]]:
    if logvar_clamp is None:
        return None
    if not isinstance(logvar_clamp, (tuple, list)) or len(logvar_clamp) != 2:
        raise TypeError(f"logvar_clamp must be None or a (low, high) pair of floats, got {logvar_clamp!r}")
    for bound in logvar_clamp:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"logvar_clamp bounds must be real numbers, got {logvar_clamp!r}")
    lo, hi = float(logvar_clamp[0]), float(logvar_clamp[1])
    if not lo < hi:  # also rejects NaN
        raise ValueError(f"logvar_clamp must satisfy low < high, got {logvar_clamp!r}")
    return lo, hi


def _check_row_ids(row_ids, mu: torch.Tensor) -> torch.Tensor:
    """Validate ``row_ids``' dtype, shape and device against ``mu`` ``[..., L]``; return them flattened
    to ``[rows]``. Their range is checked inside the op (training only: eval does not use them)."""
    check_tensor("row_ids", row_ids, dtypes=_ROW_ID_DTYPES)
    check_leading_shape("row_ids", row_ids, "mu", mu)
    return row_ids.reshape(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# CPU / plain-torch path: the same math as the kernels, walked over blocks of rows so that every
# temporary is a small, cache-resident, reused buffer (eager PyTorch allocates ~10 fresh
# latent-sized tensors per forward + backward; this path allocates only its outputs).
#
# Noise: keyed_normal(seed, row id or flat row index, column), drawn again in the backward.
# ----------------------------------------------------------------------------------------------

_CPU_BLOCK_ELEMS = (1 << 15) - 1  # just under ATen's 32768-element grain size: ops stay serial


class _Scratch:
    """Reusable buffers for the block loop."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.bufs = {}

    def buf(self, name: str, shape) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self.bufs.get(name)
        if b is None or b.numel() < n:
            b = self.bufs[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return b[:n].view(shape)

    def compute_dtype(self, block: torch.Tensor, name: str) -> torch.Tensor:
        return block if block.dtype == self.dtype else self.buf(name, block.shape).copy_(block)


def _for_each_block(n_rows: int, n_cols: int, device, dtype, body) -> None:
    """Run ``body(block, r0, r1, scratch)`` over all row blocks, in order, on the calling thread
    (the CPU fast path is the C++ extension, which threads over rows itself)."""
    step = max(1, _CPU_BLOCK_ELEMS // n_cols) if device.type == "cpu" else max(1, n_rows)
    scratch = _Scratch(device, dtype)
    for b in range(-(-n_rows // step)):
        body(b, b * step, min(n_rows, (b + 1) * step), scratch)


def _out_of_range(x: torch.Tensor, clamp) -> bool:
    """Whether clamping ``x`` changes anything. On CPU one read-only pass decides, so the usual
    in-range block skips the clamp's write pass and the backward's gradient mask; elsewhere (no
    host sync wanted) always clamp."""
    if clamp is None or x.numel() == 0:
        return False
    if x.device.type != "cpu":
        return True
    lo, hi = torch.aminmax(x)
    # NaN (aminmax returns NaN) counts as out of range: torch.clamp gives it a zero gradient.
    return not (bool(lo >= clamp[0]) and bool(hi <= clamp[1]))


def _noise_fn(seed: int, row_ids: Optional[torch.Tensor], n_cols: int, device, dtype):
    """``noise(scratch, shape, block, r0, r1)`` -> eps for rows ``[r0, r1)``, the same in forward and
    backward: ``keyed_normal(seed, key, column)`` with key = the row id, or the flat row index when no
    ids are given (the stream the C++ kernel draws, bit for bit)."""
    cols = torch.arange(n_cols, device=device).unsqueeze(0)
    if row_ids is None:
        return lambda s, shape, b, r0, r1: keyed_normal(
            seed, torch.arange(r0, r1, device=device).unsqueeze(1), cols, dtype=dtype)
    return lambda s, shape, b, r0, r1: keyed_normal(seed, row_ids[r0:r1].unsqueeze(1), cols, dtype=dtype)


def _forward_torch(mu, logvar, seed, training, clamp, kl_dtype, row_ids=None):
    if mu.device.type == "cpu":
        ext = _cpu_ext.extension("vib_forward", "vib_sample_kl")
        if ext is not None:
            return _forward_cpp(ext, mu, logvar, seed, training, clamp, kl_dtype, row_ids)
    n_rows, n_cols = mu.shape
    cdt = _compute_dtype(mu.dtype)
    noise = _noise_fn(seed, row_ids, n_cols, mu.device, cdt)
    kl = torch.empty(n_rows, dtype=cdt, device=mu.device)
    z = torch.empty((n_rows, n_cols), dtype=mu.dtype, device=mu.device) if training else None

    def block(b, r0, r1, s):
        shape = (r1 - r0, n_cols)
        mu_b = s.compute_dtype(mu[r0:r1], "mu")
        lv = s.compute_dtype(logvar[r0:r1], "lv")
        if _out_of_range(lv, clamp):
            lv = torch.clamp(lv, *clamp, out=s.buf("lv", shape))  # in place if lv is that buffer
        std = torch.mul(lv, 0.5, out=s.buf("std", shape)).exp_()
        if training:
            eps = noise(s, shape, b, r0, r1)
            if z.dtype == cdt:
                torch.addcmul(mu_b, std, eps, out=z[r0:r1])
            else:
                z[r0:r1].copy_(eps.mul_(std).add_(mu_b))
        # std is dead once z is written: reuse it for the KL terms exp(lv) - lv - 1 + mu^2.
        terms = std.square_().sub_(lv).sub_(1.0).addcmul_(mu_b, mu_b)
        torch.sum(terms, -1, out=kl[r0:r1]).mul_(0.5)

    _for_each_block(n_rows, n_cols, mu.device, cdt, block)
    return z, kl.to(kl_dtype)


def _backward_torch(mu, logvar, grad_z, grad_kl, seed, clamp, row_ids=None):
    # dmu = grad_z + grad_kl * mu
    # dlv = [lo <= logvar <= hi] * (0.5 * grad_z * eps * std + 0.5 * grad_kl * (std^2 - 1))
    if mu.device.type == "cpu":
        ext = _cpu_ext.extension("vib_backward", "vib_sample_kl")
        if ext is not None:
            return _backward_cpp(ext, mu, logvar, grad_z, grad_kl, seed, clamp, row_ids)
    n_rows, n_cols = mu.shape
    cdt = _compute_dtype(mu.dtype)
    noise = _noise_fn(seed, row_ids, n_cols, mu.device, cdt)
    dmu = torch.empty((n_rows, n_cols), dtype=mu.dtype, device=mu.device)
    dlv = torch.empty((n_rows, n_cols), dtype=logvar.dtype, device=logvar.device)
    direct = dmu.dtype == cdt and (grad_z is None or grad_z.dtype == cdt)  # write outputs via out=

    def block(b, r0, r1, s):
        shape = (r1 - r0, n_cols)
        lv_in = s.compute_dtype(logvar[r0:r1], "lv_in")
        clipped = _out_of_range(lv_in, clamp)
        lv = torch.clamp(lv_in, *clamp, out=s.buf("lv", shape)) if clipped else lv_in
        std = torch.mul(lv, 0.5, out=s.buf("std", shape)).exp_()
        gz = grad_z[r0:r1] if grad_z is not None else None
        g = grad_kl[r0:r1].to(cdt).unsqueeze(-1) if grad_kl is not None else None
        dmu_b, dlv_b = dmu[r0:r1], dlv[r0:r1]

        if g is None:
            dmu_b.copy_(gz)
        else:
            mu_b = s.compute_dtype(mu[r0:r1], "mu")
            if gz is None:
                torch.mul(mu_b, g, out=dmu_b) if direct else dmu_b.copy_(mu_b * g)
            else:
                torch.addcmul(gz, mu_b, g, out=dmu_b) if direct else dmu_b.copy_(torch.addcmul(gz.to(cdt), mu_b, g))

        if gz is not None:
            # The very same eps as the forward: same block and generator seed, or same keys.
            eps_std = noise(s, shape, b, r0, r1).mul_(std)
        if g is None:
            res = eps_std.mul_(gz).mul_(0.5)
        else:
            var_half = std.square_().sub_(1.0).mul_(0.5 * g)
            if gz is None:
                res = var_half
            elif direct:
                res = torch.addcmul(var_half, eps_std, gz, value=0.5, out=dlv_b)
            else:
                res = var_half.addcmul_(eps_std, gz.to(cdt), value=0.5)
        if res is not dlv_b:
            dlv_b.copy_(res)
        if clipped:
            # torch.clamp semantics: zero gradient strictly outside [lo, hi]; clamp(x) == x inside.
            dlv_b.masked_fill_(lv.ne(lv_in), 0.0)

    _for_each_block(n_rows, n_cols, mu.device, cdt, block)
    return dmu, dlv


# ----------------------------------------------------------------------------------------------
# CPU: the C++ extension (csrc/vib.cpp): one pass per row, noise hashed in registers, threads over
# rows inside C++ with the GIL released. Same math and the same keyed_normal stream as above.
# ----------------------------------------------------------------------------------------------
def _ids_arg(row_ids):
    if row_ids is None:
        return None, 0, 0
    ids = row_ids.contiguous()
    return ids, ids.data_ptr(), (1 if ids.dtype == torch.int32 else 2)


def _clamp_bounds(clamp):
    return (float(clamp[0]), float(clamp[1]), True) if clamp is not None else (0.0, 0.0, False)


def _forward_cpp(ext, mu, logvar, seed, training, clamp, kl_dtype, row_ids):
    n_rows, n_cols = mu.shape
    mu, logvar = _cpu_ext.last_dim_contiguous(mu), _cpu_ext.last_dim_contiguous(logvar)
    kl = torch.empty(n_rows, dtype=_compute_dtype(mu.dtype))
    z = torch.empty((n_rows, n_cols), dtype=mu.dtype) if training else None
    ids, ids_ptr, ids_code = _ids_arg(row_ids)
    lo, hi, has_clamp = _clamp_bounds(clamp)
    ext.vib_forward(mu.data_ptr(), logvar.data_ptr(), ids_ptr, z.data_ptr() if training else 0, kl.data_ptr(),
                    n_rows, n_cols, _cpu_ext.row_stride(mu), _cpu_ext.row_stride(logvar),
                    _cpu_ext.DTYPE_CODES[mu.dtype], ids_code, seed, training, lo, hi, has_clamp,
                    torch.get_num_threads())
    return z, kl.to(kl_dtype)


def _backward_cpp(ext, mu, logvar, grad_z, grad_kl, seed, clamp, row_ids):
    n_rows, n_cols = mu.shape
    mu, logvar = _cpu_ext.last_dim_contiguous(mu), _cpu_ext.last_dim_contiguous(logvar)
    if grad_z is not None:
        grad_z = _cpu_ext.last_dim_contiguous(grad_z.to(mu.dtype))
    if grad_kl is not None:
        grad_kl = grad_kl.to(_compute_dtype(mu.dtype)).contiguous()
    dmu = torch.empty((n_rows, n_cols), dtype=mu.dtype)
    dlv = torch.empty((n_rows, n_cols), dtype=logvar.dtype)
    ids, ids_ptr, ids_code = _ids_arg(row_ids)
    lo, hi, has_clamp = _clamp_bounds(clamp)
    ext.vib_backward(mu.data_ptr(), logvar.data_ptr(), ids_ptr,
                     grad_z.data_ptr() if grad_z is not None else 0,
                     grad_kl.data_ptr() if grad_kl is not None else 0, dmu.data_ptr(), dlv.data_ptr(),
                     n_rows, n_cols, _cpu_ext.row_stride(mu), _cpu_ext.row_stride(logvar),
                     _cpu_ext.row_stride(grad_z) if grad_z is not None else 0,
                     _cpu_ext.DTYPE_CODES[mu.dtype], ids_code, seed, lo, hi, has_clamp, torch.get_num_threads())
    return dmu, dlv


# ----------------------------------------------------------------------------------------------
# Custom ops. The seed travels as a 0-d int64 CPU tensor, so torch.compile neither specialises on it
# (no recompile per seed) nor breaks the graph to draw one; the row_ids range check (data-dependent)
# runs inside the op. Inputs are 2-D [rows, L] views.
# ----------------------------------------------------------------------------------------------
def _check_row_id_range(row_ids: torch.Tensor, n_cols: int) -> None:
    """Ids in ``[0, (2**63 - L) // L]`` so that the Philox offset ``id * L + j`` fits in int64 (one
    min/max reduction; a host sync on CUDA; skipped inside CUDA-graph capture, where an id out of range
    only changes which Philox numbers the row draws)."""
    if row_ids.numel() == 0 or not data_checks_possible(row_ids):
        return
    max_id = (2**63 - n_cols) // n_cols
    lo, hi = (int(v) for v in torch.aminmax(row_ids))
    if lo < 0:
        raise ValueError(f"row_ids must be non-negative, got {lo}")
    if hi > max_id:
        raise ValueError(f"row_ids must be at most (2**63 - L) // L = {max_id} for L = {n_cols}, got {hi}")


def _clamp_arg(has_clamp: bool, lo: float, hi: float):
    return (lo, hi) if has_clamp else None


@torch.library.custom_op("vrpo_fast::vib_fwd", mutates_args=())
def _vib_fwd_op(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor, training: bool, has_clamp: bool,
                clamp_lo: float, clamp_hi: float, backend: str,
                row_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(z, kl)`` for ``[rows, L]`` inputs; ``z`` is an empty [0] tensor when not training."""
    if int(seed) < 0:
        raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
    if row_ids is not None:
        _check_row_id_range(row_ids, mu.shape[-1])
    path = resolve_backend(backend, mu, logvar)
    clamp = _clamp_arg(has_clamp, clamp_lo, clamp_hi)
    kl_dtype = torch.promote_types(mu.dtype, torch.float32)
    if path == "triton":
        from vrpo_fast.kernels._launch import last_dim_contiguous
        from vrpo_fast.kernels.vib import vib_forward

        z, kl = vib_forward(last_dim_contiguous(mu), last_dim_contiguous(logvar), int(seed), training, clamp,
                            kl_dtype, row_ids=row_ids.contiguous() if row_ids is not None else None)
    else:
        z, kl = _forward_torch(mu, logvar, int(seed), training, clamp, kl_dtype, row_ids=row_ids)
    return (z if training else mu.new_empty(0)), kl


@_vib_fwd_op.register_fake
def _(mu, logvar, seed, training, has_clamp, clamp_lo, clamp_hi, backend, row_ids):
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if training else mu.new_empty(0)
    return z, mu.new_empty(mu.shape[:1], dtype=torch.promote_types(mu.dtype, torch.float32))


@torch.library.custom_op("vrpo_fast::vib_bwd", mutates_args=())
def _vib_bwd_op(mu: torch.Tensor, logvar: torch.Tensor, grad_z: Optional[torch.Tensor],
                grad_kl: Optional[torch.Tensor], seed: torch.Tensor, has_clamp: bool, clamp_lo: float,
                clamp_hi: float, backend: str, row_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d mu, d logvar)``, ``[rows, L]`` each; ``eps`` is drawn again from the seed (and ids)."""
    path = resolve_backend(backend, mu, logvar)
    clamp = _clamp_arg(has_clamp, clamp_lo, clamp_hi)
    if path == "triton":
        from vrpo_fast.kernels._launch import last_dim_contiguous
        from vrpo_fast.kernels.vib import vib_backward

        return vib_backward(
            last_dim_contiguous(mu), last_dim_contiguous(logvar),
            last_dim_contiguous(grad_z) if grad_z is not None else None,
            grad_kl.contiguous() if grad_kl is not None else None,
            int(seed), clamp, row_ids=row_ids.contiguous() if row_ids is not None else None,
        )
    return _backward_torch(mu, logvar, grad_z, grad_kl, int(seed), clamp, row_ids=row_ids)


@_vib_bwd_op.register_fake
def _(mu, logvar, grad_z, grad_kl, seed, has_clamp, clamp_lo, clamp_hi, backend, row_ids):
    return (torch.empty(mu.shape, dtype=mu.dtype, device=mu.device),
            torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device))


def _vib_setup_context(ctx, inputs, output):
    mu, logvar, seed, training, has_clamp, clamp_lo, clamp_hi, backend, row_ids = inputs
    # mu, logvar, the seed and the ids: eps is regenerated, never saved.
    ctx.save_for_backward(mu, logvar, seed, row_ids)
    ctx.set_materialize_grads(False)
    ctx.config = (training, has_clamp, clamp_lo, clamp_hi, backend)


def _vib_backward(ctx, grad_z, grad_kl):
    mu, logvar, seed, row_ids = ctx.saved_tensors
    training, has_clamp, clamp_lo, clamp_hi, backend = ctx.config
    if not training:
        grad_z = None
    nones = (None,) * 7
    if grad_z is None and grad_kl is None:
        return (None, None) + nones
    dmu, dlv = _vib_bwd_op(mu, logvar, grad_z, grad_kl, seed, has_clamp, clamp_lo, clamp_hi, backend, row_ids)
    return (dmu, dlv) + nones


torch.library.register_autograd("vrpo_fast::vib_fwd", _vib_backward, setup_context=_vib_setup_context)


def _seed_tensor(seed, training: bool) -> torch.Tensor:
    if seed is not None:
        if is_compiling():
            # No int() / operator.index here: that would specialise the graph on the seed's value
            # (one recompile per seed). The op checks the sign of the value at run time.
            return torch.scalar_tensor(seed, dtype=torch.int64)
        return torch.tensor(check_uint63("seed", seed, "an int or None"), dtype=torch.int64)
    if training:
        # From torch's default CPU generator, so torch.manual_seed(...) makes seed=None reproducible.
        return torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64)
    return torch.zeros((), dtype=torch.int64)  # unused: eval draws no noise (and leaves the global RNG alone)


def vib_sample_kl(
    mu, logvar, *, seed=None, training=True, logvar_clamp=(-20.0, 10.0), backend="auto", row_ids=None
):
    """Fused VIB sample ``z`` and per-row KL to N(0, I); see the module docstring for the math.

    A PyTorch custom op underneath (``torch.ops.vrpo_fast.vib_fwd``), so ``torch.compile(fullgraph=True)``
    traces it (also with ``seed=None``, drawn in the graph).

    Args:
        mu, logvar: ``[..., L]`` tensors of the same shape, dtype (fp32/bf16/fp16/fp64) and device.
        seed: int in ``[0, 2**63)`` fixing ``eps``; None draws one from torch's default CPU generator
            (so ``torch.manual_seed`` controls it). The same seed gives the same ``z`` on one backend.
        training: False returns ``z = mu`` (no noise) and still the KL.
        logvar_clamp: ``(low, high)`` applied to ``logvar`` before use (zero gradient outside it,
            like ``torch.clamp``; NaN stays NaN); None disables clamping.
        backend: ``"auto"`` (CUDA -> Triton, CPU -> torch), ``"triton"`` or ``"torch"``.
        row_ids: None, or an int32/int64 tensor of shape ``mu.shape[:-1]`` on ``mu``'s device: a
            non-negative id per row (at most ``(2**63 - L) // L``). Then ``eps[..., j]`` of a row is a
            pure function of ``(seed, id, j)`` on each backend, so the same (row, id) gets bitwise the
            same ``z`` and gradients however rows are batched, permuted or sharded. Ignored (shape,
            dtype and device still checked) when ``training=False``. None: ``eps`` depends on the
            row's position in the tensor.

    Returns:
        ``(z, kl)``: ``z`` like ``mu`` (same dtype), ``kl`` of shape ``mu.shape[:-1]`` in fp32
        (fp64 for fp64 inputs). Both are differentiable w.r.t. ``mu`` and ``logvar``; the backward
        keeps only ``mu``, ``logvar``, the seed and ``row_ids``.
    """
    check_tensor("mu", mu, dtypes=FLOAT_DTYPES)
    check_tensor("logvar", logvar, dtypes=FLOAT_DTYPES)
    if mu.dim() == 0:
        raise ValueError("mu must have a latent (last) dimension, got a 0-D tensor")
    check_same_shape("mu", mu, "logvar", logvar)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have the same dtype as mu ({mu.dtype}), got {logvar.dtype}")
    check_tensor("logvar", logvar, device=mu.device)
    if mu.shape[-1] == 0:
        raise ValueError(f"mu must have a non-empty latent (last) dimension, got shape {tuple(mu.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    clamp = _check_clamp(logvar_clamp)
    if row_ids is not None:
        row_ids = _check_row_ids(row_ids, mu)
        if not training:
            row_ids = None  # eval draws no noise
    check_backend(backend)
    seed_t = _seed_tensor(seed, training)
    n_cols = mu.shape[-1]
    z, kl = _vib_fwd_op(mu.reshape(-1, n_cols), logvar.reshape(-1, n_cols), seed_t, training, clamp is not None,
                        clamp[0] if clamp else 0.0, clamp[1] if clamp else 0.0, backend, row_ids)
    kl = kl.view(mu.shape[:-1])
    return (z.view(mu.shape), kl) if training else (mu, kl)
