"""Public ops and their dispatch to a backend.

- ``nearest_code(z, codebook)``: the search alone.
- ``simvq_quantize(z, basis, weight, bias)``: projection + search + gather, with the
  SimVQ backward (dW = g^T basis[idx], db = sum g) on the fused backends.

Each backend is one object in ``simvq_kernels/backends/`` that owns its calls; this
module validates the arguments, asks the registry which backend serves the input and
calls it (no branch on a backend's name). The compiled backends' fake kernels and
autograd are registered by ``backends/compiled.py`` when the extension is loaded.

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
  tie rule uses ``torch.unique``, whose output shape is data-dependent; see
  ``backends/python.py``).

Load the extension before tracing (``SimVQ.__init__`` does; for the bare ops call
:func:`ensure_loaded` once, or let the trace-time backend resolution load it).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from . import _ext, _validate
from .backends import BACKENDS, BackendUnavailableError, select_backend
from .backends import python as _python_backends
from .backends.base import dist_dtype as _dist_dtype

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

def nearest_code_ex(z, codebook, backend="auto", *, check_finite=None,
                    duplicate_map=None) -> NearestOutput:
    """Like :func:`nearest_code`, also returning which backend ran."""
    _validate.check_nearest_code(z, codebook)
    if duplicate_map is not None:
        _validate.check_duplicate_map(duplicate_map, codebook, "codebook")
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
    idx, dist = BACKENDS[name].nearest_code(z, codebook, duplicate_map=duplicate_map)
    return NearestOutput(idx, dist.to(out_dtype), name)


def nearest_code(z, codebook, backend="auto", *, check_finite=None, duplicate_map=None):
    """Nearest code of each row of ``z`` under squared L2 distance.

    Args:
        z: (N, d) float32/float64/bfloat16/float16 tensor. N = 0 is allowed.
        codebook: (K, d) tensor, same device and dtype as ``z``, K >= 1.
        backend: "auto" (fastest available for the device and dtype) or one of
            :func:`simvq_kernels.available_backends`. An explicit backend that cannot
            serve the input raises ``BackendUnavailableError``.
        check_finite: reject NaN/inf inputs (default on; see ``_validate``).
        duplicate_map: optional int64 (K,) tensor giving, for each code, the lowest
            index of an identical code (:func:`codebook_duplicate_map`). The
            pure-PyTorch backends compute it per call (``torch.unique`` over the
            codebook) when it is not given; a caller that keeps a codebook across calls
            can compute it once and pass it.

    Returns:
        (indices, distances): int64 (N,) with the lowest index on ties, and the
        squared L2 distance of the picked code, float32 (float64 for float64 input),
        clamped at 0. Not differentiable.
    """
    out = nearest_code_ex(z, codebook, backend, check_finite=check_finite,
                          duplicate_map=duplicate_map)
    return out.indices, out.distances


def _quantize_checks(z, basis, weight, bias, duplicate_map, check_finite,
                     channel_first=False):
    """The argument checks of quantize / quantize_train; returns the finite check's
    magnitudes ({name: max |value|} in eager mode on CPU, else None). Channel-first z
    (B, d, T) is checked through a (B, d) view of its first position."""
    if channel_first:
        tokens = z[:, :, 0] if z.shape[2] else z.new_empty(z.shape[:2])
        _validate.check_quantize(tokens, basis, weight, bias)
    else:
        _validate.check_quantize(z, basis, weight, bias)
    if duplicate_map is not None:
        _validate.check_duplicate_map(duplicate_map, basis, "basis")
    return _check_finite((("z", z), ("basis", basis), ("weight", weight), ("bias", bias)),
                         check_finite)


def _largest_value(maxima, basis):
    """The largest magnitude among z and the codes (None without magnitudes): every code
    obeys |Q_kj| <= r max|B| max|W| + max|b|."""
    if not maxima:
        return None
    code_bound = basis.shape[1] * maxima["basis"] * maxima["weight"] + maxima.get("bias", 0.0)
    return max(maxima["z"], code_bound)


def quantize(z, basis, weight, bias=None, backend="auto", *, check_finite=None,
             duplicate_map=None) -> QuantizeOutput:
    """Like :func:`simvq_quantize`, returning zq, indices, distances and the backend."""
    maxima = _quantize_checks(z, basis, weight, bias, duplicate_map, check_finite)
    name = _select(backend, z.device, z.dtype)
    if not _compiling():
        log.debug("simvq_quantize: backend=%s N=%d K=%d d=%d r=%d", name, z.shape[0],
                  basis.shape[0], z.shape[1], basis.shape[1])
    in_dtype = z.dtype
    z = z.detach()  # zq does not depend on z differentiably (argmin is piecewise constant)
    largest = _largest_value(maxima, basis)
    if _validate.needs_float64(z.dtype, z.shape[1], largest):
        log.debug("simvq_quantize: values up to %.3g, searching in float64", largest)
        out = quantize(z.double(), basis.double(), weight.double(),
                       None if bias is None else bias.double(), name,
                       check_finite=False,  # differentiable casts: grads come back
                       duplicate_map=duplicate_map)
        return QuantizeOutput(out.zq.to(in_dtype), out.indices,
                              out.distances.to(_dist_dtype(in_dtype)), name)
    zq, idx, dist = BACKENDS[name].quantize(z, basis, weight, bias,
                                            duplicate_map=duplicate_map)
    return QuantizeOutput(zq, idx, dist.to(_dist_dtype(z.dtype)), name)


def simvq_quantize(z, basis, weight, bias: Optional[torch.Tensor] = None, backend="auto",
                   *, check_finite=None, duplicate_map=None):
    """SimVQ quantisation: zq = (basis @ weight.T + bias)[idx], idx = nearest code.

    Args:
        z: (N, d) tokens, float32/float64/bfloat16/float16.
        basis: (K, r) frozen basis (must not require grad), same device and dtype.
        weight: (d, r) projection weight. bias: (d,) or None.
        backend, check_finite: as in :func:`nearest_code`.
        duplicate_map: optional int64 (K,) tensor giving, for each basis row, the lowest
            index of an identical row (what ties on exact duplicate codes resolve to).
            The pure-PyTorch backends compute it per call (``torch.unique`` over the
            basis) when it is not given; a caller with a frozen basis can compute it
            once with :func:`basis_duplicate_map` and pass it.

    Returns:
        (zq, indices): zq (N, d) in z's dtype, differentiable w.r.t. weight and bias
        (not z: use a straight-through estimator for that); indices int64 (N,).
        The fused backends' backward computes dW = g^T basis[idx] and db = sum g with no
        K x d buffer.
    """
    out = quantize(z, basis, weight, bias, backend, check_finite=check_finite,
                   duplicate_map=duplicate_map)
    return out.zq, out.indices


def codebook_duplicate_map(codebook: torch.Tensor) -> torch.Tensor:
    """For each row of ``codebook`` (K, d), the lowest index of an identical row: int64
    (K,). Compute it once for a codebook kept across calls and pass it as
    ``duplicate_map`` to :func:`nearest_code`."""
    _validate.check_tensor("codebook", codebook, 2)
    return _python_backends.basis_duplicate_map(codebook)


def basis_duplicate_map(basis: torch.Tensor) -> torch.Tensor:
    """For each row of ``basis`` (K, r), the lowest index of an identical row: int64 (K,).
    Compute it once for a frozen basis and pass it as ``duplicate_map``."""
    _validate.check_tensor("basis", basis, 2)
    return _python_backends.basis_duplicate_map(basis)


# ------------------------------------------------- the layer's estimator and losses

class _StraightThroughWithLosses(torch.autograd.Function):
    """(out, commit, codebook) = (z + sg(zq - z), mean((sg(zq) - z)^2), mean((zq - sg(z))^2))
    for z, zq of one dtype, in one autograd node: the values of ``nn.straight_through`` and
    ``nn.commitment_losses`` (both losses are mean(diff^2), diff = zq - z) in four passes
    over the tokens, and two backward, instead of about twenty small ops and their
    graph. With M = z.numel(): dz = d_out - (2 / M) d_commit diff,
    dzq = (2 / M) d_codebook diff (no host sync, so any device)."""

    @staticmethod
    def forward(ctx, z, zq):
        diff = zq - z
        out = z + diff
        loss = diff.square().mean()
        ctx.save_for_backward(diff)
        return out, loss, loss.clone()

    @staticmethod
    def backward(ctx, d_out, d_commit, d_codebook):
        (diff,) = ctx.saved_tensors
        scale = 2.0 / max(diff.numel(), 1)
        dz = torch.addcmul(d_out, diff, d_commit, value=-scale) \
            if ctx.needs_input_grad[0] else None
        dzq = diff * (d_codebook * scale) if ctx.needs_input_grad[1] else None
        return dz, dzq


class _FusedTrainStep(torch.autograd.Function):
    """A backend's fused training step (``Backend.quantize_train``): the projection, the
    search, the straight-through output and the sum of squared differences in one call,
    and dz, dW, db in one backward call, with no N x d temporary (zq is never formed)."""

    @staticmethod
    def forward(ctx, z, weight, bias, basis, fused):
        out, idx, dist, sumsq, codebook = fused.quantize_train(z, basis, weight, bias)
        loss = (sumsq / z.numel()).to(z.dtype)
        ctx.fused, ctx.has_bias = fused, bias is not None
        ctx.save_for_backward(z, basis, codebook, idx)
        ctx.mark_non_differentiable(idx, dist)
        return out, loss, loss.clone(), idx, dist

    @staticmethod
    def backward(ctx, d_out, d_commit, d_codebook, _d_idx, _d_dist):
        z, basis, codebook, idx = ctx.saved_tensors
        scale = 2.0 / max(z.numel(), 1)
        dz, dw, db = ctx.fused.quantize_train_backward(
            d_out, z, basis, codebook, idx, scale * float(d_commit), scale * float(d_codebook))
        return (dz if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None,
                db if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None)


def straight_through_with_losses(z: torch.Tensor, zq: torch.Tensor):
    """(out, commit, codebook) for tokens ``z`` and their codes ``zq`` of one shape and
    dtype: out = z + sg(zq - z) (value zq, gradient to z), commit = mean((sg(zq) - z)^2)
    (gradient to z), codebook = mean((zq - sg(z))^2) (gradient to zq), in one autograd
    node."""
    return _StraightThroughWithLosses.apply(z, zq)


class TrainOutput(NamedTuple):
    out: torch.Tensor  # (N, d) = z + sg(zq - z), in z's dtype
    commit: torch.Tensor  # mean((sg(zq) - z)^2), scalar
    codebook: torch.Tensor  # mean((zq - sg(z))^2), scalar
    indices: torch.Tensor  # (N,) int64
    distances: torch.Tensor  # (N,)
    backend: str


def quantize_train(z, basis, weight, bias=None, backend="auto", *, check_finite=None,
                   duplicate_map=None, channel_first=False) -> TrainOutput:
    """What a SimVQ layer's training forward needs from the quantiser, for float32 /
    float64 tokens with basis, weight, bias of their dtype: the straight-through output
    ``out = z + sg(zq - z)`` and the two commitment losses (``commit =
    mean((sg(zq) - z)^2)``, gradient to z; ``codebook = mean((zq - sg(z))^2)``, gradient
    to weight and bias through zq), with the indices and distances of :func:`quantize`.

    z is (N, d), or with ``channel_first=True`` (B, d, T) (token n = b T + t; ``out``
    comes back in that layout, indices (B T,)). A backend with a fused training step
    (the ``cpu`` backend) runs it in one call forward and one backward with no N x d
    temporary, reading and writing the channel-first layout in place; the others run
    :func:`quantize` and :func:`straight_through_with_losses` on the channel-last
    tokens. Same values either way, up to the rounding of the sums."""
    if channel_first and (not isinstance(z, torch.Tensor) or z.dim() != 3):
        raise ValueError("channel_first=True expects `z` of shape (B, d, T), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z)}")
    maxima = _quantize_checks(z, basis, weight, bias, duplicate_map, check_finite,
                              channel_first)
    name = _select(backend, z.device, z.dtype)
    fused = BACKENDS[name]
    wide = _validate.needs_float64(z.dtype, weight.shape[0], _largest_value(maxima, basis))
    if (fused.has_train_step and not _compiling() and not wide and z.numel() > 0
            and z.dtype in (torch.float32, torch.float64)):
        out, commit, code, idx, dist = _FusedTrainStep.apply(z, weight, bias, basis, fused)
        return TrainOutput(out, commit, code, idx, dist.to(_dist_dtype(z.dtype)), name)
    x = z.movedim(1, -1).reshape(-1, z.shape[1]) if channel_first else z
    # values outside float32's safe window: the search in float64, as quantize does
    # (check_finite=False below would hide the magnitudes from it)
    cast = (lambda t: None if t is None else t.double()) if wide else (lambda t: t)
    q = quantize(cast(x.detach()), cast(basis), cast(weight), cast(bias), name,
                 check_finite=False, duplicate_map=duplicate_map)
    out, commit, code = straight_through_with_losses(x, q.zq.to(z.dtype))
    if channel_first:
        out = out.reshape(z.shape[0], z.shape[2], z.shape[1]).movedim(-1, 1).contiguous()
    return TrainOutput(out, commit, code, q.indices, q.distances.to(_dist_dtype(z.dtype)),
                       name)


def ensure_loaded() -> bool:
    """Load the compiled extension now (and register its fake kernels and autograd).

    Call it before ``torch.compile`` traces code that uses the bare ops; ``SimVQ``
    calls it in its constructor. Returns whether the extension is available.
    """
    return _ext.load() is not None


_ensure_loaded = ensure_loaded  # old private name
