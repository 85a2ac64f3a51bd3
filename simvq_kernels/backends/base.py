"""What every backend is: one object that says what it can serve and owns its three calls.

A backend serves a (device, dtype) pair or says why not. The dispatcher in ``ops.py``
validates the arguments, asks the registry (``backends/__init__.py``) for a backend
and calls its methods; it never branches on a backend's name.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this input (the message says why)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dist_dtype(dtype: torch.dtype) -> torch.dtype:
    """Distances come back in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """Base class. Subclasses set the attributes and implement the three calls.

    Attributes:
        name: the name users pass as ``backend=``.
        description: one line for ``python -m simvq_kernels.info``.
        devices: device types it serves.
        dtypes: dtypes it serves.
        auto: whether ``backend="auto"`` may pick it.
        gpu: a GPU backend: "auto" picks it on a CUDA device only once the GPU
            acceptance run has passed on that device's architecture
            (``backends/validation.py``).
        wants_duplicate_map: the calls use a cached ``duplicate_map`` when given (the
            pure-PyTorch searches, which otherwise run ``torch.unique`` per call).
        has_train_step: it also implements ``quantize_train`` and
            ``quantize_train_backward``, the SimVQ layer's fused training step for
            float32 / float64 tokens (see ``ops.quantize_train``); the others get the
            step composed from ``quantize`` and the straight-through estimator.
        thread_invariant: its results (indices, distances, zq, and the backward's
            dW, db) are bit-identical across thread counts and CPU instruction sets,
            because no BLAS is called on its paths. The others promise identical
            results across runs at a fixed thread count only: their products are
            torch's, whose BLAS picks its kernel (and its split of a reduction) by CPU
            vendor, ISA and thread count.

    The calls receive validated inputs (ranks, widths, devices, dtypes, finiteness);
    N may be 0 and views may be non-contiguous or offset.
    """

    name: str = ""
    description: str = ""
    devices: tuple = ()
    dtypes: tuple = FLOAT_DTYPES
    auto: bool = True
    gpu: bool = False
    # whether the calls use a caller's cached ``duplicate_map`` (else it is ignored)
    wants_duplicate_map: bool = False
    has_train_step: bool = False
    thread_invariant: bool = False

    # ------------------------------------------------------------------ what it serves

    def install_problem(self) -> str | None:
        """Why this backend is not usable at all on this installation, else None."""
        return None

    def device_problem(self, device: torch.device) -> str | None:
        """Extra reasons it cannot serve tensors on ``device`` (after the device type
        check), else None."""
        return None

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve (device, dtype), or None if it can."""
        problem = self.install_problem()
        if problem:
            return problem
        if device.type not in self.devices:
            return f"it runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            return f"it supports dtypes {names}, not {dtype_name(dtype)}"
        return self.device_problem(device)

    # ---------------------------------------------------------------------- the calls

    def nearest_code(self, z: torch.Tensor, codebook: torch.Tensor, duplicate_map=None):
        """z (N, d), codebook (K, d) -> (indices int64 (N,), distances (N,)).
        ``duplicate_map`` (int64 (K,), the lowest index of an identical code) may be
        passed by a caller that caches it; backends that need it compute it otherwise."""
        raise NotImplementedError

    def quantize(self, z, basis, weight, bias, duplicate_map=None):
        """z (N, d), basis (K, r), weight (d, r), bias (d,) or None ->
        (zq (N, d) in z's dtype, indices int64 (N,), distances (N,)); zq is
        differentiable w.r.t. weight and bias. ``duplicate_map`` (int64 (K,), the
        lowest index of an identical basis row) may be passed by a caller that caches
        it; backends that need it compute it otherwise."""
        raise NotImplementedError

    def quantize_backward(self, grad_zq, basis, indices, weight):
        """-> (grad_weight = grad_zq^T basis[indices] (d, r), grad_bias = sum grad_zq (d,))."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<simvq backend {self.name!r}>"
