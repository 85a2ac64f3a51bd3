"""The ops of the compiled extension, ``torch.ops.simvq.*`` (schemas in csrc/simvq.cpp),
shared by the backends whose kernels live there ('cpu', 'cuda'): each registers its
implementation under the same schemas for its dispatch key.

Their fake (meta) kernels and autograd formula are registered here, once, right after
the extension is loaded (``_ext`` runs the hook), so they work with autograd and with
FakeTensor tracing (torch.compile).
"""
from __future__ import annotations

import torch

from .. import _ext
from .._autograd import register_quantize_autograd
from .base import Backend, dist_dtype

_registered = {"done": False}


def _fake_nearest_code(z, codebook):
    n = z.shape[0]
    return (z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=dist_dtype(z.dtype)))


def _fake_quantize(z, basis, weight, bias):
    n = z.shape[0]
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=dist_dtype(z.dtype)))


def _fake_quantize_backward(grad_zq, basis, indices, weight):
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _register_python_parts(module) -> None:
    """Fake kernels + autograd for torch.ops.simvq.*; run once by ``_ext.load``."""
    if _registered["done"]:
        return
    torch.library.register_fake("simvq::nearest_code")(_fake_nearest_code)
    torch.library.register_fake("simvq::quantize")(_fake_quantize)
    torch.library.register_fake("simvq::quantize_backward")(_fake_quantize_backward)
    register_quantize_autograd(
        "simvq::quantize",
        lambda g, basis, idx, weight: torch.ops.simvq.quantize_backward(g, basis, idx, weight))
    _registered["done"] = True


_ext.add_load_hook(_register_python_parts)


def has_kernel(dispatch_key: str) -> bool:
    """True if the loaded extension registered kernels for ``dispatch_key``."""
    if _ext.load() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("simvq::nearest_code",
                                                          dispatch_key)


class CompiledBackend(Backend):
    """A backend whose kernels are the extension's ``torch.ops.simvq.*`` for one
    dispatch key. Subclasses set ``dispatch_key`` and the descriptive attributes."""

    dispatch_key = ""

    def install_problem(self):
        if _ext.load() is None:
            return f"the compiled extension is not loaded ({_ext.error()})"
        if not has_kernel(self.dispatch_key):
            return self.missing_kernels_reason()
        return None

    def missing_kernels_reason(self) -> str:
        return f"the extension has no {self.dispatch_key} kernels"

    def nearest_code(self, z, codebook, duplicate_map=None):
        # the map is not needed: the CPU kernels map each pick to the lowest bitwise-
        # identical row themselves (a hash pass over the rows, since a BLAS product may
        # round duplicates differently); the CUDA kernels form every code's value with the
        # same instructions in the same order, so duplicates tie exactly and the strict
        # '<' in code order keeps the lowest index, with no table at all
        return torch.ops.simvq.nearest_code(z, codebook)

    def quantize(self, z, basis, weight, bias, duplicate_map=None):
        # the map is not needed, as in nearest_code (identical basis rows: the CPU kernel
        # remaps to the first of them; the CUDA projection rounds them identically)
        return torch.ops.simvq.quantize(z, basis, weight, bias)

    def quantize_backward(self, grad_zq, basis, indices, weight):
        return torch.ops.simvq.quantize_backward(grad_zq, basis, indices, weight)
