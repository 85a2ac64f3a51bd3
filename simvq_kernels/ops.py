"""Public ops and their dispatch to a backend.

- ``nearest_code(z, codebook)``: the search alone.
- ``simvq_quantize(z, basis, weight, bias)``: projection + search + gather, with the
  SimVQ backward (dW = g^T basis[idx], db = sum g) on the fused backends.

The compiled backends are ``torch.ops.simvq.*`` (schemas in csrc/simvq.cpp). Their fake
(meta) kernels and autograd formulas are registered here, once, when the extension is
first loaded (see ``_ext.load``), so they work with autograd and FakeTensor tracing.

torch.compile: the public ops trace with no graph break (``fullgraph=True`` works).
Inside a compiled region (``torch.compiler.is_compiling()``)

- the backend is resolved at trace time (``torch.compiler.assume_constant_result``; the
  result is a constant of the graph, as it depends only on the device type and dtype);
- the non-finite check, a data-dependent branch in eager mode, is queued with
  ``torch._assert_async`` instead (a failure raises ``RuntimeError`` when the graph runs,
  rather than the eager ``ValueError``); ``check_finite=False`` / ``SIMVQ_CHECK_FINITE=0``
  still turn it off (the variable is read when the graph is traced);
- nothing is logged;
- the 'reference' and 'chunked' searches run as the custom ops
  ``simvq_py::reference_nearest_code`` / ``simvq_py::chunked_nearest_code`` (their
  tie rule uses ``torch.unique``, whose output shape is data-dependent).

Load the extension before tracing (``SimVQ.__init__`` does; for the bare ops call
:func:`ensure_loaded` once, or let the trace-time backend resolution load it).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from . import _ext, _validate, reference
from .backends import BackendUnavailableError, select_backend

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


# ------------------------------------------- the pure-PyTorch searches as custom ops
# The 'reference' and 'chunked' searches end with ``reference.first_of_duplicates``
# (ties to the lowest index among exact duplicate codes), whose ``torch.unique`` has a
# data-dependent output shape: Dynamo would break the graph there. Inside a compiled
# region the two searches therefore run as opaque custom ops (device-generic, with fake
# kernels), and the differentiable assembly of zq around them is traced as usual.

@torch.library.custom_op("simvq_py::reference_nearest_code", mutates_args=())
def _reference_nearest_op(z: torch.Tensor, codebook: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = reference.nearest_code(z, codebook)
    return idx.clone(), dist.clone()


@torch.library.custom_op("simvq_py::chunked_nearest_code", mutates_args=())
def _chunked_nearest_op(z: torch.Tensor, codebook: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = reference.nearest_code_chunked(z, codebook)
    return idx.clone(), dist.clone()


def _fake_py_nearest(z, codebook):
    n = z.shape[0]
    return (z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=reference.compute_dtype(z.dtype)))


_reference_nearest_op.register_fake(_fake_py_nearest)
_chunked_nearest_op.register_fake(_fake_py_nearest)


@torch.library.custom_op("simvq_py::first_of_duplicates", mutates_args=())
def _first_of_duplicates_op(rows: torch.Tensor) -> torch.Tensor:
    return reference.first_of_duplicates(rows).clone()


@_first_of_duplicates_op.register_fake
def _(rows):
    return rows.new_empty((rows.shape[0],), dtype=torch.long)


def _py_nearest(name, z, codebook):
    if _compiling():
        op = _reference_nearest_op if name == "reference" else _chunked_nearest_op
        return op(z, codebook)
    fn = reference.nearest_code if name == "reference" else reference.nearest_code_chunked
    return fn(z, codebook)


def _py_quantize_traced(name, z, basis, weight, bias):
    """reference.simvq_quantize / simvq_quantize_chunked with the search as a custom op
    (same math, for tracing)."""
    dt = reference.compute_dtype(z.dtype)
    if name == "reference":
        codebook = reference.project_codebook(basis.to(dt), weight.to(dt),
                                              None if bias is None else bias.to(dt))
        idx, dist = _reference_nearest_op(z.detach(), codebook.detach())
        idx = _first_of_duplicates_op(basis.detach())[idx]
        zq = torch.nn.functional.embedding(idx, codebook).to(z.dtype)
        return zq, idx, dist
    with torch.no_grad():
        codebook = reference.project_codebook(basis.to(dt), weight.to(dt),
                                              None if bias is None else bias.to(dt))
    idx, dist = _chunked_nearest_op(z, codebook)
    idx = _first_of_duplicates_op(basis.detach())[idx]
    rows = basis.index_select(0, idx)
    zq = torch.nn.functional.linear(rows, weight, bias).to(z.dtype)
    return zq, idx, dist


# --------------------------------------------------------------- compile-safe helpers

def _compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def _select_backend_traced(backend, device_type, device_index, dtype):
    # Runs in plain Python at trace time; its result is baked into the graph (Dynamo
    # guards on the input's device and dtype, which are the only inputs it depends on).
    device = torch.device(device_type) if device_index is None else \
        torch.device(device_type, device_index)
    try:
        return select_backend(backend, device, dtype)
    except (BackendUnavailableError, ValueError) as e:  # re-raised by _select, unwrapped
        return "!" + type(e).__name__ + ":" + str(e)


@torch.compiler.assume_constant_result
def _finite_check_enabled_traced(check_finite):
    return _validate.finite_check_enabled(check_finite)


def _select(backend, device, dtype) -> str:
    if _compiling():
        if not isinstance(backend, str):
            raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
        name = _select_backend_traced(backend, device.type, device.index, dtype)
        if name.startswith("!"):
            kind, _, msg = name[1:].partition(":")
            raise (BackendUnavailableError if kind == "BackendUnavailableError"
                   else ValueError)(msg)
        return name
    return select_backend(backend, device, dtype)


def _check_finite(named, check_finite):
    """Rejects NaN/inf; in eager mode on CPU returns {name: max |value|} (else None)."""
    if not _compiling():
        return _validate.check_finite_values(named,
                                             _validate.finite_check_enabled(check_finite))
    if _finite_check_enabled_traced(check_finite):
        _validate.queue_finite_checks(named)
    return None


# ---------------------------------------------------------------------- public ops

def nearest_code_ex(z, codebook, backend="auto", *, check_finite=None) -> NearestOutput:
    """Like :func:`nearest_code`, also returning which backend ran."""
    _validate.check_nearest_code(z, codebook)
    maxima = _check_finite((("z", z), ("codebook", codebook)), check_finite)
    name = _select(backend, z.device, z.dtype)
    if not _compiling():
        log.debug("nearest_code: backend=%s N=%d K=%d d=%d", name, z.shape[0],
                  codebook.shape[0], z.shape[1])
    out_dtype = _dist_dtype(z.dtype)
    z, codebook = z.detach(), codebook.detach()
    if maxima and _validate.needs_float64(z.dtype, z.shape[1], max(maxima.values())):
        log.debug("nearest_code: values up to %.3g, searching in float64",
                  max(maxima.values()))
        z, codebook = z.double(), codebook.double()
    if name in ("reference", "chunked"):
        idx, dist = _py_nearest(name, z, codebook)
    else:  # compiled backends: cpu, cuda
        idx, dist = torch.ops.simvq.nearest_code(z, codebook)
    return NearestOutput(idx, dist.to(out_dtype), name)


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
    maxima = _check_finite((("z", z), ("basis", basis), ("weight", weight), ("bias", bias)),
                           check_finite)
    name = _select(backend, z.device, z.dtype)
    if not _compiling():
        log.debug("simvq_quantize: backend=%s N=%d K=%d d=%d r=%d", name, z.shape[0],
                  basis.shape[0], z.shape[1], basis.shape[1])
    in_dtype = z.dtype
    z = z.detach()  # zq does not depend on z differentiably (argmin is piecewise constant)
    if maxima:
        # every code obeys |Q_kj| <= r max|B| max|W| + max|b|
        code_bound = (basis.shape[1] * maxima["basis"] * maxima["weight"]
                      + maxima.get("bias", 0.0))
        if _validate.needs_float64(z.dtype, z.shape[1], max(maxima["z"], code_bound)):
            log.debug("simvq_quantize: values up to %.3g, searching in float64",
                      max(maxima["z"], code_bound))
            out = quantize(z.double(), basis.double(), weight.double(),
                           None if bias is None else bias.double(), name,
                           check_finite=False)  # differentiable casts: grads come back
            return QuantizeOutput(out.zq.to(in_dtype), out.indices,
                                  out.distances.to(_dist_dtype(in_dtype)), name)
    if name in ("reference", "chunked") and _compiling():
        zq, idx, dist = _py_quantize_traced(name, z, basis, weight, bias)
    elif name == "reference":
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


def ensure_loaded() -> bool:
    """Load the compiled extension now (and register its fake kernels and autograd).

    Call it before ``torch.compile`` traces code that uses the bare ops; ``SimVQ``
    calls it in its constructor. Returns whether the extension is available.
    """
    return _ext.load() is not None


_ensure_loaded = ensure_loaded  # old private name
