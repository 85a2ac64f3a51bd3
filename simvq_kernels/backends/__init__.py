"""Which backends exist, what each supports, and why one cannot serve an input.

A backend is chosen per call from the input's device and dtype. ``"auto"`` takes the
first backend in ``AUTO_ORDER`` that can serve the input; an explicit backend that
cannot serve it raises :class:`BackendUnavailableError` saying why (no silent fallback).
The 'reference' backend (official formula, builds the N x K matrix) is never picked by
"auto"; its tile-bounded twin 'chunked' is the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ext

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this input (the message says why)."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    devices: tuple  # device types it serves
    dtypes: tuple
    needs_extension: bool
    auto: bool  # may "auto" pick it?

    def install_problem(self) -> str | None:
        """Why this backend is not usable at all on this installation, else None."""
        if self.needs_extension and not _ext.available():
            return f"the compiled extension is not loaded ({_ext.error()})"
        if self.name == "cuda" and not _ext.built_with_cuda():
            return "the extension was built without CUDA kernels"
        return None

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve (device, dtype), or None if it can."""
        problem = self.install_problem()
        if problem:
            return problem
        if device.type not in self.devices:
            return f"it runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it supports dtypes {names}, not {str(dtype).replace('torch.', '')}"
        return None


BACKENDS = {
    b.name: b
    for b in (
        Backend("reference", "pure PyTorch, the official formula (builds the N x K matrix)",
                ("cpu", "cuda", "mps", "xpu", "meta"), FLOAT_DTYPES, False, False),
        Backend("chunked", "pure PyTorch over bounded tiles with a running argmin",
                ("cpu", "cuda", "mps", "xpu", "meta"), FLOAT_DTYPES, False, True),
        Backend("cpu", "fused C++ kernel: tiled sgemm + vectorised argmin, multithreaded",
                ("cpu",), FLOAT_DTYPES, True, True),
        Backend("cuda", "fused CUDA C++ kernel", ("cuda",), FLOAT_DTYPES, True, True),
    )
}

AUTO_ORDER = ("cuda", "cpu", "chunked")


def available_backends() -> list[str]:
    """Backends usable on this installation (for some device), e.g. ['reference', 'chunked', 'cpu']."""
    return [n for n, b in BACKENDS.items() if b.install_problem() is None]


def backend_status() -> dict:
    """name -> None if installed and usable, else the reason it is not."""
    return {n: b.install_problem() for n, b in BACKENDS.items()}


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
            if BACKENDS[name].why_not(device, dtype) is None:
                return name
        raise BackendUnavailableError(  # unreachable for float dtypes: 'chunked' serves all
            f"no backend can serve {dtype} tensors on {device}")
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown `backend` {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    reason = BACKENDS[backend].why_not(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot serve {str(dtype).replace('torch.', '')} tensors on "
            f"{device}: {reason}. Use backend='auto' or one of "
            f"{[n for n, b in BACKENDS.items() if b.why_not(device, dtype) is None]}.")
    return backend
