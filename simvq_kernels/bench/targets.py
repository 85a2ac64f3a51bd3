"""Targets: what the fused backend is expected to reach, as (target, measured, verdict)
lines, each named by what it is (ratios measured side by side in the same run)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .presets import MEMORY_SHAPE, MEMORY_TARGET_MIB, OPS

if TYPE_CHECKING:
    from .run import BenchResult


def evaluate_targets(result: BenchResult) -> list:
    """The fused backend's targets: (target, measured, 'met' | 'MISSED'). Each names what it
    is: >= 4x the reference formula where d <= 64 (2x above), never slower than faiss,
    >= 75% of the matrix-product ceiling on the timing shapes, the layer step >= 2x the
    reference layer, < 256 MiB above the inputs at 262k codes, and every row correct."""
    f = result.fused
    out = []
    fwd = [r for r in result.rows if r.provider == f and r.op == "fwd" and r.median]
    for r in fwd:
        if r.vs_reference is not None:
            want = 4.0 if r.shape.d <= 64 else 2.0
            out.append((f"fused fwd >= {want:g}x reference at {r.shape.label}",
                        f"{r.vs_reference:.2f}x", "met" if r.vs_reference >= want else "MISSED"))
    for r in fwd:
        if r.vs_faiss is not None:
            out.append((f"fused fwd >= 1.0x faiss at {r.shape.label}", f"{r.vs_faiss:.2f}x",
                        "met" if r.vs_faiss >= 1.0 else "MISSED"))
    for r in fwd:  # the ceiling target is for the timing shapes, not the memory shape
        if r.frac_ceiling is not None and r.shape != MEMORY_SHAPE:
            how = ("paired" if r.paired_frac is not None
                   else f"of {r.ceiling:.0f} GFLOP/s")
            out.append((f"fused fwd >= 75% of the ceiling at {r.shape.label}",
                        f"{100 * r.frac_ceiling:.1f}% ({how})",
                        "met" if r.frac_ceiling >= 0.75 else "MISSED"))
    for r in result.rows:
        if r.provider == f and r.op == "layer" and r.vs_reference is not None:
            out.append((f"layer fwd+bwd >= 2x reference layer at {r.shape.label}",
                        f"{r.vs_reference:.2f}x", "met" if r.vs_reference >= 2 else "MISSED"))
    for r in fwd:
        if r.shape == MEMORY_SHAPE and r.peak_bytes is not None:
            mib = r.peak_bytes / 2**20
            out.append((f"fused fwd peak memory < {MEMORY_TARGET_MIB} MiB above inputs at "
                        f"{r.shape.label}", f"{mib:.1f} MiB",
                        "met" if mib < MEMORY_TARGET_MIB else "MISSED"))
    for r in result.rows:
        if r.check == "FAIL" or r.status == "error":
            out.append((f"{r.provider} {OPS[r.op]} {r.shape.label} correct", r.check,
                        "MISSED"))
    return out


