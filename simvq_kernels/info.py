"""`python -m simvq_kernels.info`: versions, extension build status, backends."""
from __future__ import annotations

import importlib.util
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__, _ext
    from .backends import AUTO_ORDER, BACKENDS, validation

    info = {
        "simvq_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no (CPU build)",
        "CUDA devices": (torch.cuda.device_count() if torch.cuda.is_available() else 0),
        "CPU threads": torch.get_num_threads(),
        "triton": "not installed",
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
    ext = _ext.load()
    info["extension"] = ("loaded: " + ext.__file__) if ext is not None else \
        f"NOT LOADED ({_ext.error()})"
    info["extension CUDA kernels"] = "yes" if _ext.built_with_cuda() else "no"
    backends = {}
    for name, b in BACKENDS.items():
        problem = b.install_problem()
        status = "available" if problem is None else "unavailable: " + problem
        if b.gpu and (problem is None or name == "cuda" and _ext.built_with_cuda()):
            status += "; " + ("built, " if name == "cuda" else "") + validation.status(name)
        backends[name] = (status, b.description, "/".join(b.devices))
    info["backends"] = backends
    info["auto order"] = ", ".join(AUTO_ORDER)
    return info


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    order = info.pop("auto order")
    width = max(len(k) for k in info)
    print("simvq-kernels environment")
    for k, v in info.items():
        print(f"  {k:<{width}}  {v}")
    print(f"backends (auto order: {order}; 'reference' only on request; a GPU backend only "
          "once validated on that GPU's architecture, until then 'chunked' on CUDA "
          "tensors):")
    for name, (status, desc, devices) in backends.items():
        print(f"  {name:<10} {status}")
        print(f"  {'':<10} {desc} [{devices}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
