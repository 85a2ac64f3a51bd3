"""The 'triton' backend: fused Triton kernels (simvq_kernels/triton/).

Serves CUDA tensors, and CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set when the call is made: slow, for tests). Triton and its
kernels are imported on first use, never at package import.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .base import Backend


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels: tl.dot tiles with a running argmin, split-K for small N"
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    auto = True
    gpu = True

    def install_problem(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not _interpreter_on() and not torch.cuda.is_available():
            return ("no CUDA device (set TRITON_INTERPRET=1 to run it on CPU tensors under "
                    "Triton's interpreter)")
        return None

    def device_problem(self, device):
        if device.type == "cpu" and not _interpreter_on():
            return ("it runs on CPU tensors only under Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")
        return None

    @staticmethod
    def _ops():
        # an import statement, not importlib: torch.compile traces through it
        from ..triton import ops
        return ops

    def nearest_code(self, z, codebook, duplicate_map=None):
        return self._ops().nearest_code(z, codebook)

    def quantize(self, z, basis, weight, bias, duplicate_map=None):
        return self._ops().quantize(z, basis, weight, bias)

    def quantize_backward(self, grad_zq, basis, indices, weight):
        return self._ops().quantize_backward(grad_zq, basis, indices, weight)


BACKEND = TritonBackend()
