"""The SimVQ quantize op's autograd formula, shared by every backend that registers a
fused ``quantize`` op with its own ``quantize_backward`` op.

zq = Q[idx] with Q = basis @ weight.T + bias: the gradient reaches weight and bias only,
dW = g^T basis[idx], db = sum g (the backend's ``quantize_backward``); idx and the
distances are not differentiable; z gets none (argmin is piecewise constant).
"""
from __future__ import annotations


def register_quantize_autograd(quantize_op, quantize_backward) -> None:
    """Register the autograd formula of ``quantize_op`` (a torch.library op taking
    (z, basis, weight, bias) and returning (zq, idx, dist)), whose backward calls
    ``quantize_backward(grad_zq, basis, idx, weight) -> (dW, db)``."""

    def setup_context(ctx, inputs, output):
        z, basis, weight, bias = inputs
        _, idx, dist = output
        ctx.save_for_backward(basis, idx, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(idx, dist)

    def backward(ctx, grad_zq, grad_idx, grad_dist):
        basis, idx, weight = ctx.saved_tensors
        if grad_zq is None:
            return None, None, None, None
        dw, db = quantize_backward(grad_zq, basis, idx, weight)
        return None, None, dw, (db if ctx.has_bias else None)

    if isinstance(quantize_op, str):
        import torch

        torch.library.register_autograd(quantize_op, backward, setup_context=setup_context)
    else:
        quantize_op.register_autograd(backward, setup_context=setup_context)
