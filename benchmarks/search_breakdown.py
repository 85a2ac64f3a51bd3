#!/usr/bin/env python
"""Where the CPU search's time goes, per shape: the gap to the machine's FMA peak split
into the input check, the per-token work and the scan itself.

For each N x K x d (float32, ``nearest_code`` on the ``cpu`` backend) it times, best of
``--repeat`` calls each, interleaved with the FMA peak of the ISA in use (so a drift of
the machine's speed hits every part alike):

- ``full``: the call as users make it (finite check on);
- ``no check``: ``check_finite=False`` (full - no check = the NaN/inf check, a pass over
  z and the codebook);
- ``one panel``: the same N and d against the codes of one register panel (14 codes on
  AVX-512, 6 on AVX2): the per-token work that does not grow with K (packing the tokens,
  ||z||^2, the outputs, the call) plus one panel;
- the scan: no check - one panel, over the other K - panel codes: its GFLOP/s and % of
  the peak (the register-blocked loop, its epilogue, the code stream, threads).

The table gives each part as a share of the full call and the % of peak the full call
would reach without it. ``--threads 1`` takes thread imbalance out of the picture.

    python benchmarks/search_breakdown.py --markdown out.md
    SIMVQ_CPU_ISA=avx2 python benchmarks/search_breakdown.py --threads 1
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch

import simvq_kernels as sk
from simvq_kernels import _ext
from simvq_kernels import peak as fma
from simvq_kernels.experiments.train import environment

SHAPES = "16384x1024x64,16384x8192x64,8192x65536x32,4096x16384x256"
PANEL = {"avx512": 14, "avx2": 6}


def best(f, n):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="NxKxd,...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--repeat", type=int, default=7, help="calls per timing (best of)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (best of)")
    p.add_argument("--markdown", default=None, help="write the table here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _ext.load()
    cfg = json.loads(torch.ops.simvq.cpu_kernel_config())
    isa = cfg["isa"]
    if isa not in PANEL:
        raise SystemExit(f"the register-blocked search needs AVX2 or AVX-512; this build "
                         f"runs {isa!r}")
    panel = PANEL[isa]
    threads = torch.get_num_threads()

    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k, d = (int(v) for v in shape.lower().split("x"))
        z = torch.randn(n, d, generator=gen)
        q = torch.randn(k, d, generator=gen)
        q1 = q[:panel].clone()
        t = {"full": [], "nocheck": [], "panel": [], "peak": []}
        for _ in range(args.rounds):
            t["peak"].append(fma.gflops(isa))
            t["full"].append(best(lambda: sk.nearest_code(z, q, backend="cpu"), args.repeat))
            t["nocheck"].append(best(lambda: sk.nearest_code(
                z, q, backend="cpu", check_finite=False), args.repeat))
            t["panel"].append(best(lambda: sk.nearest_code(
                z, q1, backend="cpu", check_finite=False), args.repeat))
        pk = max(t["peak"])
        full, nocheck, one = min(t["full"]), min(t["nocheck"]), min(t["panel"])
        flops = 2.0 * n * k * d
        scan_t = max(nocheck - one, 1e-12)
        scan_gf = 2.0 * n * (k - panel) * d / scan_t / 1e9
        rows.append({
            "shape": f"{n} × {k} × {d}", "peak": pk, "full_ms": 1e3 * full,
            "full_pct": 100 * flops / full / 1e9 / pk,
            "check_share": 100 * (full - nocheck) / full,
            "token_share": 100 * one / full,
            "token_ns": 1e9 * one / n,
            "scan_pct": 100 * scan_gf / pk,
            "no_check_pct": 100 * flops / nocheck / 1e9 / pk})
    head = (f"ISA {isa} ({cfg.get('isa_from', '?')}), {threads} thread(s), best of "
            f"{args.rounds} rounds x {args.repeat} calls; FMA peak measured between the "
            f"timings; one panel = {panel} codes.")
    env = environment()
    command = " ".join([f"{k}={os.environ[k]}" for k in ("SIMVQ_CPU_ISA", "SIMVQ_CPU_L2")
                        if os.environ.get(k)] + ["python benchmarks/search_breakdown.py"]
                       + list(sys.argv[1:] if argv is None else argv))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    md = ["# Where the CPU search's time goes", "",
          f"- **cpu**: {env['cpu_model']} ({env['cpu_count']} cores); L1d / L2 / L3: "
          f"{cfg['l1d_bytes'] >> 10} / {cfg['l2_bytes'] >> 10} / {cfg['l3_bytes'] >> 10} KiB "
          f"({cfg['caches_from']})",
          f"- **date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"**git commit**: {env['git_commit']}; torch {env['torch']}",
          f"- **load average at the end (1/5/15 min)**: {load}",
          f"- **command**: `{command}`", "",
          head, "",
          "| N × K × d | full ms | full % peak | NaN/inf check (% of full) | per-token work "
          "(% of full) | per-token ns | scan % peak | % peak without the check |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['full_ms']:.2f} | {r['full_pct']:.1f}% | "
                  f"{r['check_share']:.1f}% | {r['token_share']:.1f}% | {r['token_ns']:.0f} | "
                  f"{r['scan_pct']:.1f}% | {r['no_check_pct']:.1f}% |")
    md.append("")
    peaks = ", ".join(f"{r['peak']:.0f}" for r in rows)
    md.append(f"FMA peak: {peaks} GFLOP/s (per shape).")
    text = "\n".join(md)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
