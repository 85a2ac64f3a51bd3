"""`python -m simvq_kernels.info`: versions, extension build status, backends."""
from __future__ import annotations

import importlib.util
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kernel_config() -> dict | None:
    """The compiled CPU kernel's configuration in effect (ISA, tile, caches; see
    csrc/cpu/cpu_config.h), or None without the extension. Cheap: no GPU, no kernel run.
    Raises RuntimeError for a bad SIMVQ_CPU_ISA / SIMVQ_CPU_TILE / SIMVQ_CPU_L2."""
    import json

    import torch

    from . import _ext

    if _ext.load() is None or not hasattr(torch.ops.simvq, "cpu_kernel_config"):
        return None
    return json.loads(torch.ops.simvq.cpu_kernel_config())


FMA_PEAK_CALLS = 5  # info's quick peak: the best of this many calls of FMA_PEAK_CALL_S
FMA_PEAK_CALL_S = 0.02


def fma_peak_now() -> dict:
    """The machine's fp32 FMA peak per ISA the CPU runs, measured now on all intra-op
    threads (simvq_kernels.peak; well under a second): {"peaks": {isa: GFLOP/s}, "best":
    isa, "threads": n}, or {"error": why} (no extension, an older build, a failure)."""
    try:
        import torch

        from . import peak

        why = peak.unavailable()
        if why is not None:
            return {"error": why}
        peaks = peak.measure(min_seconds=0.0, call_seconds=FMA_PEAK_CALL_S,
                             min_calls=FMA_PEAK_CALLS)
        return {"peaks": peaks, "best": peak.best(peaks), "threads": torch.get_num_threads()}
    except Exception as e:  # noqa: BLE001  (info reports problems, it does not fail)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def format_fma_peak(p: dict) -> str:
    """One line for :func:`fma_peak_now`'s result."""
    if "error" in p:
        return f"not measured: {p['error']}"
    per_isa = ", ".join(f"{isa} {g:.1f}" for isa, g in p["peaks"].items())
    return (f"{per_isa} GFLOP/s fp32, measured now on all {p['threads']} threads (best of "
            f"{FMA_PEAK_CALLS} calls of {FMA_PEAK_CALL_S * 1e3:g} ms, 12 independent FMA "
            f"chains per thread); the peak: {p['best']}'s {p['peaks'][p['best']]:.1f}")


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
    build = _ext.build_info()
    if _ext.built_with_cuda():
        info["extension CUDA kernels"] = "yes (archs " + str(build.get("cuda_archs")) + ")"
    else:
        info["extension CUDA kernels"] = "no" + (f" ({build['cuda_reason']})"
                                                  if build.get("cuda_reason") else "")
    backends = {}
    for name, b in BACKENDS.items():
        problem = b.install_problem()
        status = "available" if problem is None else "unavailable: " + problem
        if b.gpu and (problem is None or name == "cuda" and _ext.built_with_cuda()):
            status += "; " + ("built, " if name == "cuda" else "") + validation.status(name)
        backends[name] = (status, b.description, "/".join(b.devices))
    info["backends"] = backends
    info["auto order"] = ", ".join(AUTO_ORDER)
    try:
        info["cpu kernel"] = cpu_kernel_config()
    except RuntimeError as e:  # a bad override: say so instead of failing the report
        info["cpu kernel"] = {"error": str(e).splitlines()[0]}
    return info


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    order = info.pop("auto order")
    cpu_kernel = info.pop("cpu kernel")
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
    print("CPU kernel (override with SIMVQ_CPU_ISA=scalar|avx2|avx512, "
          "SIMVQ_CPU_TILE=<tokens>x<codes>, SIMVQ_CPU_L2=<size>):")
    print(f"  {'cpu':<10} {cpu_model()}")
    if cpu_kernel is None:
        print(f"  {'':<10} not available (the compiled extension is not loaded)")
    elif "error" in cpu_kernel:
        print(f"  {'error':<10} {cpu_kernel['error']}")
    else:
        c = cpu_kernel
        print(f"  {'isa':<10} {c['isa']} (native {c['native_isa']}, from {c['isa_from']})")
        if c.get("float32_path"):
            print(f"  {'paths':<10} {c['float32_path']}")
        print(f"  {'tile':<10} {c['tile_tokens']} tokens x {c['tile_codes']} codes "
              f"({c['tile_fp32_bytes'] // 1024} KiB of fp32; "
              + (f"chosen for an L2 share of {c['l2_share_bytes'] // 1024} KiB from "
                 f"{c['l2_from']})" if c["tile_from"] == "auto" else f"set by {c['tile_from']})"))
        kib = (lambda b: f"{b // 1024} KiB" if b else "unknown")
        print(f"  {'caches':<10} L1d {kib(c['l1d_bytes'])}, L2 {kib(c['l2_bytes'])}, "
              f"L3 {kib(c['l3_bytes'])} per instance (from {c['caches_from']})")
    print(f"  {'fma peak':<10} {format_fma_peak(fma_peak_now())}")
    return 0


def kernels_main() -> int:
    """``--kernels``: compile every Triton configuration the launchers can choose for
    sm_90a and sm_80 (no GPU needed) and print one row per build: registers, spill
    bytes, shared memory, tensor-core instruction; then the compiled extension's CUDA
    kernels, if it has any. Exit status 1 if a Triton build fails to compile, spills,
    exceeds its architecture's shared memory or lacks a tensor-core instruction where
    its products are bf16/fp16/tf32; 2 if triton or the CUDA binary tools are missing."""
    if importlib.util.find_spec("triton") is None:
        print("--kernels needs triton (pip install triton)")
        return 2
    import time

    from . import _ext, sass
    from .triton import aot

    try:
        for name in ("cuobjdump", "ptxas"):
            sass.tool(name)
    except sass.ToolMissing as e:
        print(f"--kernels: {e}")
        return 2
    import triton

    t0 = time.perf_counter()
    results = aot.compile_all()
    print(f"Triton kernels (triton {triton.__version__}), compiled ahead of time for "
          f"{', '.join(a[1] for a in aot.ARCHS)} in {time.perf_counter() - t0:.0f} s; "
          "smem = dynamic + static shared memory per block, spill = local memory per thread:")
    print(aot.format_table(results))
    ext = _ext.load()
    if ext is not None:
        rows = sass.inspect_binary(ext.__file__)
        if rows:
            print("CUDA kernels in the compiled extension:")
            names = _demangle([r.kernel for r in rows])
            for r in rows:
                tc = ", ".join(f"{op} x{n}" for op, n in sorted(r.tensor_core_ops.items()))
                print(f"  {r.arch:<7} regs {r.registers:<4} local {r.local:<5} static smem "
                      f"{r.shared:<6} {tc or '-':<16} {names.get(r.kernel, r.kernel)}")
        else:
            print("CUDA kernels in the compiled extension: none (built without CUDA)")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} Triton builds ok")
    return 1 if failed else 0


def _demangle(symbols) -> dict:
    """C++ kernel names as written (binutils' c++filt), without their argument lists;
    the mangled names where c++filt is missing."""
    import shutil
    import subprocess

    tool = shutil.which("c++filt")
    if not tool or not symbols:
        return {}
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True,
                         check=False).stdout.splitlines()
    if len(out) != len(symbols):
        return {}
    return {m: d.split("(")[0].replace("void ", "", 1).replace("simvq::cuda::kernels::", "")
            .replace("simvq::cuda::", "") for m, d in zip(symbols, out)}


if __name__ == "__main__":
    sys.exit(kernels_main() if "--kernels" in sys.argv[1:] else main())
