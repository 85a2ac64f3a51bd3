"""`python -m simvq_kernels.info`: versions, extension build status, backends."""
from __future__ import annotations

import importlib.util
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__, _ext
    from .backends import BACKENDS

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
        backends[name] = ("available" if problem is None else "unavailable: " + problem,
                          b.description, "/".join(b.devices))
    info["backends"] = backends
    return info


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    print("simvq-kernels environment")
    for k, v in info.items():
        print(f"  {k:<{width}}  {v}")
    print("backends (auto order: cuda, cpu, chunked; 'reference' only on request):")
    for name, (status, desc, devices) in backends.items():
        print(f"  {name:<10} {status}")
        print(f"  {'':<10} {desc} [{devices}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
