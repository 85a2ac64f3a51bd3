"""The 'cuda' backend: the extension's CUDA C++ kernels (csrc/cuda/): tensor-core
GEMM with a row-argmin epilogue, and the gather-GEMM backward."""
from __future__ import annotations

import torch

from .. import _ext
from .base import FLOAT_DTYPES
from .compiled import CompiledBackend


class CUDABackend(CompiledBackend):
    name = "cuda"
    description = "fused CUDA C++ kernel: tensor-core GEMM with a row-argmin epilogue"
    devices = ("cuda",)
    dtypes = FLOAT_DTYPES
    auto = True
    gpu = True
    dispatch_key = "CUDA"

    def install_problem(self):
        problem = super().install_problem()
        if problem is None and not torch.cuda.is_available():
            return "no CUDA device (the extension's CUDA kernels are built)"
        return problem

    def missing_kernels_reason(self) -> str:
        why = _ext.build_info().get("cuda_reason")
        return ("the extension was built without CUDA kernels"
                + (f" ({why})" if why else ""))


BACKEND = CUDABackend()
