"""Process isolation: each (provider, shape, op) row runs in its own child process, so
that its peak memory is measured from a fresh process and a crash or a runaway peer
costs one row, not the run."""
from __future__ import annotations

import importlib
import multiprocessing
import os
import statistics
import time
import traceback

import torch

from .blas import apply_env, blas_libraries
from .checks import check_output
from .inputs import make_inputs
from .memory import PeakMemory
from .presets import MODES, Shape
from .providers import PROVIDERS, NotAvailable, build_runner
from .timing import (CONTENTION_CORES, MAX_RUNS, ForeignCPU, QuietGate, _sync,
                     ceiling_gflops, paired_ceiling_fraction, paired_peak_fraction,
                     paired_ratio, time_runs)


def _run_case_in_child(spec: dict) -> dict:
    """Body of one child process: inputs, pre-warm, measured warm-up, check, timings."""
    os.dup2(2, 1)  # peers' chatter goes to stderr; the parent's stdout stays the table
    # a peer's BLAS reads its environment when it loads, i.e. below (see blas.py)
    apply_env(spec.get("peer_env"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    mode = spec.get("mode", "fp32")
    torch.set_float32_matmul_precision(MODES[mode][1])
    if spec["op"] == "ceiling":
        with ForeignCPU() as foreign:
            gflops = ceiling_gflops(spec["d"], device, mode)
        return {"status": "ok", "gflops": gflops, "foreign_cores": foreign.cores}
    if spec["op"] == "peak":  # the machine's FMA peak per ISA (simvq_kernels.peak)
        from .. import peak

        why = peak.unavailable()
        if why is not None:
            return {"status": "skipped", "reason": why}
        with ForeignCPU() as foreign:
            peaks = peak.measure()
        return {"status": "ok", "peaks": peaks, "threads": torch.get_num_threads(),
                "foreign_cores": foreign.cores}
    if spec["op"] == "sweep":  # the GPU acceptance's accuracy sweep of one backend
        from .gpu import sweep_in_child

        return sweep_in_child(spec)
    provider, op = spec["provider"], spec["op"]
    blas_of = PROVIDERS[provider].module if PROVIDERS[provider].blas else None
    if op == "blas-probe":  # which kernel the peer's BLAS picks in this environment
        importlib.import_module(blas_of)
        return {"status": "ok", "blas": blas_libraries(blas_of)}
    shape = Shape(**spec["shape"])
    inp = make_inputs(shape, device, spec["seed"], mode)
    tiny_shape = Shape(min(shape.n, 64), min(shape.k, 64), shape.d, shape.r)
    try:
        tiny = build_runner(provider, op, make_inputs(tiny_shape, device, spec["seed"] + 1,
                                                      mode))
    except NotAvailable as e:
        return {"status": "skipped", "reason": f"not available: {e}"}
    tiny.run()  # code pages, thread pools, JIT caches: not part of the op's memory
    _sync(device)
    del tiny
    runner = build_runner(provider, op, inp)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        result = runner.run()
        _sync(device)
        first = time.perf_counter() - t0
    check = check_output(op, inp, runner.output(result), u=spec["u"],
                         check_rows=spec["check_rows"], seed=spec["seed"])
    del result
    n = spec["repeat"]
    note = ""
    if first * n > spec["case_budget"]:
        n = max(1, int(spec["case_budget"] // max(first, 1e-9)))
        note = (f"{n} timed run(s), not {spec['repeat']}: one run took {first:.1f} s "
                f"(--case-budget {spec['case_budget']:g} s)")
    with ForeignCPU() as foreign:
        times = time_runs(runner.run, n, device)
        # fast ops: keep going until --min-time has been timed (a steadier median)
        while sum(times) < spec["min_time"] and len(times) < MAX_RUNS:
            times += time_runs(runner.run, n, device)
    if foreign.cores is not None and foreign.cores > CONTENTION_CORES:
        note = "; ".join(x for x in (note, f"contended: other processes used "
                                     f"{foreign.cores:.2f} cores while timing") if x)
    paired = None
    if spec.get("paired_ceiling"):
        paired = paired_ceiling_fraction(runner.run, shape, device, statistics.median(times),
                                         budget=spec["case_budget"] / 4)
    paired_peak = None
    if spec.get("paired_peak"):  # the same, against the machine's FMA peak in that ISA
        paired_peak = paired_peak_fraction(runner.run, shape, device,
                                           statistics.median(times),
                                           budget=spec["case_budget"] / 4,
                                           isa=spec["paired_peak"])
    vs_search = None
    if spec.get("paired_search"):  # serving and layer rows: time / the bare search's
        search = build_runner(provider, "fwd", inp)
        vs_search = paired_ratio(runner.run, search.run, device,
                                 budget=spec["case_budget"] / 4)
    return {"status": "ok", "times": times, "first_s": first, "peak_bytes": mem.peak,
            "vs_search": vs_search,
            "mem_method": mem.method, "check": check.label, "check_detail": check.detail,
            "note": note, "foreign_cores": foreign.cores, "paired_frac": paired,
            "paired_peak": paired_peak,
            "blas": blas_libraries(blas_of) if blas_of else None}


def _child_entry(spec: dict, conn) -> None:
    try:
        out = _run_case_in_child(spec)
    except Exception as e:  # reported to the parent as this row's result
        out = {"status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)}
    conn.send(out)
    conn.close()


_MP_CONTEXT = None


def _mp_context():
    """A forkserver that has imported torch: children start in milliseconds, with fresh
    resource usage and no thread pools inherited from the parent."""
    global _MP_CONTEXT
    if _MP_CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "simvq_kernels"])
        else:
            ctx = multiprocessing.get_context("spawn")
        _MP_CONTEXT = ctx
    return _MP_CONTEXT


def run_in_child(spec: dict, timeout: float) -> dict:
    """Runs one case in a fresh child process; kills it after ``timeout`` seconds."""
    ctx = _mp_context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_entry, args=(spec, child_conn), daemon=True)
    p.start()
    child_conn.close()
    out = None
    try:
        if parent_conn.poll(timeout):
            out = parent_conn.recv()
    except EOFError:
        out = None
    finally:
        parent_conn.close()
    if out is None:
        if p.is_alive():
            p.kill()
            p.join()
            return {"status": "skipped", "reason": f"killed after --case-timeout {timeout:g} s"}
        p.join()
        code = p.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "error", "error": f"child process died ({why}; out of memory?)"}
    p.join()
    return out


def run_measured(spec: dict, timeout: float, gate: QuietGate, retries: int) -> dict:
    """``run_in_child`` after waiting for a quiet machine; a run that was contended
    anyway is retried up to ``retries`` times and the least contended result is kept."""
    best = None
    for attempt in range(retries + 1):
        gate.wait()
        out = run_in_child(spec, timeout)
        out["attempts"] = attempt + 1
        if out["status"] != "ok":
            return out
        foreign = out.get("foreign_cores") or 0.0
        if best is None or foreign < (best.get("foreign_cores") or 0.0):
            best = out
        if foreign <= CONTENTION_CORES:
            break
    return best
