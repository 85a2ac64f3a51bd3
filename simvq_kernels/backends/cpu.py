"""The 'cpu' backend: the extension's fused C++ kernels (csrc/cpu/)."""
from __future__ import annotations

from .base import FLOAT_DTYPES
from .compiled import CompiledBackend


class CPUBackend(CompiledBackend):
    name = "cpu"
    description = ("fused C++ kernel: register-blocked AVX-512/AVX2 GEMM with an argmin "
                   "epilogue (BLAS tiles for float64 and the scalar ISA), multithreaded")
    devices = ("cpu",)
    dtypes = FLOAT_DTYPES
    auto = True
    dispatch_key = "CPU"


BACKEND = CPUBackend()
