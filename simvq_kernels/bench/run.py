"""The driver: runs a preset's cases over the chosen providers (each row in a child
process, see child.py), measures the ceilings, and returns a :class:`BenchResult`."""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import peak
from .blas import describe, peer_env
from .checks import mode_roundoff
from .child import run_in_child, run_measured
from .machine import machine_info
from .memory import total_memory_bytes
from .presets import FUSED_BACKENDS, Preset, Shape, op_label
from .providers import (BACKEND_NAMES, PAIRED_PROVIDERS, PEER_NAMES, PROVIDERS,
                        select_providers, skip_reason)
from .timing import CONTENTION_CORES, QuietGate, ceiling_key, ceiling_label

# rows also timed alternately with the bare search on the same inputs: encode and eval
# rows of every backend, layer rows of the fused backends (the training step's target;
# the reference layer's ratio would cost a minute of a core run and judge nothing)
PAIRED_SEARCH_OPS = ("encode", "eval")
PAIRED_LAYER_OPS = ("layer", "layer_cf")


@dataclass
class Row:
    """One line of the table."""

    provider: str
    shape: Shape
    op: str
    status: str = "ok"  # ok | skipped | error
    times: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    mem_method: str = ""
    check: str = ""
    check_detail: str = ""
    note: str = ""
    vs_reference: Optional[float] = None
    vs_faiss: Optional[float] = None
    ceiling: Optional[float] = None
    foreign_cores: Optional[float] = None
    paired_frac: Optional[float] = None  # % of ceiling measured side by side (fwd rows)
    mode: str = "fp32"  # precision mode (presets.MODES)
    first_s: Optional[float] = None  # the first (warm-up) call, excluded from the times
    vs_matmul: Optional[float] = None  # same-shape matrix product's time / this row's
    memory_check: bool = False  # the case's peak memory is a target
    # encode / eval / layer rows: time over the bare search's, timed alternately in one
    # process
    paired_vs_search: Optional[float] = None
    peak: Optional[float] = None  # the run's FMA peak (GFLOP/s) this row is compared with
    paired_peak: Optional[float] = None  # % of that peak measured side by side (fwd rows)

    @property
    def op_label(self) -> str:
        return op_label(self.op, self.mode)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def quartiles(self):
        if len(self.times) < 2:
            return (self.median, self.median)
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def gflops(self) -> Optional[float]:
        m = self.median
        return self.shape.search_flops / m / 1e9 if m else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        m = self.median
        return self.shape.n / m if m else None

    @property
    def frac_ceiling(self) -> Optional[float]:
        """Paired measurement where there is one (see paired_ceiling_fraction), else
        this row's GFLOP/s over the run's ceiling for its d."""
        if self.paired_frac is not None:
            return self.paired_frac
        g = self.gflops
        return g / self.ceiling if g and self.ceiling else None

    @property
    def frac_peak(self) -> Optional[float]:
        """Fraction of the machine's FMA peak: measured side by side where there is one
        (see timing.paired_peak_fraction), else this row's GFLOP/s (the search's flops,
        2*N*K*d, for every op) over the run's peak."""
        if self.paired_peak is not None:
            return self.paired_peak
        g = self.gflops
        return g / self.peak if g and self.peak else None


@dataclass
class BenchResult:
    preset: Preset
    device: str
    rows: list
    ceilings: dict  # timing.ceiling_key -> GFLOP/s (d on CPU, precision mode on CUDA)
    machine: dict
    notes: list
    fused: tuple  # the fused backends whose targets are evaluated
    sweep: Optional[object] = None  # gpu.SweepResult of a preset with an accuracy sweep
    # CPU: the machine's fp32 FMA peak per ISA (GFLOP/s, all threads; simvq_kernels.peak),
    # the better of the start and end of the run, and the ISA whose peak the rows' "% peak"
    # is against (the best one, or the best the CPU kernel is limited to)
    peaks: dict = field(default_factory=dict)
    peak_isa: Optional[str] = None
    peak_cap: Optional[str] = None  # the kernel's ISA when set by SIMVQ_CPU_ISA, else None
    peak_threads: Optional[int] = None  # the threads the peak was measured on

    @property
    def peak(self) -> Optional[float]:
        """GFLOP/s of the peak the rows are compared with (see ``peak_isa``)."""
        return self.peaks.get(self.peak_isa) if self.peak_isa else None

    @property
    def machine_peak_isa(self) -> Optional[str]:
        """The ISA with the machine's highest FMA peak (no limit applied)."""
        return peak.best(self.peaks)

    def __post_init__(self):
        if isinstance(self.fused, str):
            self.fused = (self.fused,)

    @property
    def fused_label(self) -> str:
        return ", ".join(self.fused)


