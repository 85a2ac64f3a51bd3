"""The 'triton' backend's registered ops: ``torch.ops.simvq_triton.*``.

Defined with ``torch.library.custom_op`` (opaque to torch.compile, with fake kernels)
and ``register_autograd``; the kernels are in nearest_code.py and quantize_backward.py.
The projection Q = B W^T + b is a small prologue (cuBLAS addmm, K x r x d flops) whose
result is rounded to the input dtype, so the search multiplies values of that dtype and
||Q||^2 is computed from exactly those values.
"""
from __future__ import annotations

import torch

from .nearest_code import nearest_code_triton
from .quantize_backward import quantize_backward_triton


def _dist_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("simvq_triton::nearest_code", mutates_args=())
def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nearest_code_triton(z, codebook)


@nearest_code.register_fake
def _(z, codebook):
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.long), z.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("simvq_triton::quantize", mutates_args=())
def quantize(z: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wide = torch.float32
    if bias is None:
        q = basis.to(wide) @ weight.to(wide).t()
    else:
        q = torch.addmm(bias.to(wide), basis.to(wide), weight.to(wide).t())
    q = q.to(z.dtype)
    idx, dist = nearest_code_triton(z, q)
    return q.index_select(0, idx), idx, dist


@quantize.register_fake
def _(z, basis, weight, bias):
    n = z.shape[0]
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((n,), dtype=torch.long), z.new_empty((n,), dtype=torch.float32))


@torch.library.custom_op("simvq_triton::quantize_backward", mutates_args=())
def quantize_backward(grad_zq: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_backward_triton(grad_zq, basis, indices, weight)


@quantize_backward.register_fake
def _(grad_zq, basis, indices, weight):
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _setup(ctx, inputs, output):
    z, basis, weight, bias = inputs
    _, idx, dist = output
    ctx.save_for_backward(basis, idx, weight)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(idx, dist)


def _backward(ctx, grad_zq, grad_idx, grad_dist):
    basis, idx, weight = ctx.saved_tensors
    if grad_zq is None:
        return None, None, None, None
    dw, db = quantize_backward(grad_zq.contiguous(), basis, idx, weight)
    return None, None, dw, (db if ctx.has_bias else None)


quantize.register_autograd(_backward, setup_context=_setup)
