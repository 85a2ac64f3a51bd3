"""Argument checks for the public ops: clear errors that name the argument.

Non-finite values: checking them costs one pass over the inputs, O((N + K) * d), which
is negligible next to the O(N * K * d) search. On CPU it is checked synchronously (an
error is raised before anything runs). On an accelerator a synchronous check would
stall the stream on every call, so there the check is queued with
``torch._assert_async`` (no host sync; a failure surfaces as a device-side assert at the
next synchronisation). ``check_finite=False`` or the environment variable
``SIMVQ_CHECK_FINITE=0`` turns it off.

Magnitudes: on CPU the same pass gives each input's largest |value|. Finite inputs so
large that squared norms overflow float32 (max|x| * sqrt(d) >= 2^60), or so small that
every product is subnormal (max|x| < 2^-56), are searched in float64 instead (indices
exact for every finite input; distances still returned as float32, inf where they exceed
its range). This needs the values on the host, so it is done on CPU only, and only when
the finite check is on; on accelerators and inside torch.compile such inputs are the
caller's responsibility.
"""
from __future__ import annotations

import math
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


def queue_finite_checks(named):
    """Queues a device-side NaN/inf assert per tensor (no host sync)."""
    for name, t in named:
        if t is not None and t.numel():
            torch._assert_async(torch.isfinite(t).all(),
                                f"simvq_kernels: `{name}` contains NaN or infinite values")


def check_finite_values(named, enabled):
    """Rejects NaN/inf. On CPU returns {name: max |value|} (the same single pass finds
    both: a NaN or inf makes the min or max NaN or inf), used by :func:`needs_float64`;
    elsewhere returns None (the check is queued, there is no value to look at). The
    tensors are on one device (checked before)."""
    named = [(name, t) for name, t in named if t is not None]
    if not enabled or not named:
        return None
    device = named[0][1].device.type
    if device != "cpu":
        if device != "meta":  # meta tensors have no values
            queue_finite_checks(named)
        return None
    maxima = {}
    for name, t in named:
        if t.numel() == 0:
            maxima[name] = 0.0
            continue
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))  # one pass, no copy
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf propagate
            raise ValueError(f"`{name}` contains NaN or infinite values")
        maxima[name] = max(-lo, hi)
    return maxima


# Every dtype but float64 is searched in float32. Its intermediate values (||z||^2,
# ||Q||^2, 2 z.Q and their sums) stay below 4 (sqrt(d) max|x|)^2, so they can overflow
# once sqrt(d) max|x| nears 2^63; and when every value is below ~2^-56 the products fall
# into float32's subnormal range and lose the precision the search needs. Outside this
# window the CPU search runs on float64 copies (exact widening; float64's range covers
# every finite float32), so no finite input gives a wrong index.
F32_SAFE_MAX = 2.0 ** 60
F32_SAFE_MIN = 2.0 ** -56


def needs_float64(dtype, width, largest) -> bool:
    """Whether a float32 search over values up to ``largest`` in magnitude (width d)
    could overflow or lose precision to subnormals (see F32_SAFE_MAX / F32_SAFE_MIN)."""
    if dtype == torch.float64 or largest is None:
        return False
    return largest > 0 and (largest * math.sqrt(max(1, width)) >= F32_SAFE_MAX
                            or largest < F32_SAFE_MIN)


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


def check_duplicate_map(duplicate_map, basis, basis_name="basis"):
    """An int64 (K,) map on the rows' device, one entry per row."""
    if not isinstance(duplicate_map, torch.Tensor):
        raise TypeError("`duplicate_map` must be a torch.Tensor (int64, shape (K,)), got "
                        f"{type(duplicate_map).__name__}")
    k = basis.shape[0]
    if duplicate_map.dtype != torch.long or tuple(duplicate_map.shape) != (k,):
        raise ValueError(f"`duplicate_map` must be an int64 tensor of shape ({k},) (one "
                         f"entry per row of `{basis_name}`), got {duplicate_map.dtype} of shape "
                         f"{_shape(duplicate_map)}")
    if duplicate_map.device != basis.device:
        raise ValueError(f"`duplicate_map` is on {duplicate_map.device} but `{basis_name}` "
                         f"is on {basis.device}")
