"""The 'triton' backend's registered ops: ``torch.ops.simvq_triton.*``.

- ``nearest_code(z, codebook) -> (idx int64, dist fp32)``
- ``quantize(z, basis, weight, bias) -> (zq, idx, dist)``, differentiable w.r.t. weight
  and bias (its backward is ``quantize_backward``)
- ``quantize_backward(grad_zq, basis, idx, weight) -> (grad_weight, grad_bias)``

Each is a ``torch.library.triton_op``: torch.compile traces into it and Inductor sees
the Triton kernels (launched through ``wrap_triton``). On CPU tensors (Triton's
interpreter, for tests) the op forwards to an opaque twin ``*_cpu`` custom op, since
an interpreted kernel cannot be traced.

quantize: the projection Q = B W^T + b is a Triton prologue (exact products, fp32
accumulation, rounded once to z's dtype: the values the search multiplies, on tensor
cores for bf16/fp16), with ||Q_k||^2 of the fp32 values; then the search, then
zq = Q[idx]. Every row of Q is
computed alike wherever it sits, so duplicate basis rows give identical codes and ties
go to the lowest index with no duplicate map.
"""
from __future__ import annotations

import torch

from .._autograd import register_quantize_autograd
from .nearest_code import nearest_code_triton
from .prologue import project
from .quantize_backward import quantize_backward_triton

Tensor = torch.Tensor


# ---------------------------------------------------------------- implementations

def _nearest_code_impl(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    return nearest_code_triton(z, codebook)


def _quantize_impl(z: Tensor, basis: Tensor, weight: Tensor, bias: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    q, qn = project(basis, weight, bias, z.dtype)
    idx, dist = nearest_code_triton(z, q, qn=qn)
    return q.index_select(0, idx), idx, dist


def _quantize_backward_impl(grad_zq: Tensor, basis: Tensor, indices: Tensor, weight: Tensor
                            ) -> tuple[Tensor, Tensor]:
    return quantize_backward_triton(grad_zq, basis, indices, weight)


# ------------------------------------------- CPU twins: the interpreter, opaque ops

@torch.library.custom_op("simvq_triton::nearest_code_cpu", mutates_args=())
def _nearest_code_cpu(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    return _nearest_code_impl(z, codebook)


@_nearest_code_cpu.register_fake
def _(z, codebook):
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.long), z.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("simvq_triton::quantize_cpu", mutates_args=())
def _quantize_cpu(z: Tensor, basis: Tensor, weight: Tensor, bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_impl(z, basis, weight, bias)


@_quantize_cpu.register_fake
def _(z, basis, weight, bias):
    n = z.shape[0]
    return (z.new_empty((n, weight.shape[0])), z.new_empty((n,), dtype=torch.long),
            z.new_empty((n,), dtype=torch.float32))


@torch.library.custom_op("simvq_triton::quantize_backward_cpu", mutates_args=())
def _quantize_backward_cpu(grad_zq: Tensor, basis: Tensor, indices: Tensor, weight: Tensor
                           ) -> tuple[Tensor, Tensor]:
    return _quantize_backward_impl(grad_zq, basis, indices, weight)


@_quantize_backward_cpu.register_fake
def _(grad_zq, basis, indices, weight):
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# -------------------------------------------------------- the ops (triton_op)

@torch.library.triton_op("simvq_triton::nearest_code", mutates_args=())
def nearest_code(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    if z.device.type == "cpu":
        return _nearest_code_cpu(z, codebook)
    return _nearest_code_impl(z, codebook)


@torch.library.triton_op("simvq_triton::quantize", mutates_args=())
def quantize(z: Tensor, basis: Tensor, weight: Tensor, bias: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor]:
    if z.device.type == "cpu":
        return _quantize_cpu(z, basis, weight, bias)
    return _quantize_impl(z, basis, weight, bias)


@torch.library.triton_op("simvq_triton::quantize_backward", mutates_args=())
def quantize_backward(grad_zq: Tensor, basis: Tensor, indices: Tensor, weight: Tensor
                      ) -> tuple[Tensor, Tensor]:
    if grad_zq.device.type == "cpu":
        return _quantize_backward_cpu(grad_zq, basis, indices, weight)
    return _quantize_backward_impl(grad_zq, basis, indices, weight)


register_quantize_autograd(quantize, quantize_backward)

ALL_OPS = (nearest_code, quantize, quantize_backward)