class _NoProgress:
    """Stands in for tqdm when it is not installed."""

    def __init__(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def run_benchmark(preset: Preset, *, backends=None, peers=None, device=None, repeat=None,
                  check_rows: int = 1024, case_budget: float = 60.0, min_time: float = 1.0,
                  case_timeout: float = 900.0, quiet_wait: float = 60.0,
                  quiet_wait_total: float = 600.0,
                  contention_retries: int = 2, threads: Optional[int] = None, seed: int = 0,
                  progress: bool = True, peer_blas: str = "auto",
                  deadline: Optional[float] = None) -> BenchResult:
    """Runs ``preset`` and returns its rows (no printing). ``peer_blas``: the BLAS
    environment of peers that bring their own BLAS ('auto', 'detect', 'inherit' or an
    OpenBLAS kernel name; see blas.py). ``deadline``: seconds after which no new row
    starts (the rest are reported as skipped), so that a run under an outer time limit
    still returns its results."""
    import simvq_kernels as sk

    t_start = time.perf_counter()

    def time_left() -> Optional[float]:
        return None if deadline is None else deadline - (time.perf_counter() - t_start)

    def timeout() -> float:
        left = time_left()
        return case_timeout if left is None else max(1.0, min(case_timeout, left))

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional (pip install tqdm)
        tqdm = _NoProgress

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if repeat is None:
        repeat = 25 if device.type == "cuda" else 7
    backends = list(BACKEND_NAMES) if backends is None else backends
    if peers is None:  # every peer that serves this device (named ones are reported)
        peers = [p for p in PEER_NAMES if device.type in PROVIDERS[p].devices]
    providers, notes = select_providers(backends, peers, device)
    fused = tuple(b for b in FUSED_BACKENDS if b in providers and
                  (device.type == "cpu") == (b == "cpu")) or \
        (("cpu",) if device.type == "cpu" else ("cuda",))
    total_mem = total_memory_bytes(device)
    base = {"device": str(device), "threads": threads, "seed": seed,
            "check_rows": check_rows, "repeat": repeat, "case_budget": case_budget,
            "min_time": min_time}

    load_start = os.getloadavg()
    plan = []
    for case in preset.cases:
        for p in providers:
            if case.providers is not None and p not in case.providers:
                continue
            plan.append((p, case))
    keys = sorted({(ceiling_key(device, c.shape.d, c.mode), c.shape.d, c.mode)
                   for c in preset.cases}, key=lambda x: str(x[0]))
    keys = list({k: (k, d, m) for k, d, m in keys}.values())
    sweep_steps = preset.sweep.steps(providers, device) if preset.sweep is not None else 0
    measure_peak = device.type == "cpu"
    bar = tqdm(total=len(plan) + 2 * len(keys) + 2 * measure_peak + sweep_steps,
               desc=f"bench {preset.name}",
               unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    gate = QuietGate(quiet_wait, quiet_wait_total)

    def measure_ceilings(when):
        got = {}
        for key, d, mode in keys:
            label = ceiling_label(key)
            bar.set_postfix_str(f"ceiling {label} ({when})")
            if (time_left() or 1.0) <= 0 and when == "end":
                notes.append(f"ceiling {label} ({when}): not measured (--deadline reached)")
                bar.update(1)
                continue
            out = run_measured(dict(base, op="ceiling", d=d, mode=mode), timeout(), gate,
                               contention_retries)
            if out["status"] == "ok":
                got[key] = out["gflops"]
                if (out.get("foreign_cores") or 0.0) > CONTENTION_CORES:
                    notes.append(f"ceiling {label} ({when}): contended: other processes used "
                                 f"{out['foreign_cores']:.2f} cores while timing")
            else:
                notes.append(f"ceiling {label} ({when}): "
                             f"{out.get('error') or out.get('reason')}")
            bar.update(1)
        return got

    peak_threads = []

    def measure_peaks(when):
        """The FMA peak per ISA, in a child process like the ceilings."""
        if not measure_peak:
            return {}
        bar.set_postfix_str(f"FMA peak ({when})")
        bar.update(1)
        if (time_left() or 1.0) <= 0 and when == "end":
            notes.append(f"FMA peak ({when}): not measured (--deadline reached)")
            return {}
        out = run_measured(dict(base, op="peak"), timeout(), gate, contention_retries)
        if out["status"] != "ok":
            notes.append(f"FMA peak ({when}): not measured: "
                         f"{out.get('error') or out.get('reason')}")
            return {}
        if (out.get("foreign_cores") or 0.0) > CONTENTION_CORES:
            notes.append(f"FMA peak ({when}): contended: other processes used "
                         f"{out['foreign_cores']:.2f} cores while timing")
        peak_threads.append(out["threads"])
        return out["peaks"]

    peer_envs, peer_blas_seen = {}, {}
    for p in dict.fromkeys(p for p, _ in plan):
        if not PROVIDERS[p].blas:
            continue
        probe = None
        if peer_blas == "auto":
            out = run_in_child(dict(base, provider=p, op="blas-probe",
                                    peer_env=peer_env("detect")[0]), case_timeout)
            probe = out.get("blas") if out["status"] == "ok" else None
        peer_envs[p], why = peer_env(peer_blas, probe)
        notes.append(f"peer {p}: {why}")

    sweep = None
    if preset.sweep is not None:
        sweep = preset.sweep.run(providers, device, case_timeout=timeout(), seed=seed,
                                 bar=bar)
    ceil_start = measure_ceilings("start")
    peak_start = measure_peaks("start")
    peak_cap = peak.kernel_isa_cap() if measure_peak else None
    pair_isa = peak.best(peak_start, peak_cap)  # the ISA fwd rows are paired with
    rows = []
    for p, case in plan:
        s = case.shape
        bar.set_postfix_str(f"{p} {op_label(case.op, case.mode)} {s.label}")
        row = Row(p, s, case.op, note=case.note, mode=case.mode,
                  memory_check=case.memory_check)
        why = skip_reason(p, case, device, total_mem)
        if why == "n/a":
            bar.update(1)
            continue
        if why is None and (time_left() or 1.0) <= 0:
            why = "skipped: --deadline reached"
        if why:
            row.status, row.check = "skipped", why
        else:
            spec = dict(base, provider=p, op=case.op, mode=case.mode,
                        u=mode_roundoff(case.mode),
                        shape={"n": s.n, "k": s.k, "d": s.d, "r": s.r},
                        paired_ceiling=(case.op == "fwd" and p in PAIRED_PROVIDERS
                                        and device.type == "cpu"),
                        paired_peak=(pair_isa if case.op == "fwd" and p in PAIRED_PROVIDERS
                                     and device.type == "cpu" else None),
                        paired_search=(case.op in PAIRED_SEARCH_OPS
                                       and PROVIDERS[p].kind == "backend"
                                       or case.op in PAIRED_LAYER_OPS
                                       and p in FUSED_BACKENDS),
                        peer_env=peer_envs.get(p))
            out = run_measured(spec, timeout(), gate, contention_retries)
            if out.get("blas") is not None:
                peer_blas_seen.setdefault(p, set()).add(describe(out["blas"]))
            if out["status"] == "ok":
                row.times = out["times"]
                row.first_s = out.get("first_s")
                row.peak_bytes = out["peak_bytes"]
                row.mem_method = out["mem_method"]
                row.check, row.check_detail = out["check"], out["check_detail"]
                row.note = "; ".join(x for x in (row.note, out["note"]) if x)
                row.foreign_cores = out.get("foreign_cores")
                row.paired_frac = out.get("paired_frac")
                row.paired_vs_search = out.get("vs_search")
                row.paired_peak = out.get("paired_peak")
                if out.get("attempts", 1) > 1:
                    row.note = "; ".join(x for x in (row.note, f"quietest of {out['attempts']} "
                                                     "runs (others used the CPUs)") if x)
            elif out["status"] == "skipped":
                row.status, row.check = "skipped", "skipped: " + out["reason"]
            else:
                row.status, row.check = "error", "ERROR"
                row.check_detail = out["error"]
                if out.get("traceback"):
                    print(f"[bench] {p} {row.op_label} {s.label} failed:\n"
                          f"{out['traceback']}", file=sys.stderr)
        rows.append(row)
        bar.update(1)
    ceil_end = measure_ceilings("end")
    peak_end = measure_peaks("end")
    bar.close()
    # The ceiling is a limit: the better of the two measurements (start and end of the run)
    ceilings = {k: max(x for x in (ceil_start.get(k), ceil_end.get(k)) if x is not None)
                for k, _, _ in keys if k in ceil_start or k in ceil_end}
    for k, _, _ in keys:
        if k in ceil_start and k in ceil_end:
            notes.append(f"ceiling {ceiling_label(k)}: {ceil_start[k]:.1f} GFLOP/s at the "
                         f"start, {ceil_end[k]:.1f} at the end; the higher is used")
    for r in rows:
        r.ceiling = ceilings.get(ceiling_key(device, r.shape.d, r.mode))
    # The peak is a limit too: per ISA, the better of the start and end of the run
    peaks = {isa: max(x for x in (peak_start.get(isa), peak_end.get(isa)) if x is not None)
             for isa in dict.fromkeys(list(peak_start) + list(peak_end))}
    for isa in peaks:
        if isa in peak_start and isa in peak_end:
            notes.append(f"FMA peak {isa}: {peak_start[isa]:.1f} GFLOP/s at the start, "
                         f"{peak_end[isa]:.1f} at the end; the higher is used")
    peak_isa = peak.best(peaks, peak_cap)
    if pair_isa is not None and peak_isa != pair_isa:
        notes.append(f"FMA peak: {pair_isa} was the best at the start (the side-by-side "
                     f"% peak is against it), {peak_isa} over the whole run")
    for r in rows:
        if device.type == "cpu" and peak_isa is not None:
            r.peak = peaks[peak_isa]
    if gate.waited >= 1:
        notes.append(f"waited {gate.waited:.0f} s in all for other processes to leave the CPUs")
    _fill_ratios(rows)
    for p, seen in peer_blas_seen.items():
        notes.append(f"peer {p} ran its BLAS as: {' | '.join(sorted(seen))}")
    ext = sk.backend_status()
    if ext.get("cpu"):
        notes.append(f"backend cpu: {ext['cpu']}")
    machine = machine_info(device)
    machine["load average 1/5/15 min (start, end)"] = (
        " / ".join(f"{x:.2f}" for x in load_start) + ", "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return BenchResult(preset, str(device), rows, ceilings, machine, notes, fused, sweep,
                       peaks=peaks, peak_isa=peak_isa, peak_cap=peak_cap,
                       peak_threads=peak_threads[0] if peak_threads else None)


def _fill_ratios(rows):
    """Speed-up vs the reference, vs faiss and vs the same-shape matrix product, on the
    same shape, op and precision mode."""
    by = {(r.provider, r.shape, r.op, r.mode): r for r in rows}
    for r in rows:
        if r.median is None:
            continue
        for attr, other in (("vs_reference", "reference"), ("vs_faiss", "faiss"),
                            ("vs_matmul", "matmul")):
            o = by.get((other, r.shape, r.op, r.mode))
            if o is not None and o.median:
                setattr(r, attr, o.median / r.median)
