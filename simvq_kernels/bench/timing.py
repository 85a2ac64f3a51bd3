"""Timing: device-synchronised timed runs, the matrix-product ceiling, the side-by-side
fractions of the ceiling and of the machine's FMA peak, and the guards against other
processes sharing the CPUs."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable, Optional

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable, n: int, device) -> list:
    """Seconds of ``n`` calls of ``fn``, the device synchronised inside the timed region
    (CUDA events on CUDA, perf_counter elsewhere)."""
    device = torch.device(device)
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


CONTENTION_CORES = 0.1
MAX_RUNS = 500


class ForeignCPU:
    """CPU time that *other* processes used during a region, in cores: the machine's
    busy time (/proc/stat) minus this process's own (all threads). Timings taken while
    it is well above zero were shared with someone else; the row says so."""

    @staticmethod
    def _machine_busy_s():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def __enter__(self):
        self.cores = None
        try:
            self.t0, self.m0, self.o0 = time.perf_counter(), self._machine_busy_s(), self._own_s()
        except (OSError, ValueError, IndexError):
            self.t0 = None
        return self

    def __exit__(self, *exc):
        if self.t0 is not None:
            wall = time.perf_counter() - self.t0
            foreign = (self._machine_busy_s() - self.m0) - (self._own_s() - self.o0)
            # /proc/stat ticks are 10 ms: below ~0.5 s of wall time the figure is noise
            self.cores = max(0.0, foreign / wall) if wall >= 0.5 else None
        return False


GPU_CEILING_SIZE = 8192


def ceiling_key(device, d: int, mode: str = "fp32"):
    """Which ceiling a row is compared with: per d on CPU (a cache-resident tile of that
    width), per precision mode on CUDA (the tensor-core ceiling, 8192^3 in that mode)."""
    return mode if torch.device(device).type == "cuda" else d


def ceiling_label(key) -> str:
    if isinstance(key, str):
        n = GPU_CEILING_SIZE
        return f"{key} {n}x{n}x{n}"
    return f"d={key}"


def ceiling_tile(d: int, device, mode: str = "fp32"):
    """The ceiling's unit of work, warmed up (design.md §5). On CPU: torch.mm of a
    cache-resident (1024 x d) @ (d x 1024) tile into a preallocated output, fp32. On
    CUDA: cuBLAS 8192 x 8192 x 8192 in the mode's dtype (tf32: fp32 under matmul
    precision 'high', set by the caller), the tensor-core ceiling, independent of d.
    Random data, never zeros. Returns (callable, flops per call)."""
    from .presets import MODES

    device = torch.device(device)
    if device.type == "cuda":
        t = d = GPU_CEILING_SIZE
        dtype = getattr(torch, MODES[mode][0])
    else:
        t, dtype = 1024, torch.float32
    a = torch.randn(t, d, device=device).to(dtype)
    bt = torch.randn(t, d, device=device).to(dtype).t()
    c = torch.empty(t, t, device=device, dtype=dtype)

    def tile():
        torch.mm(a, bt, out=c)

    for _ in range(5):
        tile()
    return tile, 2 * t * t * d


def ceiling_gflops(d: int, device, mode: str = "fp32", min_runs: int = 50,
                   min_seconds: float = 0.3) -> float:
    """GFLOP/s of the ceiling tile (see :func:`ceiling_tile`)."""
    tile, flops = ceiling_tile(d, device, mode)
    times, t_start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t_start < min_seconds:
        times += time_runs(tile, 1, device)
        if len(times) > 100_000:
            break
    return flops / statistics.median(times) / 1e9


PAIRS = 15


def paired_fraction(run, op_flops: float, tile, tile_flops: float, device, op_s: float,
                    budget: float, pairs: int = PAIRS) -> float:
    """The op's fraction of a limit, measured side by side: ``run`` (doing ``op_flops``)
    and a batch of ``tile`` calls (``tile_flops`` each) of about the same duration are
    timed alternately in this process, and the median of the per-pair ratios of their
    FLOP/s is returned. Slow drifts of the machine's speed (other tenants, clocks) then
    cancel, which a limit measured at the start and end of the run cannot do."""
    runs = time_runs(tile, 3, device)
    if statistics.median(runs) < 0.005:  # short tiles (the ceiling's): 20 runs in all
        runs += time_runs(tile, 17, device)
    tile_s = statistics.median(runs)
    reps = max(1, round(op_s / tile_s))

    def tiles():
        for _ in range(reps):
            tile()

    pairs = max(3, min(pairs, int(budget // max(2 * op_s, 1e-9))))
    ratios = []
    for _ in range(pairs):
        t_op = time_runs(run, 1, device)[0]
        t_tiles = time_runs(tiles, 1, device)[0]
        ratios.append((op_flops / t_op) / (tile_flops * reps / t_tiles))
    return statistics.median(ratios)


def paired_ceiling_fraction(run, shape, device, op_s: float, budget: float,
                            pairs: int = PAIRS) -> Optional[float]:
    """The op's fraction of the matrix-product ceiling (:func:`ceiling_tile`), measured
    side by side (see :func:`paired_fraction`)."""
    tile, flops = ceiling_tile(shape.d, device)
    return paired_fraction(run, shape.search_flops, tile, flops, device, op_s, budget, pairs)


# the peak-probe calls of a paired measurement last about as long as the op, within
# these bounds (shorter calls would time the thread pool's wake-up on a busy machine)
PEAK_CALL_S = (0.02, 0.05)


def paired_peak_fraction(run, shape, device, op_s: float, budget: float, isa: str,
                         pairs: int = PAIRS) -> float:
    """The op's fraction of the machine's FMA peak in ``isa`` (simvq_kernels.peak),
    measured side by side: the op and a batch of peak-probe calls of about the same
    duration timed alternately (see :func:`paired_fraction`). GFLOP/s of the op counts
    the search, 2*N*K*d."""
    from .. import peak

    tile, flops = peak.probe(isa, min(max(op_s, PEAK_CALL_S[0]), PEAK_CALL_S[1]))
    return paired_fraction(run, shape.search_flops, tile, flops, device, op_s, budget, pairs)


def paired_ratio(run_a, run_b, device, budget: float, pairs: int = PAIRS) -> float:
    """Median over ``pairs`` alternations of time(run_a) / time(run_b), both timed in this
    process back to back, so that drifts of the machine's speed (other tenants) cancel in
    the ratio, which timing them in separate rows cannot do."""
    run_b()  # warm
    t_a = time_runs(run_a, 1, device)[0]
    t_b = time_runs(run_b, 1, device)[0]
    pairs = max(3, min(pairs, int(budget // max(t_a + t_b, 1e-9))))
    ratios = [t_a / t_b]
    for _ in range(pairs - 1):
        ratios.append(time_runs(run_a, 1, device)[0] / time_runs(run_b, 1, device)[0])
    return statistics.median(ratios)


def other_cpu_load(window: float = 0.5) -> Optional[float]:
    """Cores kept busy by other processes over ``window`` seconds (this process idles)."""
    with ForeignCPU() as f:
        time.sleep(window)
    return f.cores


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Waits (up to ``max_wait`` s) until other processes use less than ``threshold``
    cores; returns the seconds waited. Timings shared with another job are worthless."""
    t0 = time.perf_counter()
    while max_wait > 0:
        load = other_cpu_load()
        if load is None or load < threshold or time.perf_counter() - t0 >= max_wait:
            break
        time.sleep(2.0)
    return time.perf_counter() - t0


class QuietGate:
    """Waits for a quiet machine before each row: at most ``per_row`` seconds each and
    ``total`` seconds over the whole run (then it stops waiting, and rows that were
    contended say so), so a machine that is never quiet still finishes."""

    def __init__(self, per_row: float, total: float):
        self.per_row, self.left, self.waited = per_row, total, 0.0

    def wait(self):
        if self.per_row > 0 and self.left > 0:
            w = wait_for_quiet(min(self.per_row, self.left))
            self.left -= w
            self.waited += w


