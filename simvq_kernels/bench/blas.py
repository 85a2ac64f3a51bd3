"""Fair peers: which BLAS kernel a peer runs, and the environment it runs under.

Some machines set ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` for old OpenBLAS builds.
A peer that brings its own OpenBLAS (faiss-cpu does) would then run the kernel those
variables force (e.g. the AVX2 'Haswell' kernel on an AVX-512 CPU), not the one it picks
for the machine: a handicapped comparison. So a peer's child process runs with both
variables removed, and records (threadpoolctl) the kernel its BLAS actually loaded.

An OpenBLAS older than the CPU does not know it and falls back to an SSE-era kernel
(faiss-cpu 1.15's OpenBLAS 0.3.15 picks 'Barcelona' on AMD Zen 5). That would handicap
the peer too, so in the default mode ('auto') the bench probes the peer's BLAS once and,
if it fell back like that on a CPU with AVX2 or AVX-512, forces the best kernel the CPU
runs (SkylakeX for AVX-512, Haswell for AVX2) and says so in the notes.
"""
from __future__ import annotations

import os
from typing import Optional

PEER_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MODES = ("auto", "detect", "inherit")
AVX512_KERNELS = ("skylakex", "cooperlake", "sapphirerapids")
AVX2_KERNELS = ("haswell", "zen", "excavator")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")


def blas_libraries(path_contains: Optional[str] = None) -> Optional[list]:
    """The BLAS libraries loaded in this process (threadpoolctl), optionally only those
    whose file path contains ``path_contains``; None if threadpoolctl is not installed."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    libs = []
    for d in threadpoolctl.threadpool_info():
        if d.get("user_api") != "blas":
            continue
        libs.append({"library": os.path.basename(d.get("filepath", "?")),
                     "path": d.get("filepath", ""),
                     "api": d.get("internal_api", "?"), "version": d.get("version"),
                     "kernel": d.get("architecture"),
                     "threading": d.get("threading_layer"),
                     "threads": d.get("num_threads")})
    if path_contains:
        mine = [x for x in libs if path_contains in x["path"]]
        libs = mine or libs
    return libs


def describe(libs: Optional[list]) -> str:
    """One line per library: 'OpenBLAS 0.3.15 kernel SkylakeX (libopenblaso-...so, 2
    threads, openmp)'."""
    if libs is None:
        return "not recorded (pip install threadpoolctl)"
    if not libs:
        return "no BLAS library loaded"
    out = []
    for x in libs:
        name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(x["api"], x["api"])
        s = f"{name} {x['version'] or ''}".strip()
        if x["kernel"]:
            s += f" kernel {x['kernel']}"
        extra = [x["library"]] + ([f"{x['threads']} threads"] if x["threads"] else []) + (
            [x["threading"]] if x["threading"] else [])
        out.append(s + f" ({', '.join(extra)})")
    return "; ".join(out)


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_openblas_kernel(flags: set) -> Optional[str]:
    """The widest OpenBLAS x86 kernel family this CPU runs (None: neither AVX2 nor
    AVX-512)."""
    if all(f in flags for f in AVX512_FLAGS):
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def fallback_fix(libs: Optional[list], flags: set) -> Optional[str]:
    """The kernel to force when the peer's OpenBLAS fell back to an SSE-era kernel on a
    CPU with AVX2 or AVX-512 (an OpenBLAS that does not know this CPU); else None."""
    best = best_openblas_kernel(flags)
    if not libs or best is None:
        return None
    for x in libs:
        k = (x.get("kernel") or "").lower()
        if x.get("api") == "openblas" and k and k not in AVX512_KERNELS + AVX2_KERNELS:
            return best
    return None


def peer_env(mode: str, probe: Optional[list] = None, flags: Optional[set] = None):
    """(environment changes for a peer's child: var -> value, None = remove; or None to
    inherit the environment as it is), note)."""
    if mode == "inherit":
        vals = {v: os.environ[v] for v in PEER_BLAS_VARS if v in os.environ}
        return None, ("peers ran under the environment's " + (
            ", ".join(f"{k}={v}" for k, v in vals.items()) or "(no OpenBLAS variables)"))
    removed = {v: None for v in PEER_BLAS_VARS}
    had = [f"{v}={os.environ[v]}" for v in PEER_BLAS_VARS if v in os.environ]
    why = (f"removed {', '.join(had)} from the peers' environment" if had
           else f"{' / '.join(PEER_BLAS_VARS)} unset for the peers")
    if mode == "detect":
        return removed, why + "; their BLAS picked its own kernel"
    if mode == "auto":
        fix = fallback_fix(probe, cpu_flags() if flags is None else flags)
        if fix is None:
            return removed, why + "; their BLAS picked its own kernel"
        got = ", ".join(f"{x['library']}: {x['kernel']}" for x in probe or ())
        return dict(removed, OPENBLAS_CORETYPE=fix), (
            why + f"; their OpenBLAS does not know this CPU (it picked {got}, an SSE-era "
            f"fallback), so OPENBLAS_CORETYPE={fix} was set for them: the widest kernel "
            "this CPU runs (--peer-blas detect keeps the fallback)")
    return dict(removed, OPENBLAS_CORETYPE=mode), why + f"; OPENBLAS_CORETYPE={mode} forced"


def apply_env(changes: Optional[dict]) -> None:
    """In a child process, before the peer's libraries load."""
    for var, value in (changes or {}).items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
