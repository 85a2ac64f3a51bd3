"""The GPU kernels side by side: ``python -m simvq_kernels.bench.gpu_summary gpu.csv``.

Reads the CSV of a GPU preset run (``python -m simvq_kernels.bench --preset gpu --out
DIR``) and prints, per forward shape and precision mode, the TFLOP/s (2·N·K·d per call)
of this library's GPU backends, the same-shape cuBLAS product and the kernel peers
(flash-kmeans, flashlib: gpu_peers.py) as a markdown table. benchmarks/gpu/run.sh
appends it to gpu.md and prints it in its summary.
"""
from __future__ import annotations

import csv
import sys

from .gpu_peers import KERNEL_PEERS, stand_ins_on

_LABELS = {"matmul": "cuBLAS same shape", "flash-kmeans": "flash-kmeans (Triton)",
           "flashlib": "flashlib (Triton)"}


def summary_markdown(csv_path: str) -> str:
    """The forward rows of a GPU preset's CSV side by side: TFLOP/s (2·N·K·d per call)
    of each fused backend, the same-shape cuBLAS product and the kernel peers, per
    shape and precision mode ("-": not run; "skipped"/"error" as the row says)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "fwd"]
    fused = [p for p in ("cuda", "triton", "cpu") if any(r["provider"] == p for r in rows)]
    cols = fused + ["matmul", *KERNEL_PEERS]
    cells, shapes = {}, []
    for r in rows:
        if r["provider"] not in cols:
            continue
        key = (int(r["n"]), int(r["k"]), int(r["d"]), r["mode"])
        if key not in shapes:
            shapes.append(key)
        if r["status"] == "ok" and r["gflops"]:
            t = float(r["gflops"]) / 1e3
            cell = f"{t:.1f}" if t >= 1 else f"{t:.2g}"
            if r["check"] == "FAIL":
                cell += " (wrong picks)"
        else:
            cell = r["status"]
        cells[key + (r["provider"],)] = cell
    md = ["## GPU kernels side by side (TFLOP/s, 2·N·K·d per call)", ""]
    if stand_ins_on():
        md += ["Dry run: the peers are CPU stand-ins with the real call signatures; the "
               "numbers mean nothing.", ""]
    md += ["| N x K x d | mode | " + " | ".join(_LABELS.get(c, c) for c in cols) + " |",
           "|---|---|" + "---:|" * len(cols)]
    for key in shapes:
        n, k, d, mode = key
        md.append(f"| {n}x{k}x{d} | {mode} | "
                  + " | ".join(cells.get(key + (c,), "-") for c in cols) + " |")
    md += ["", "flash-kmeans 0.3.1 and flashlib 0.4.0: their Triton assignment kernels with "
           "their own fixed-rule tile heuristics, norms precomputed (their API takes them), "
           "indices only. flashlib's CuTe DSL kernels are not measured (their libraries "
           "cannot be carried to the GPU machine)."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m simvq_kernels.bench.gpu_summary GPU_CSV", file=sys.stderr)
        return 2
    print(summary_markdown(argv[0]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
