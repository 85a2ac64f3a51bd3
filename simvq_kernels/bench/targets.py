"""Targets: what the fused backend is expected to reach, as (target, measured, verdict)
lines, each named by what it is (ratios measured side by side in the same run)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .presets import MEMORY_TARGET_MIB, TRAINING_SHAPES

if TYPE_CHECKING:
    from .run import BenchResult

# CPU: the fused forward's fraction of the machine's physical fp32 FMA peak (side by
# side), by d: >= 85% at d >= 64, >= 75% at 32 <= d < 64 (below d = 32: reported, no target)
CPU_PEAK_TARGETS = ((64, 0.85), (32, 0.75))
# CPU: the fused forward's speed-up over faiss-cpu: >= 1.2x at d <= 64, >= 1.0x above
FAISS_TARGETS = ((64, 1.2), (None, 1.0))
# the training step: layer fwd+bwd (channel-last and channel-first) over the bare forward
# search on the same inputs, timed alternately, at TRAINING_SHAPES in float32
LAYER_SEARCH_TARGET = 1.2
GPU_CEILING_TARGET = 0.60  # of cuBLAS 8192^3 bf16, at d >= 128
ENCODE_TARGET = 1.25  # encode's time over the bare search over a precomputed codebook
GPU_PEERS = ("cdist", "flash-kmeans", "flashlib", "faiss-gpu")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def peak_target(d: int):
    """The CPU fused forward's target fraction of the FMA peak at width d (None: none)."""
    return next((want for d_min, want in CPU_PEAK_TARGETS if d >= d_min), None)


def faiss_target(d: int) -> float:
    """The CPU fused forward's target speed-up over faiss-cpu at width d."""
    return next(want for d_max, want in FAISS_TARGETS if d_max is None or d <= d_max)


def _is_training_shape(shape, mode: str) -> bool:
    return mode == "fp32" and any((shape.n, shape.k, shape.d) == (t.n, t.k, t.d)
                                  for t in TRAINING_SHAPES)


def evaluate_targets(result: BenchResult) -> list:
    """The fused backend's targets: (target, measured, 'met' | 'MISSED' | 'info'). Each
    names what it is. CPU: >= 4x the reference formula where d <= 64 (2x above), >= 1.2x
    faiss-cpu at d <= 64 (never slower above), >= 85% of the machine's physical FMA peak
    at d >= 64 and >= 75% at d = 32 on the timing shapes (measured side by side; the
    matrix-product ceiling is reported as info). GPU: >= 60% of the bf16 tensor-core
    ceiling at d >= 128, never slower than the same-shape cuBLAS product nor the GPU
    peers. Both: the layer step >= 2x the reference layer and (channel-last and
    channel-first, at 16384x1024x64 and 16384x8192x64 in float32) <= 1.2x the bare
    forward search on the same inputs, < 256 MiB above the inputs on the memory case,
    encode <= 1.25x the bare search, the accuracy sweep and every row correct."""
    fused = result.fused
    gpu = result.device.startswith("cuda")
    out = []

    def name(r):  # one fused backend: "fused"; several (GPU): their names
        return "fused" if len(fused) == 1 else r.provider

    fwd = [r for r in result.rows if r.provider in fused and r.op == "fwd" and r.median]
    by = {(r.provider, r.shape, r.op, r.mode): r for r in result.rows if r.median}
    for r in fwd:
        if r.vs_reference is not None:
            want = 4.0 if r.shape.d <= 64 else 2.0
            out.append((f"{name(r)} {r.op_label} >= {want:g}x reference at {r.shape.label}",
                        f"{r.vs_reference:.2f}x", _verdict(r.vs_reference >= want)))
    for r in fwd:
        if r.vs_faiss is not None:
            want = faiss_target(r.shape.d)
            out.append((f"{name(r)} {r.op_label} >= {want:g}x faiss-cpu at {r.shape.label}",
                        f"{r.vs_faiss:.2f}x", _verdict(r.vs_faiss >= want)))
    if gpu:
        for r in fwd:
            for peer in GPU_PEERS:
                o = by.get((peer, r.shape, "fwd", r.mode))
                if o is not None:
                    x = o.median / r.median
                    out.append((f"{name(r)} {r.op_label} >= 1.0x {peer} at {r.shape.label}",
                                f"{x:.2f}x", _verdict(x >= 1.0)))
            if r.vs_matmul is not None:
                out.append((f"{name(r)} {r.op_label} >= 1.0x the same-shape cuBLAS product "
                            f"(which writes N x K) at {r.shape.label}", f"{r.vs_matmul:.2f}x",
                            _verdict(r.vs_matmul >= 1.0)))
    for r in fwd:  # the ceiling target is for the timing shapes, not the memory shape
        if r.frac_ceiling is None or r.memory_check:
            continue
        if gpu:
            if r.mode == "bf16" and r.shape.d >= 128:
                out.append((f"{name(r)} {r.op_label} >= {GPU_CEILING_TARGET:.0%} of the bf16 "
                            f"tensor-core ceiling (cuBLAS 8192^3) at {r.shape.label}",
                            f"{100 * r.frac_ceiling:.1f}%",
                            _verdict(r.frac_ceiling >= GPU_CEILING_TARGET)))
            continue
        how = ("paired" if r.paired_frac is not None else f"of {r.ceiling:.0f} GFLOP/s")
        out.append((f"fused fwd, % of the matmul ceiling (torch.mm of a cache-resident "
                    f"tile; not a target) at {r.shape.label}",
                    f"{100 * r.frac_ceiling:.1f}% ({how})", "info"))
    if not gpu:
        out += _peak_targets(result, fwd, name)
    for r in result.rows:
        if r.provider in fused and r.op in ("layer", "layer_cf") and \
                r.vs_reference is not None:
            out.append((f"{'' if len(fused) == 1 else r.provider + ' '}{r.op_label} >= 2x "
                        f"reference layer at {r.shape.label}", f"{r.vs_reference:.2f}x",
                        _verdict(r.vs_reference >= 2)))
    out += _layer_search_targets(result, by, name)
    for r in fwd:
        if r.memory_check and r.peak_bytes is not None:
            mib = r.peak_bytes / 2**20
            out.append((f"{name(r)} {r.op_label} peak memory < {MEMORY_TARGET_MIB} MiB above "
                        f"inputs at {r.shape.label}", f"{mib:.1f} MiB",
                        _verdict(mib < MEMORY_TARGET_MIB)))
    for r in result.rows:  # serving: encode (cached codebook) vs the bare search
        if r.provider not in fused or r.op not in ("encode", "eval") or not r.median:
            continue
        vs = _vs_search(r, by)
        if vs is None:
            continue
        x, how = vs
        if r.op == "encode":
            out.append((f"{name(r)} encode <= {ENCODE_TARGET:g}x the bare search over a "
                        f"precomputed codebook at {r.shape.label}", f"{x:.2f}x ({how})",
                        _verdict(x <= ENCODE_TARGET)))
            if r.first_s is not None:
                out.append((f"{name(r)} encode's first call (projects and caches the "
                            f"codebook) at {r.shape.label}", f"{r.first_s * 1e3:.1f} ms",
                            "info"))
        else:
            out.append((f"{name(r)} eval-mode forward / the bare search at {r.shape.label}",
                        f"{x:.2f}x ({how})", "info"))
    if result.sweep is not None:
        out += result.sweep.targets()
    for r in result.rows:
        if r.check == "FAIL" or r.status == "error":
            out.append((f"{r.provider} {r.op_label} {r.shape.label} correct", r.check,
                        "MISSED"))
    return out


