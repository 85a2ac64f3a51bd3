"""The machine a run measured: processor, memory, date, commit and versions."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess

import torch

from .memory import _gib, total_memory_bytes


def machine_info(device) -> dict:
    """Machine, date, commit and versions for the summary."""
    device = torch.device(device)
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "ram": _gib(total_memory_bytes("cpu"))}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout
        changed = [line[3:] for line in dirty.splitlines() if line.strip()]
        info["git commit"] = commit + (
            f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        info["git commit"] = "unknown (not a git checkout)"
    info["python"] = platform.python_version()
    for dist in ("torch", "numpy", "faiss-cpu", "vector-quantize-pytorch", "pykeops",
                 "simvq-kernels"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info
