"""Argument checks for the public ops: clear errors that name the argument.

Non-finite values: checking them costs one pass over the inputs, O((N + K) * d), which
is negligible next to the O(N * K * d) search. On CPU it is checked synchronously (an
error is raised before anything runs). On an accelerator a synchronous check would
stall the stream on every call, so there the check is queued with
``torch._assert_async`` (no host sync; a failure surfaces as a device-side assert at the
next synchronisation). ``check_finite=False`` or the environment variable
``SIMVQ_CHECK_FINITE=0`` turns it off.
"""
from __future__ import annotations

import os

import torch

from .backends import FLOAT_DTYPES


def _shape(t):
    return tuple(t.shape)


def check_tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float32, float64, bfloat16 or "
            f"float16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D tensor, got shape {_shape(t)}")


def check_same(ref_name, ref, name, t):
    if t.device != ref.device:
        raise ValueError(f"`{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                         "move them to one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"`{name}` has dtype {t.dtype} but `{ref_name}` has dtype "
                        f"{ref.dtype}; cast them to one dtype")


def finite_check_enabled(check_finite):
    if check_finite is None:
        return os.environ.get("SIMVQ_CHECK_FINITE", "1") != "0"
    return bool(check_finite)


def check_finite_values(named, enabled):
    if not enabled:
        return
    for name, t in named:
        if t is None or t.numel() == 0:
            continue
        if t.device.type in ("cpu", "meta"):
            if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"`{name}` contains NaN or infinite values")
        else:
            torch._assert_async(torch.isfinite(t).all(),
                                f"simvq_kernels: `{name}` contains NaN or infinite values")


def check_nearest_code(z, codebook):
    check_tensor("z", z, 2)
    check_tensor("codebook", codebook, 2)
    check_same("z", z, "codebook", codebook)
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"width mismatch: `z` is (N, d) with d={z.shape[1]} but "
                         f"`codebook` is (K, d) with d={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("`codebook` is empty (K=0); it needs at least one code")


def check_quantize(z, basis, weight, bias):
    check_tensor("z", z, 2)
    check_tensor("basis", basis, 2)
    check_tensor("weight", weight, 2)
    check_same("z", z, "basis", basis)
    check_same("z", z, "weight", weight)
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_same("z", z, "bias", bias)
    d, r = z.shape[1], basis.shape[1]
    if basis.shape[0] == 0:
        raise ValueError("`basis` is empty (K=0); it needs at least one code")
    if _shape(weight) != (d, r):
        raise ValueError(f"`weight` must be (d, r) = ({d}, {r}) for `z` of width d={d} and "
                         f"`basis` of width r={r}, got shape {_shape(weight)}")
    if bias is not None and bias.shape[0] != d:
        raise ValueError(f"`bias` must have d={d} elements (the width of `z`), got "
                         f"shape {_shape(bias)}")
    if basis.requires_grad:
        raise ValueError("`basis` requires grad, but the SimVQ basis is frozen and gets no "
                         "gradient; pass basis.detach() (or register it as a buffer)")
