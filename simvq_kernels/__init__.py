"""simvq-kernels: fused SimVQ vector quantisation for PyTorch.

Public names only. Importing this package imports no compiled module and queries no
GPU; the extension is loaded on first use.
"""
from .backends import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    select_backend,
)
from .metrics import CodebookUsage, codebook_usage
from .nn import SimVQ
from .ops import nearest_code, nearest_code_ex, quantize, simvq_quantize

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CodebookUsage",
    "SimVQ",
    "available_backends",
    "backend_status",
    "codebook_usage",
    "nearest_code",
    "nearest_code_ex",
    "quantize",
    "select_backend",
    "simvq_quantize",
    "__version__",
]