def _peak_targets(result: BenchResult, fwd, name) -> list:
    """CPU: the fused forward's % of the machine's physical FMA peak on the timing
    shapes (not the memory shape), side by side where measured."""
    out = []
    for r in fwd:
        if r.memory_check or r.frac_peak is None:
            continue
        isa = result.peak_isa or "?"
        how = (f"paired with the {isa} peak" if r.paired_peak is not None else
               f"of the run's {isa} peak, {r.peak:.0f} GFLOP/s")
        want = peak_target(r.shape.d)
        if want is None:
            out.append((f"{name(r)} {r.op_label}, % of the physical FMA peak at "
                        f"{r.shape.label} (no target below d = {CPU_PEAK_TARGETS[-1][0]})",
                        f"{100 * r.frac_peak:.1f}% ({how})", "info"))
            continue
        out.append((f"{name(r)} {r.op_label} >= {want:.0%} of the physical FMA peak at "
                    f"{r.shape.label}", f"{100 * r.frac_peak:.1f}% ({how})",
                    _verdict(r.frac_peak >= want)))
    return out


def _vs_search(r, by: dict):
    """(row's time over the bare forward search on the same inputs, how it was measured),
    or None: paired where the row's process timed both alternately, else the medians of
    the two rows."""
    if r.paired_vs_search is not None:
        return r.paired_vs_search, "paired"
    bare = by.get((r.provider, r.shape, "fwd", r.mode))
    if bare is not None:
        return r.median / bare.median, "medians of two rows"
    return None


def _layer_search_targets(result: BenchResult, by: dict, name) -> list:
    """The training step over the bare forward search on the same inputs: a target at
    the training shapes in float32, info elsewhere."""
    out = []
    for r in result.rows:
        if r.provider not in result.fused or r.op not in ("layer", "layer_cf") or \
                not r.median:
            continue
        vs = _vs_search(r, by)
        if vs is None:
            continue
        x, how = vs
        what = f"{name(r)} {r.op_label}"
        if _is_training_shape(r.shape, r.mode):
            out.append((f"{what} <= {LAYER_SEARCH_TARGET:g}x the forward search alone at "
                        f"{r.shape.label}", f"{x:.2f}x ({how})",
                        _verdict(x <= LAYER_SEARCH_TARGET)))
        else:
            out.append((f"{what} / the forward search alone at {r.shape.label}",
                        f"{x:.2f}x ({how})", "info"))
    return out
