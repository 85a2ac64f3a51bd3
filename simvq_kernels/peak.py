"""The machine's physical fp32 FMA peak, measured with the compiled extension's probe
``torch.ops.simvq.fma_peak(isa, iterations)``: 12 independent FMA chains per thread in
the ISA's widest vectors, on every intra-op thread at once. Nothing can do float32
multiply-adds faster on this machine, so it is the limit the bench judges the search
against (GFLOP/s = the flops the probe reports / the seconds it took).

Used by ``python -m simvq_kernels.bench`` (the "% peak" column) and
``python -m simvq_kernels.info`` (a quick measurement)."""
from __future__ import annotations

import time
from typing import Optional

ISAS = ("avx512", "avx2", "scalar")  # widest first
VECTOR_ISAS = ("avx512", "avx2")


def unavailable() -> Optional[str]:
    """None if the probe can run here, else why not (the extension is not loaded, or it
    was built without the probe)."""
    try:
        import torch

        from . import _ext
    except Exception as e:  # noqa: BLE001  (a broken torch install: say so)
        return f"{type(e).__name__}: {e}"
    if _ext.load() is None:
        return f"the compiled extension is not loaded ({_ext.error()})"
    if not hasattr(torch.ops.simvq, "fma_peak"):
        return "the compiled extension has no fma_peak probe (an older build: rebuild it)"
    return None


def _op():
    import torch

    from . import _ext

    if _ext.load() is None:
        raise RuntimeError(f"fma_peak: the compiled extension is not loaded ({_ext.error()})")
    return torch.ops.simvq.fma_peak


def isas() -> list:
    """The vector ISAs this CPU runs (AVX-512 and/or AVX2 with FMA), widest first; only
    'scalar' on a CPU with neither. Raises RuntimeError when the probe is unavailable."""
    op = _op()
    out = []
    for isa in VECTOR_ISAS:
        try:
            op(isa, 1)
        except RuntimeError as e:
            if "does not run" not in str(e):
                raise
            continue
        out.append(isa)
    return out or ["scalar"]


CALIBRATE_S = 0.02  # a call this long is mostly work, also where waking threads is slow


def probe(isa: str, seconds: float = 0.02) -> tuple:
    """(callable, flops per call): one call runs the probe in ``isa`` on all threads for
    about ``seconds``. Calibrated here from a call of at least CALIBRATE_S (on a busy
    machine a parallel call can cost a scheduler tick, ~10 ms, whatever its work)."""
    op = _op()
    iters = 100_000
    op(isa, iters)  # starts the thread pool, faults in the code
    while True:
        t0 = time.perf_counter()
        op(isa, iters)
        dt = time.perf_counter() - t0
        if dt >= max(seconds, CALIBRATE_S) or iters >= 1 << 40:
            break
        iters *= 4
    iters = max(1, round(iters * seconds / max(dt, 1e-9)))
    flops = op(isa, iters)

    def call():
        op(isa, iters)

    return call, float(flops)


def gflops(isa: str, min_seconds: float = 0.3, call_seconds: float = 0.02,
           min_calls: int = 5) -> float:
    """GFLOP/s of the probe in ``isa``: the fastest of calls of about ``call_seconds``
    each, over at least ``min_seconds`` and ``min_calls`` (a physical limit: no call can
    beat it, and a slower one only shared the CPU with someone else)."""
    call, flops = probe(isa, call_seconds)
    best, n, t_start = float("inf"), 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return flops / best / 1e9


def measure(min_seconds: float = 0.3, call_seconds: float = 0.02, min_calls: int = 5) -> dict:
    """{isa: GFLOP/s} for every vector ISA this CPU runs (see :func:`isas`)."""
    return {isa: gflops(isa, min_seconds, call_seconds, min_calls) for isa in isas()}


def best(peaks: dict, cap: Optional[str] = None) -> Optional[str]:
    """The ISA with the highest peak in ``peaks``, among those no wider than ``cap`` (the
    ISA the CPU kernel is limited to, e.g. by SIMVQ_CPU_ISA=avx2; None = no limit)."""
    allowed = ISAS[ISAS.index(cap):] if cap in ISAS else ISAS
    got = {k: v for k, v in peaks.items() if k in allowed and v}
    return max(got, key=got.get) if got else None


def kernel_isa_cap() -> Optional[str]:
    """The ISA the CPU kernel is set to when it is not its native pick (SIMVQ_CPU_ISA or
    set_cpu_kernel_config), else None."""
    try:
        from .info import cpu_kernel_config

        c = cpu_kernel_config()
    except Exception:  # noqa: BLE001  (a bad override is reported elsewhere)
        return None
    if not c or c.get("isa_from", "native") == "native":
        return None
    return c.get("isa")


__all__ = ["ISAS", "VECTOR_ISAS", "CALIBRATE_S", "unavailable", "isas", "probe", "gflops",
           "measure", "best", "kernel_isa_cap"]
