"""The 'cpu' backend: the extension's fused C++ kernels (csrc/cpu/)."""
from __future__ import annotations

from .base import FLOAT_DTYPES
from .compiled import CompiledBackend


class CPUBackend(CompiledBackend):
    name = "cpu"
    description = "fused C++ kernel: tiled sgemm + vectorised argmin, multithreaded"
    devices = ("cpu",)
    dtypes = FLOAT_DTYPES
    auto = True
    dispatch_key = "CPU"


BACKEND = CPUBackend()
