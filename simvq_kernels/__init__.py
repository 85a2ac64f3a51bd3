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
from .metrics import CodebookUsage, codebook_usage, sync_codebook_usage
from .nn import ResidualSimVQ, SimVQ
from .distributed import ShardedSimVQ, sharded_nearest_code
from .ops import nearest_code, nearest_code_ex, quantize, simvq_quantize
from . import official  # drop-in targets for the official SimVQ code

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CodebookUsage",
    "ResidualSimVQ",
    "ShardedSimVQ",
    "SimVQ",
    "available_backends",
    "backend_status",
    "codebook_usage",
    "nearest_code",
    "nearest_code_ex",
    "official",
    "quantize",
    "select_backend",
    "sharded_nearest_code",
    "simvq_quantize",
    "sync_codebook_usage",
    "__version__",
]
