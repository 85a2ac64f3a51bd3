"""The 'cpu' backend: the extension's fused C++ kernels (csrc/cpu/)."""
from __future__ import annotations

import torch

from .base import FLOAT_DTYPES
from .compiled import CompiledBackend


class CPUBackend(CompiledBackend):
    name = "cpu"
    description = ("fused C++ kernel: register-blocked AVX-512/AVX2 GEMM with an argmin "
                   "epilogue (fixed-order FMA tiles for float64 and the scalar ISA), "
                   "multithreaded, no BLAS")
    devices = ("cpu",)
    dtypes = FLOAT_DTYPES
    auto = True
    dispatch_key = "CPU"
    has_train_step = True
    thread_invariant = True  # no BLAS: fixed FMA chains (csrc/cpu/fma_rows.h)

    # The layer's fused training step (ops.quantize_train): csrc/cpu/nearest_code.cpp.
    def quantize_train(self, z, basis, weight, bias):
        return torch.ops.simvq.quantize_train(z, basis, weight, bias)

    def quantize_train_backward(self, d_out, z, basis, codebook, idx, commit_scale,
                                codebook_scale):
        return torch.ops.simvq.quantize_train_backward(d_out, z, basis, codebook, idx,
                                                       commit_scale, codebook_scale)


BACKEND = CPUBackend()
