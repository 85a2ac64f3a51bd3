"""Public ops and their dispatch to a backend.

- ``nearest_code(z, codebook)``: the search alone.
- ``simvq_quantize(z, basis, weight, bias)``: projection + search + gather, with the
  SimVQ backward (dW = g^T basis[idx], db = sum g) on the fused backends.

The compiled backends are ``torch.ops.simvq.*`` (schemas in csrc/simvq.cpp). Their fake
(meta) kernels and autograd formulas are registered here, once, when the extension is
first loaded (see ``_ext.load``), so they work with autograd and FakeTensor tracing.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from . import _ext, _validate, reference
from .backends import select_backend

log = logging.getLogger("simvq_kernels")


class QuantizeOutput(NamedTuple):
    zq: torch.Tensor  # (N, d) in z's dtype
    indices: torch.Tensor  # (N,) int64
    distances: torch.Tensor  # (N,) squared L2 of the picked code; float32 (float64 for float64 input)
    backend: str  # the backend that ran


class NearestOutput(NamedTuple):
    indices: torch.Tensor
    distances: torch.Tensor
    backend: str


def _dist_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- registration (once)

def _fake_nearest_code(z, codebook):
    n = z.shape[0]
    return (z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=_dist_dtype(z.dtype)))


def _fake_quantize(z, basis, weight, bias):
    n = z.shape[0]
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=_dist_dtype(z.dtype)))


def _fake_quantize_backward(grad_zq, basis, indices, weight):
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _quantize_setup_context(ctx, inputs, output):
    z, basis, weight, bias = inputs
    _, idx, dist = output
    ctx.save_for_backward(basis, idx, weight)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(idx, dist)


def _quantize_backward(ctx, grad_zq, grad_idx, grad_dist):
    basis, idx, weight = ctx.saved_tensors
    if grad_zq is None:
        return None, None, None, None
    dw, db = torch.ops.simvq.quantize_backward(grad_zq, basis, idx, weight)
    return None, None, dw, (db if ctx.has_bias else None)


def _register_python_parts():
    """Fake kernels + autograd for the compiled ops; called once by ``_ext.load``."""
    torch.library.register_fake("simvq::nearest_code")(_fake_nearest_code)
    torch.library.register_fake("simvq::quantize")(_fake_quantize)
    torch.library.register_fake("simvq::quantize_backward")(_fake_quantize_backward)
    torch.library.register_autograd("simvq::quantize", _quantize_backward,
                                    setup_context=_quantize_setup_context)


# ---------------------------------------------------------------------- public ops

def nearest_code_ex(z, codebook, backend="auto", *, check_finite=None) -> NearestOutput:
    """Like :func:`nearest_code`, also returning which backend ran."""
    _validate.check_nearest_code(z, codebook)
    _validate.check_finite_values((("z", z), ("codebook", codebook)),
                                  _validate.finite_check_enabled(check_finite))
    name = select_backend(backend, z.device, z.dtype)
    log.debug("nearest_code: backend=%s N=%d K=%d d=%d", name, z.shape[0], codebook.shape[0],
              z.shape[1])
    z, codebook = z.detach(), codebook.detach()
    if name == "reference":
        idx, dist = reference.nearest_code(z, codebook)
    elif name == "chunked":
        idx, dist = reference.nearest_code_chunked(z, codebook)
    else:  # compiled backends: cpu, cuda
        idx, dist = torch.ops.simvq.nearest_code(z, codebook)
    return NearestOutput(idx, dist.to(_dist_dtype(z.dtype)), name)


def nearest_code(z, codebook, backend="auto", *, check_finite=None):
    """Nearest code of each row of ``z`` under squared L2 distance.

    Args:
        z: (N, d) float32/float64/bfloat16/float16 tensor. N = 0 is allowed.
        codebook: (K, d) tensor, same device and dtype as ``z``, K >= 1.
        backend: "auto" (fastest available for the device and dtype) or one of
            :func:`simvq_kernels.available_backends`. An explicit backend that cannot
            serve the input raises ``BackendUnavailableError``.
        check_finite: reject NaN/inf inputs (default on; see ``_validate``).

    Returns:
        (indices, distances): int64 (N,) with the lowest index on ties, and the
        squared L2 distance of the picked code, float32 (float64 for float64 input),
        clamped at 0. Not differentiable.
    """
    out = nearest_code_ex(z, codebook, backend, check_finite=check_finite)
    return out.indices, out.distances


def quantize(z, basis, weight, bias=None, backend="auto", *, check_finite=None
             ) -> QuantizeOutput:
    """Like :func:`simvq_quantize`, returning zq, indices, distances and the backend."""
    _validate.check_quantize(z, basis, weight, bias)
    _validate.check_finite_values(
        (("z", z), ("basis", basis), ("weight", weight), ("bias", bias)),
        _validate.finite_check_enabled(check_finite))
    name = select_backend(backend, z.device, z.dtype)
    log.debug("simvq_quantize: backend=%s N=%d K=%d d=%d r=%d", name, z.shape[0],
              basis.shape[0], z.shape[1], basis.shape[1])
    z = z.detach()  # zq does not depend on z differentiably (argmin is piecewise constant)
    if name == "reference":
        zq, idx, dist = reference.simvq_quantize(z, basis, weight, bias)
    elif name == "chunked":
        zq, idx, dist = reference.simvq_quantize_chunked(z, basis, weight, bias)
    else:
        zq, idx, dist = torch.ops.simvq.quantize(z, basis, weight, bias)
    return QuantizeOutput(zq, idx, dist.to(_dist_dtype(z.dtype)), name)


def simvq_quantize(z, basis, weight, bias: Optional[torch.Tensor] = None, backend="auto",
                   *, check_finite=None):
    """SimVQ quantisation: zq = (basis @ weight.T + bias)[idx], idx = nearest code.

    Args:
        z: (N, d) tokens, float32/float64/bfloat16/float16.
        basis: (K, r) frozen basis (must not require grad), same device and dtype.
        weight: (d, r) projection weight. bias: (d,) or None.
        backend, check_finite: as in :func:`nearest_code`.

    Returns:
        (zq, indices): zq (N, d) in z's dtype, differentiable w.r.t. weight and bias
        (not z: use a straight-through estimator for that); indices int64 (N,).
        The fused backends' backward computes dW = g^T basis[idx] and db = sum g with no
        K x d buffer.
    """
    out = quantize(z, basis, weight, bias, backend, check_finite=check_finite)
    return out.zq, out.indices


def _ensure_loaded():
    _ext.load()
