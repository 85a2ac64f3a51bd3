"""The pure-PyTorch backends: 'reference' (the official formula, builds N x K; only on
request) and 'chunked' (the same math over bounded tiles; any device, no extension).

Both end with ``reference.first_of_duplicates`` (ties to the lowest index among exact
duplicate codes), whose ``torch.unique`` has a data-dependent output shape that Dynamo
would break the graph on. Inside a compiled region the searches therefore run as opaque
custom ops (``simvq_py::*``, device-generic, with fake kernels), and the differentiable
assembly of zq around them is traced as usual.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from .base import FLOAT_DTYPES, Backend

_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")


# ------------------------------------------------------------- traceable custom ops

@torch.library.custom_op("simvq_py::reference_nearest_code", mutates_args=())
def _reference_nearest_op(z: torch.Tensor, codebook: torch.Tensor,
                          duplicate_map: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = reference.nearest_code(z, codebook, duplicate_map=duplicate_map)
    return idx.clone(), dist.clone()


@torch.library.custom_op("simvq_py::chunked_nearest_code", mutates_args=())
def _chunked_nearest_op(z: torch.Tensor, codebook: torch.Tensor,
                        duplicate_map: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = reference.nearest_code_chunked(z, codebook, duplicate_map=duplicate_map)
    return idx.clone(), dist.clone()


def _fake_nearest(z, codebook, duplicate_map=None):
    n = z.shape[0]
    return (z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=reference.compute_dtype(z.dtype)))


_reference_nearest_op.register_fake(_fake_nearest)
_chunked_nearest_op.register_fake(_fake_nearest)


@torch.library.custom_op("simvq_py::first_of_duplicates", mutates_args=())
def _first_of_duplicates_op(rows: torch.Tensor) -> torch.Tensor:
    return reference.first_of_duplicates(rows).clone()


@_first_of_duplicates_op.register_fake
def _(rows):
    return rows.new_empty((rows.shape[0],), dtype=torch.long)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def basis_duplicate_map(basis: torch.Tensor) -> torch.Tensor:
    """For each basis row, the lowest index of an identical row (int64 (K,)),
    traceable."""
    if _compiling():
        return _first_of_duplicates_op(basis.detach())
    return reference.first_of_duplicates(basis.detach())


def _project(basis, weight, bias, dt):
    return reference.project_codebook(basis.to(dt), weight.to(dt),
                                      None if bias is None else bias.to(dt))


def _gather_backward(grad_zq, basis, indices, weight):
    """dW = g^T basis[idx], db = sum g (a gather-GEMM; no K x d buffer)."""
    dt = reference.compute_dtype(grad_zq.dtype)
    g = grad_zq.to(dt)
    rows = basis.index_select(0, indices).to(dt)
    return (g.t() @ rows).to(weight.dtype), g.sum(0).to(weight.dtype)


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch, the official formula (builds the N x K matrix)"
    devices = _ANY_DEVICE
    dtypes = FLOAT_DTYPES
    auto = False  # builds N x K: only on request
    wants_duplicate_map = True

    def nearest_code(self, z, codebook, duplicate_map=None):
        if _compiling():
            return _reference_nearest_op(z, codebook, duplicate_map)
        return reference.nearest_code(z, codebook, duplicate_map=duplicate_map)

    def quantize(self, z, basis, weight, bias, duplicate_map=None):
        dt = reference.compute_dtype(z.dtype)
        codebook = _project(basis, weight, bias, dt)
        idx, dist = self.nearest_code(z.detach(), codebook.detach())
        if duplicate_map is None:
            duplicate_map = basis_duplicate_map(basis)
        idx = duplicate_map[idx]
        zq = F.embedding(idx, codebook).to(z.dtype)  # the official gather (K x d grad)
        return zq, idx, dist

    def quantize_backward(self, grad_zq, basis, indices, weight):
        return _gather_backward(grad_zq, basis, indices, weight)


class ChunkedBackend(Backend):
    name = "chunked"
    description = "pure PyTorch over bounded tiles with a running argmin"
    devices = _ANY_DEVICE
    dtypes = FLOAT_DTYPES
    auto = True
    wants_duplicate_map = True

    def nearest_code(self, z, codebook, duplicate_map=None):
        if _compiling():
            return _chunked_nearest_op(z, codebook, duplicate_map)
        return reference.nearest_code_chunked(z, codebook, duplicate_map=duplicate_map)

    def quantize(self, z, basis, weight, bias, duplicate_map=None):
        # zq is re-projected from the gathered basis rows, so autograd gives
        # dW = g^T basis[idx] with no K x d buffer.
        dt = reference.compute_dtype(z.dtype)
        with torch.no_grad():
            codebook = _project(basis, weight, bias, dt)
        idx, dist = self.nearest_code(z.detach(), codebook)
        if idx.numel() or _compiling():
            if duplicate_map is None:
                duplicate_map = basis_duplicate_map(basis)
            idx = duplicate_map[idx]
        rows = basis.index_select(0, idx)
        zq = F.linear(rows, weight, bias).to(z.dtype)
        return zq, idx, dist

    def quantize_backward(self, grad_zq, basis, indices, weight):
        return _gather_backward(grad_zq, basis, indices, weight)


REFERENCE = ReferenceBackend()
CHUNKED = ChunkedBackend()
