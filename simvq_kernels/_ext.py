"""Loads the compiled extension ``simvq_kernels._C`` once, on first use.

Nothing is imported at package import time. A missing or broken extension gives one
warning (saying how to fix it) and leaves the pure-PyTorch backends working; the error
is kept for ``python -m simvq_kernels.info``.
"""
from __future__ import annotations

import importlib
import json
import os
import threading
import warnings

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}
_hooks: list = []  # run once, in order, right after the extension is imported


def add_load_hook(fn) -> None:
    """Run ``fn(module)`` right after the extension is imported (at once if it already
    is). The backends register their fake kernels and autograd this way, so this module
    imports none of them."""
    _hooks.append(fn)
    if _state["module"] is not None:
        fn(_state["module"])

FIX_HINT = (
    "Rebuild it with `pip install -e .` from the repository root (a C++ compiler and "
    "the same torch version at build and run time are needed; with a custom torch use "
    "`pip install --no-build-isolation -e .`). The 'reference' and 'chunked' backends "
    "work without it."
)


def load():
    """Returns the extension module, or None if it is unavailable (warns once)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("SIMVQ_DISABLE_EXTENSION", "0") == "1":
            _state["error"] = "disabled by SIMVQ_DISABLE_EXTENSION=1"
        else:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)

                mod = importlib.import_module("simvq_kernels._C")
                for hook in _hooks:
                    hook(mod)
                _state["module"] = mod
            # Any failure while importing a compiled module (ImportError for a missing
            # file or symbol, OSError for a bad library, and whatever its static
            # initialisers or our registration raise) leaves the pure-PyTorch backends
            # working; it is reported once and kept for `python -m simvq_kernels.info`.
            except Exception as e:  # noqa: BLE001 (reported, not swallowed)
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    "simvq_kernels: the compiled extension could not be loaded "
                    f"({_state['error']}). {FIX_HINT}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["tried"] = True
        return _state["module"]


def available() -> bool:
    return load() is not None


def error() -> str | None:
    load()
    return _state["error"]


def build_info() -> dict:
    """What setup.py recorded about the build (``simvq_kernels/_build_info.json``,
    written at build time; empty if absent), e.g. why the CUDA sources were skipped."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def built_with_cuda() -> bool:
    """True if the extension has CUDA kernels registered (checked without a GPU)."""
    if load() is None:
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("simvq::nearest_code", "CUDA")
