"""The driver: runs a preset's cases over the chosen providers (each row in a child
process, see child.py), measures the ceilings, and returns a :class:`BenchResult`."""
from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from .blas import describe, peer_env
from .checks import unit_roundoff
from .child import run_in_child, run_measured
from .machine import machine_info
from .memory import total_memory_bytes
from .presets import OPS, Preset, Shape
from .providers import (BACKEND_NAMES, PAIRED_PROVIDERS, PEER_NAMES, PROVIDERS,
                        select_providers, skip_reason)
from .timing import CONTENTION_CORES, QuietGate


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


@dataclass
class BenchResult:
    preset: Preset
    device: str
    rows: list
    ceilings: dict  # d -> GFLOP/s
    machine: dict
    notes: list
    fused: str


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
                  progress: bool = True, peer_blas: str = "auto") -> BenchResult:
    """Runs ``preset`` and returns its rows (no printing). ``peer_blas``: the BLAS
    environment of peers that bring their own BLAS ('auto', 'detect', 'inherit' or an
    OpenBLAS kernel name; see blas.py)."""
    import simvq_kernels as sk

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
    peers = list(PEER_NAMES) if peers is None else peers
    providers, notes = select_providers(backends, peers, device)
    fused = "cuda" if device.type == "cuda" else "cpu"
    total_mem = total_memory_bytes(device)
    u = unit_roundoff(device)
    base = {"device": str(device), "threads": threads, "seed": seed, "u": u,
            "check_rows": check_rows, "repeat": repeat, "case_budget": case_budget,
            "min_time": min_time}

    load_start = os.getloadavg()
    plan = []
    for case in preset.cases:
        for p in providers:
            if case.providers is not None and p not in case.providers:
                continue
            plan.append((p, case))
    ds = sorted({c.shape.d for c in preset.cases})
    bar = tqdm(total=len(plan) + 2 * len(ds), desc=f"bench {preset.name}", unit="case",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    gate = QuietGate(quiet_wait, quiet_wait_total)

    def measure_ceilings(when):
        got = {}
        for d in ds:
            bar.set_postfix_str(f"ceiling d={d} ({when})")
            out = run_measured(dict(base, op="ceiling", d=d), case_timeout, gate,
                               contention_retries)
            if out["status"] == "ok":
                got[d] = out["gflops"]
                if (out.get("foreign_cores") or 0.0) > CONTENTION_CORES:
                    notes.append(f"ceiling d={d} ({when}): contended: other processes used "
                                 f"{out['foreign_cores']:.2f} cores while timing")
            else:
                notes.append(f"ceiling d={d} ({when}): {out.get('error') or out.get('reason')}")
            bar.update(1)
        return got

    peer_envs, peer_blas_seen = {}, {}
    for p in providers:
        if not PROVIDERS[p].blas:
            continue
        probe = None
        if peer_blas == "auto":
            out = run_in_child(dict(base, provider=p, op="blas-probe",
                                    peer_env=peer_env("detect")[0]), case_timeout)
            probe = out.get("blas") if out["status"] == "ok" else None
        peer_envs[p], why = peer_env(peer_blas, probe)
        notes.append(f"peer {p}: {why}")

    ceil_start = measure_ceilings("start")
    rows = []
    for p, case in plan:
        s = case.shape
        bar.set_postfix_str(f"{p} {OPS[case.op]} {s.label}")
        row = Row(p, s, case.op, note=case.note)
        why = skip_reason(p, case, device, total_mem)
        if why == "n/a":
            bar.update(1)
            continue
        if why:
            row.status, row.check = "skipped", why
        else:
            spec = dict(base, provider=p, op=case.op,
                        shape={"n": s.n, "k": s.k, "d": s.d, "r": s.r},
                        paired_ceiling=case.op == "fwd" and p in PAIRED_PROVIDERS,
                        peer_env=peer_envs.get(p))
            out = run_measured(spec, case_timeout, gate, contention_retries)
            if out.get("blas") is not None:
                peer_blas_seen.setdefault(p, set()).add(describe(out["blas"]))
            if out["status"] == "ok":
                row.times = out["times"]
                row.peak_bytes = out["peak_bytes"]
                row.mem_method = out["mem_method"]
                row.check, row.check_detail = out["check"], out["check_detail"]
                row.note = "; ".join(x for x in (row.note, out["note"]) if x)
                row.foreign_cores = out.get("foreign_cores")
                row.paired_frac = out.get("paired_frac")
                if out.get("attempts", 1) > 1:
                    row.note = "; ".join(x for x in (row.note, f"quietest of {out['attempts']} "
                                                     "runs (others used the CPUs)") if x)
            elif out["status"] == "skipped":
                row.status, row.check = "skipped", "skipped: " + out["reason"]
            else:
                row.status, row.check = "error", "ERROR"
                row.check_detail = out["error"]
                if out.get("traceback"):
                    print(f"[bench] {p} {OPS[case.op]} {s.label} failed:\n{out['traceback']}",
                          file=sys.stderr)
        rows.append(row)
        bar.update(1)
    ceil_end = measure_ceilings("end")
    bar.close()
    # The ceiling is a limit: the better of the two measurements (start and end of the run)
    ceilings = {d: max(x for x in (ceil_start.get(d), ceil_end.get(d)) if x is not None)
                for d in ds if d in ceil_start or d in ceil_end}
    for d in ds:
        if d in ceil_start and d in ceil_end:
            notes.append(f"ceiling d={d}: {ceil_start[d]:.1f} GFLOP/s at the start, "
                         f"{ceil_end[d]:.1f} at the end; the higher is used")
    for r in rows:
        r.ceiling = ceilings.get(r.shape.d)
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
    return BenchResult(preset, str(device), rows, ceilings, machine, notes, fused)


def _fill_ratios(rows):
    """Speed-up vs the reference and vs faiss on the same shape and op."""
    by = {(r.provider, r.shape, r.op): r for r in rows}
    for r in rows:
        if r.median is None:
            continue
        ref = by.get(("reference", r.shape, r.op))
        if ref is not None and ref.median:
            r.vs_reference = ref.median / r.median
        fa = by.get(("faiss", r.shape, r.op))
        if fa is not None and fa.median:
            r.vs_faiss = fa.median / r.median
