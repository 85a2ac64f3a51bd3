"""The machine a run measured: processor, memory, date, commit and versions."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import re
import os
import platform
import subprocess

import torch

from .blas import PEER_BLAS_VARS, cpu_flags
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
    info["cpu isa"] = cpu_isa(cpu_flags())
    info["cpu caches"] = format_caches(cache_sizes())
    info["torch blas"] = torch_blas()
    kernel = cpu_kernel_config()
    if kernel:
        info["cpu kernel"] = kernel
    info["openblas environment"] = ", ".join(
        f"{v}={os.environ[v]}" for v in PEER_BLAS_VARS if v in os.environ) or "unset"
    # MKL_ENABLE_INSTRUCTIONS caps the instruction set of torch's MKL (e.g. AVX2 on an
    # AVX-512 machine, to stand in for an AVX2-only CPU): it lowers the matmul ceiling
    info["mkl environment"] = ", ".join(
        f"{v}={os.environ[v]}" for v in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
        if v in os.environ) or "unset"
    if device.type == "cuda":
        info.update(gpu_info(device))
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
                 "simvq-kernels") + (("triton", "faiss-gpu", "flash-kmeans")
                                     if device.type == "cuda" else ()):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info


ISA_FEATURES = (("avx512f", "AVX-512F"), ("avx512bw", "BW"), ("avx512vl", "VL"),
                ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx2", "AVX2"),
                ("fma", "FMA"), ("amx_tile", "AMX"))


def cpu_isa(flags: set) -> str:
    """The vector instruction sets the CPU reports, e.g. 'AVX-512F BW VL VNNI BF16, AVX2,
    FMA'."""
    if not flags:
        return "unknown (no /proc/cpuinfo flags)"
    have = [name for flag, name in ISA_FEATURES if flag in flags]
    s = " ".join(n for n in have if n in ("AVX-512F", "BW", "VL", "VNNI", "BF16"))
    rest = [n for n in have if n in ("AVX2", "FMA", "AMX")]
    return ", ".join(x for x in [s] + rest if x) or "SSE only"


def cache_sizes(cpu: int = 0) -> dict:
    """{'L1d': bytes, 'L2': bytes, 'L3': bytes} per instance, from
    /sys/devices/system/cpu/cpuN/cache (missing levels are left out)."""
    base = f"/sys/devices/system/cpu/cpu{cpu}/cache"
    out = {}
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for e in entries:
        if not e.startswith("index"):
            continue
        try:
            def read(name, e=e):
                with open(os.path.join(base, e, name)) as f:
                    return f.read().strip()
            level, kind, size = read("level"), read("type"), read("size")
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1024, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        try:
            nbytes = int(size.rstrip("KMG")) * mult
        except ValueError:
            continue
        out["L1d" if level == "1" else f"L{level}"] = nbytes
    return out


def format_caches(caches: dict) -> str:
    if not caches:
        return "unknown"

    def size(b):
        return f"{b // 2**20} MiB" if b >= 2**20 and b % 2**20 == 0 else f"{b // 1024} KiB"
    return ", ".join(f"{k} {size(v)}" for k, v in caches.items()) + " (per instance)"


def torch_blas() -> str:
    """torch's BLAS (from its build configuration), e.g. 'mkl (Intel oneMKL 2024.2)'."""
    try:
        cfg = torch.__config__.show()
    except (AttributeError, RuntimeError):
        return "unknown"
    m = re.search(r"BLAS_INFO=(\w+)", cfg)
    blas = m.group(1) if m else "?"
    extra = []
    m = re.search(r"Math Kernel Library Version ([\w.]+)", cfg)
    if m:
        extra.append(f"oneMKL {m.group(1)}")
    m = re.search(r"OpenBLAS ([\w.]+)", cfg)
    if m:
        extra.append(f"OpenBLAS {m.group(1)}")
    m = re.search(r"CPU capability usage: (\w+)", cfg)
    if m:
        extra.append(f"ATen CPU capability {m.group(1)}")
    return blas + (f" ({', '.join(extra)})" if extra else "")


def cpu_kernel_config() -> str:
    """The CPU kernel's run-time choice (instruction set, tile, caches) as the extension
    reports it, when it does (older builds do not: ''). Read without failing the run."""
    from simvq_kernels import _ext

    mod = _ext.load()
    if mod is None:
        return ""
    try:
        op = getattr(torch.ops.simvq, "cpu_kernel_config")
    except (AttributeError, RuntimeError):
        return ""
    try:
        raw = op()
        cfg = json.loads(raw) if isinstance(raw, str) else raw
    except (RuntimeError, ValueError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(cfg, dict):
        return str(cfg)
    if cfg.get("summary"):  # the extension's own one-line description
        extra = [f"{k.replace('_from', '')} from {cfg[k]}" for k in ("isa_from", "tile_from")
                 if cfg.get(k)]
        blocked = cfg.get("float32_path")
        return cfg["summary"] + "".join(f"; {x}" for x in extra + ([blocked] if blocked else []))
    parts = []
    isa = cfg.get("isa")
    if isa:
        parts.append(f"isa {isa}" + (f" (native {cfg['native']})" if cfg.get("native")
                                     and cfg.get("native") != isa else "")
                     + (f", from {cfg['isa_from']}" if cfg.get("isa_from") else ""))
    if cfg.get("tile_n") and cfg.get("tile_k"):
        parts.append(f"tile {cfg['tile_n']}x{cfg['tile_k']}"
                     + (f", from {cfg['tile_from']}" if cfg.get("tile_from") else ""))
    if cfg.get("l2_share"):
        parts.append(f"L2 share {int(cfg['l2_share']) // 1024} KiB"
                     + (f", from {cfg['l2_from']}" if cfg.get("l2_from") else ""))
    known = {"isa", "native", "isa_from", "tile_n", "tile_k", "tile_from", "l2_share",
             "l2_from", "l1d", "l2", "l3", "caches_from"}
    parts += [f"{k} {v}" for k, v in cfg.items() if k not in known]
    return "; ".join(parts) or json.dumps(cfg)


def gpu_info(device) -> dict:
    """Card, memory, driver, CUDA runtime and compute capability."""
    p = torch.cuda.get_device_properties(device)
    info = {"gpu": torch.cuda.get_device_name(device),
            "gpu memory": _gib(p.total_memory),
            "compute capability": f"sm_{p.major}{p.minor} ({p.multi_processor_count} SMs)",
            "cuda runtime (torch)": torch.version.cuda or "?"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        drv = out.stdout.strip().splitlines()
        info["driver"] = drv[0] if out.returncode == 0 and drv else "unknown"
    except (OSError, subprocess.SubprocessError):
        info["driver"] = "unknown (nvidia-smi not found)"
    return info
