"""Which backends exist, what each supports, and why one cannot serve an input.

A backend is one object (one module per backend in this folder) that says what it can
serve and owns its calls (``nearest_code``, ``quantize``, ``quantize_backward``; see
``base.Backend``). A backend is chosen per call from the input's device and dtype.
``"auto"`` takes the first backend in ``AUTO_ORDER`` that can serve the input -- a GPU
backend only once it has passed the GPU acceptance run on that GPU's architecture
(``validation.py``); an explicit backend that cannot serve it raises
:class:`BackendUnavailableError` saying why (no silent fallback). The 'reference' backend
(official formula, builds the N x K matrix) is never picked by "auto"; its tile-bounded
twin 'chunked' is the fallback.

Adding a backend: one module here defining ``BACKEND``, and one line in ``BACKENDS``.
"""
from __future__ import annotations

import torch

from . import cpu, cuda, python, triton, validation
from .base import FLOAT_DTYPES, Backend, BackendUnavailableError, dtype_name

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    python.REFERENCE,
    python.CHUNKED,
    cpu.BACKEND,
    cuda.BACKEND,
    triton.BACKEND,
)}

AUTO_ORDER = ("cuda", "triton", "cpu", "chunked")

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendUnavailableError", "FLOAT_DTYPES",
           "auto_skip_reason", "available_backends", "backend_status", "get",
           "select_backend"]


def get(name: str) -> Backend:
    return BACKENDS[name]


def available_backends() -> list[str]:
    """Backends usable on this installation (for some device), e.g. ['reference', 'chunked', 'cpu']."""
    return [n for n, b in BACKENDS.items() if b.install_problem() is None]


def backend_status() -> dict:
    """name -> None if installed and usable, else the reason it is not."""
    return {n: b.install_problem() for n, b in BACKENDS.items()}


def auto_skip_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why "auto" would pass over backend ``name`` for (device, dtype), else None."""
    b = BACKENDS[name]
    if not b.auto:
        return "never picked by 'auto'"
    reason = b.why_not(device, dtype)
    if reason is not None:
        return reason
    if b.gpu and device.type == "cuda" and not validation.validated_on(name, device):
        return (f"not yet validated on a GPU of this architecture "
                f"({validation.arch_of(device)}); ask for backend={name!r} explicitly")
    if b.gpu and device.type != "cuda":
        return "a GPU backend: 'auto' picks it on CUDA devices only"
    return None


def select_backend(backend: str, device, dtype: torch.dtype) -> str:
    """Resolve ``backend`` ("auto" or a name) for an input on ``device`` with ``dtype``.

    Returns the backend name that will run; raises if an explicit backend cannot serve
    the input, or if the name is unknown.
    """
    device = torch.device(device)
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
    if backend == "auto":
        for name in AUTO_ORDER:
            if auto_skip_reason(name, device, dtype) is None:
                return name
        raise BackendUnavailableError(  # unreachable for float dtypes: 'chunked' serves all
            f"no backend can serve {dtype} tensors on {device}")
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown `backend` {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    reason = BACKENDS[backend].why_not(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot serve {dtype_name(dtype)} tensors on "
            f"{device}: {reason}. Use backend='auto' or one of "
            f"{[n for n, b in BACKENDS.items() if b.why_not(device, dtype) is None]}.")
    return backend


def check_name(backend) -> None:
    """Raise at once for a backend name that does not exist (e.g. at construction)."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"unknown `backend` {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
