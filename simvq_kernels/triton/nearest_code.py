"""Triton fused nearest-code search (FlashAssign-style): kernel, configurations, launcher.

Each program keeps a BLOCK_N tile of tokens and streams its share of the codebook in
BLOCK_K chunks: acc = z_tile @ q_chunk^T (tl.dot, fp32 accumulation),
v = ||q||^2 - 2 acc, and a running (min, argmin) per token with a strict '<' across
chunks and the lowest index inside a chunk. The N x K matrix never exists. When there
are too few token tiles to fill the GPU, the code range is split over a second grid
axis (split-K): each split writes its partial (min, argmin) and a deterministic merge
takes the first minimum over the splits, which are in code order.

Ties: every (token, code) value is computed by the same instruction sequence wherever
the code sits (same tile shape, same reduction order, ||q||^2 from the same kernel), so
exact duplicate codes give bit-identical values and the strict '<' / lowest-index rules
send ties, duplicates included, to the lowest index, without a duplicate map. (On a
GPU this rests on the tensor cores treating every output element alike, which
tests/test_triton.py's CUDA tests check; under the interpreter, whose tl.dot is
numpy.matmul and may round a column by its position in the tile, plain sums replace
tl.dot.)

Precision: float32 inputs follow ``torch.get_float32_matmul_precision()`` ("highest":
exact fp32 products on CUDA cores, "ieee"; otherwise tf32 tensor-core products of
operands rounded to the nearest tf32 value first);
bf16/fp16 inputs multiply exactly into fp32 on tensor cores. ||q||^2 is always of the
stored fp32 values (the rounding of a tf32 product is a product error, covered by
design.md §3's 4u ||z|| ||Q||). float64 is not served (the registry sends it elsewhere).

Offsets: token rows, code rows and split rows are promoted to int64 before they are
multiplied by a stride (N x d passes 2^31 elements at 16.7M tokens x 128).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (Config, cfg, dot_precision, forced_splits, kernel, launch, next_pow2,
                     num_sms)
from .prologue import row_sqnorm


def _nearest_code_kernel(
    Z, Q, QN, OUT_VAL, OUT_IDX,
    N, K, D, k_per_split,
    stride_zn, stride_zd, stride_qk, stride_qd,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    z_rows = Z + offs_n.to(tl.int64)[:, None] * stride_zn
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)

    if SINGLE_D:  # the whole token tile stays on chip for every code chunk
        zt = tl.load(z_rows + offs_d.to(tl.int64)[None, :] * stride_zd,
                     mask=n_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:
            zt = zt.to(tl.float32)

    best_val = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32) + k_begin
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        q_cols = Q + offs_k.to(tl.int64)[None, :] * stride_qk
        if SINGLE_D:
            q = tl.load(q_cols + offs_d.to(tl.int64)[:, None] * stride_qd,
                        mask=k_mask[None, :] & (offs_d < D)[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            if USE_DOT:
                acc = tl.dot(zt, q, input_precision=INPUT_PRECISION)
            else:  # the interpreter: sequential sums over d, alike for every code
                acc = tl.sum(zt[:, :, None] * q[None, :, :], axis=1)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < D
                z = tl.load(z_rows + dd.to(tl.int64)[None, :] * stride_zd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                q = tl.load(q_cols + dd.to(tl.int64)[:, None] * stride_qd,
                            mask=k_mask[None, :] & d_mask[:, None], other=0.0)
                if UPCAST:  # exact: bf16/fp16 values are fp32 values
                    z = z.to(tl.float32)
                    q = q.to(tl.float32)
                if USE_DOT:
                    acc = tl.dot(z, q, acc, input_precision=INPUT_PRECISION)
                else:
                    acc += tl.sum(z[:, :, None] * q[None, :, :], axis=1)
        qn = tl.load(QN + offs_k, mask=k_mask, other=0.0)
        v = qn[None, :] - 2.0 * acc
        v = tl.where(k_mask[None, :], v, float("inf"))
        m = tl.min(v, axis=1)
        # lowest index among the chunk's minima (k_end is past every valid code)
        j = tl.min(tl.where(v == m[:, None], offs_k[None, :], k_end), axis=1)
        better = m < best_val
        best_val = tl.where(better, m, best_val)
        best_idx = tl.where(better, j, best_idx)

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(OUT_VAL + out, best_val, mask=n_mask)
    tl.store(OUT_IDX + out, best_idx, mask=n_mask)


nearest_code_kernel = kernel(_nearest_code_kernel)

# ------------------------------------------------------------------ tile tables
#
# One fixed table per GPU architecture and product type; a launch takes the first row
# whose bounds hold (d <= max_d, K <= max_k, N <= max_n; None = no bound). Nothing is
# timed at run time (no autotuning), and simvq_kernels/triton/aot.py compiles every row
# for its architecture (``python -m simvq_kernels.info --kernels``: no spills, shared
# memory within the architecture's limit, tensor-core instructions present).
#
# Seeded from flash-kmeans' published per-GPU heuristics (flash-kmeans 0.3.1,
# flash_kmeans/assign_euclid_triton.py, svg-project/flash-kmeans on GitHub), whose
# assignment kernel has this kernel's structure (token tile on chip, code chunks
# streamed, running argmin, fp32 accumulation). The facts taken from it:
#
# H100, fp16/bf16, D <= 512 (its whole-D kernel), BLOCK_N 128, and 64 when N < 65536:
#   D <= 64:  K <= 16384: BLOCK_K 64, 4 warps, 2 stages; 16384 < K <= 65536: BLOCK_K
#             128, 4 warps, 4 stages; K > 65536: BLOCK_K 64, 4 warps, 4 stages.
#   D = 128:  K <= 1024: BLOCK_K 64, 4 warps, 1 stage; 1024 < K <= 65536: BLOCK_K 128,
#             8 warps, 2 stages; K > 65536: BLOCK_K 64, 4 warps, 4 stages.
#   D = 256:  BLOCK_K 64, 1 stage; 8 warps for K <= 1024 and K > 16384, else 4.
#   D >= 512: BLOCK_K 64, 8 warps, 1 stage.
# H100, fp16/bf16, D > 512 (its split-D kernel): BLOCK_N 128, BLOCK_K 128, BLOCK_D 64,
#   8 warps, 4 stages (BLOCK_N 64 and 4 warps when K <= 256).
# H200, fp32 inputs (tl.dot's default tf32 products), whole D, BLOCK_N 128:
#   D <= 64:  K <= 256: BLOCK_K 64, 4 warps, 1 stage; K <= 65536: BLOCK_K 128, 8 warps,
#             2 stages; larger K: BLOCK_K 64, 4 warps, 4 stages.
#   D <= 128: BLOCK_K 64, 1 stage; 4 warps for 256 < K <= 16384, else 8.
#   D <= 256: BLOCK_K 64, 8 warps, 1 stage.  D <= 512: BLOCK_N 64, BLOCK_K 32, 4 warps,
#             1 stage.
# H100, fp32, D > 512: BLOCK_N 64, BLOCK_K 128, BLOCK_D 64, 4 warps, 4 stages below
#   D = 2048 (BLOCK_N 128, BLOCK_K 128, BLOCK_D 32, 8 warps above).
# A100, every dtype, whole D: BLOCK_N 128, BLOCK_K 32, 4 warps, 2 stages; D = 128 with
#   N <= 65536: BLOCK_K 64; D = 256: BLOCK_K 32 and 4 stages when K >= 65536, BLOCK_K 64
#   and 4 stages when 1024 <= K and N <= 262144. D > 512: BLOCK_N 64, BLOCK_K 32,
#   BLOCK_D 32, 4 warps, 2 stages. (fp32 tiles there are shrunk to fit shared memory.)
#
# Where this kernel departs from those rows, and why:
# - d <= 16 and d <= 32 are classes of their own (the token tile is padded to BLOCK_D,
#   and tl.dot needs BLOCK_D >= 16); flash-kmeans published no data below D = 64, so
#   each takes one row: the D <= 64 row of mid-size K.
# - flash-kmeans keeps the whole D on chip up to D = 512 (padded to a power of two);
#   so does this kernel on sm_90. On sm_80 its A100 rows with a whole-d tile of 256 or
#   512 columns exceed the 163 KiB of shared memory per block (196,608 bytes for
#   d = 512 with BLOCK_K 32 and 2 stages, measured by the AOT check), so there
#   d > 128 streams d in 64-column chunks with the A100 rows' BLOCK_N / BLOCK_K /
#   warps / stages.
# - d > 512 takes one row per table: flash-kmeans' split-D rows for D = 2048 and above
#   (fp16/bf16, K <= 16384: BLOCK_N 64, BLOCK_D 128; fp32: BLOCK_N 128, BLOCK_D 32,
#   8 warps) are not taken; its D = 1024 rows are.
# - exact fp32 products ("highest") run on CUDA cores, which flash-kmeans never does:
#   small tiles, unchanged.
# The sm_80 tables serve every compute capability 8.x: each row needs at most 99 KiB of
# shared memory (the most an sm_86 / sm_89 block can have), which the AOT test checks.
# Compute capability 9 and above takes the sm_90 tables.

_N_SMALL = 65535  # flash-kmeans' "N < 65536" rule: BLOCK_N 64 on Hopper


@dataclass(frozen=True)
class TableRow:
    """A row of a tile table: the configuration for d <= max_d, K <= max_k and
    N <= max_n (None = no bound)."""
    max_d: int | None
    max_k: int | None
    max_n: int | None
    config: Config

    def holds(self, n: int, k: int, d: int) -> bool:
        return all(b is None or x <= b for x, b in ((d, self.max_d), (k, self.max_k),
                                                    (n, self.max_n)))

    def bounds(self) -> str:
        """e.g. "d<=128 K<=65536 N<=65535" (the bounds that are set)."""
        parts = [f"{name}<={b}" for name, b in (("d", self.max_d), ("K", self.max_k),
                                                 ("N", self.max_n)) if b is not None]
        return " ".join(parts) or "any"


def _whole(bd, bn, bk, w, s):
    return cfg(num_warps=w, num_stages=s, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, SINGLE_D=True)


def _loop(bd, bn, bk, w, s):
    return cfg(num_warps=w, num_stages=s, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, SINGLE_D=False)


def _n_split(max_d, max_k, make, bk, w, s):
    """Two rows: BLOCK_N 64 for N < 65536, BLOCK_N 128 above (flash-kmeans, Hopper)."""
    return (TableRow(max_d, max_k, _N_SMALL, make(64, bk, w, s)),
            TableRow(max_d, max_k, None, make(128, bk, w, s)))


def _w(bd):
    return lambda bn, bk, w, s: _whole(bd, bn, bk, w, s)


def _l(bd):
    return lambda bn, bk, w, s: _loop(bd, bn, bk, w, s)


# sm_90 (H100, H200), bf16 / fp16 products: flash-kmeans' H100 fp16/bf16 rows.
SM90_TC = (
    *_n_split(16, None, _w(16), 64, 4, 2),
    *_n_split(32, None, _w(32), 64, 4, 2),
    *_n_split(64, 16384, _w(64), 64, 4, 2),
    *_n_split(64, 65536, _w(64), 128, 4, 4),
    *_n_split(64, None, _w(64), 64, 4, 4),
    *_n_split(128, 1024, _w(128), 64, 4, 1),
    *_n_split(128, 65536, _w(128), 128, 8, 2),
    *_n_split(128, None, _w(128), 64, 4, 4),
    *_n_split(256, 1024, _w(256), 64, 8, 1),
    *_n_split(256, 16384, _w(256), 64, 4, 1),
    *_n_split(256, None, _w(256), 64, 8, 1),
    *_n_split(512, None, _w(512), 64, 8, 1),
    TableRow(None, 256, None, _loop(64, 64, 128, 4, 4)),
    TableRow(None, None, None, _loop(64, 128, 128, 8, 4)),
)
# sm_90, tf32 products (fp32 inputs, matmul precision "high"): flash-kmeans' H200 fp32
# rows (it has no H100 fp32 whole-D table), and its H100 fp32 split-D rows.
SM90_TF32 = (
    TableRow(16, None, None, _whole(16, 128, 128, 8, 2)),
    TableRow(32, None, None, _whole(32, 128, 128, 8, 2)),
    TableRow(64, 256, None, _whole(64, 128, 64, 4, 1)),
    TableRow(64, 65536, None, _whole(64, 128, 128, 8, 2)),
    TableRow(64, None, None, _whole(64, 128, 64, 4, 4)),
    TableRow(128, 256, None, _whole(128, 128, 64, 8, 1)),
    TableRow(128, 16384, None, _whole(128, 128, 64, 4, 1)),
    TableRow(128, None, None, _whole(128, 128, 64, 8, 1)),
    TableRow(256, None, None, _whole(256, 128, 64, 8, 1)),
    TableRow(512, None, None, _whole(512, 64, 32, 4, 1)),
    TableRow(None, None, None, _loop(64, 64, 128, 4, 4)),
)
# sm_80 (A100), bf16 / fp16 products: flash-kmeans' A100 rows.
SM80_TC = (
    TableRow(16, None, None, _whole(16, 128, 32, 4, 2)),
    TableRow(32, None, None, _whole(32, 128, 32, 4, 2)),
    TableRow(64, None, None, _whole(64, 128, 32, 4, 2)),
    TableRow(128, None, 65536, _whole(128, 128, 64, 4, 2)),
    TableRow(128, None, None, _whole(128, 128, 32, 4, 2)),
    TableRow(256, 1023, None, _loop(64, 128, 32, 4, 2)),
    TableRow(256, 65535, 262144, _loop(64, 128, 64, 4, 4)),
    TableRow(256, 65535, None, _loop(64, 128, 32, 4, 2)),
    TableRow(256, None, None, _loop(64, 128, 32, 4, 4)),
    TableRow(512, None, None, _loop(64, 128, 32, 4, 2)),
    TableRow(None, None, None, _loop(32, 64, 32, 4, 2)),
)
# sm_80, tf32 products: the A100 rows with fp32 operands (twice the bytes of a tile);
# for 128 < d <= 512 one row, 32-column d chunks (flash-kmeans too shrinks its fp32
# tiles on A100 to fit shared memory), in place of its three D = 256 rows.
SM80_TF32 = (
    TableRow(16, None, None, _whole(16, 128, 32, 4, 2)),
    TableRow(32, None, None, _whole(32, 128, 32, 4, 2)),
    TableRow(64, None, None, _whole(64, 128, 32, 4, 2)),
    TableRow(128, None, 65536, _whole(128, 128, 64, 4, 2)),
    TableRow(128, None, None, _whole(128, 128, 32, 4, 2)),
    TableRow(512, None, None, _loop(32, 128, 32, 4, 2)),
    TableRow(None, None, None, _loop(32, 64, 32, 4, 2)),
)
# Exact fp32 products ("highest"), both architectures: CUDA-core FMAs, small tiles.
IEEE = (
    TableRow(16, None, None, _whole(16, 64, 64, 4, 2)),
    TableRow(None, None, None, _loop(16, 64, 64, 4, 2)),
)

ARCHS = ("sm_90", "sm_80")
TABLES = {
    ("sm_90", "tc"): SM90_TC, ("sm_90", "tf32"): SM90_TF32, ("sm_90", "ieee"): IEEE,
    ("sm_80", "tc"): SM80_TC, ("sm_80", "tf32"): SM80_TF32, ("sm_80", "ieee"): IEEE,
}


def product_kind(dtype: torch.dtype, precision: str) -> str:
    """Which table serves a search: "tc" (bf16/fp16), "tf32" or "ieee" (fp32 inputs)."""
    if dtype == torch.float32:
        return "ieee" if precision == "ieee" else "tf32"
    return "tc"


def gpu_arch(device: torch.device) -> str:
    """The table a CUDA device takes: "sm_90" from compute capability 9 on, else "sm_80"."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "sm_90" if _capability(index)[0] >= 9 else "sm_80"


@functools.lru_cache(maxsize=None)
def _capability(index: int):  # queried once per device, never during graph capture
    return torch.cuda.get_device_capability(index)


def gpu_config_table(dtype: torch.dtype, precision: str, arch: str = "sm_90") -> tuple:
    """The rows the GPU launcher chooses from for this dtype/precision on ``arch``."""
    return TABLES[(arch, product_kind(dtype, precision))]


def table_configs(table) -> list:
    """The distinct configurations of a table, in row order."""
    return list(dict.fromkeys(r.config for r in table))


def search_config(d: int, dtype: torch.dtype, precision: str, interpreted: bool, *,
                  n: int = 0, k: int = 0, arch: str = "sm_90") -> Config:
    """The tile configuration for a search of N = ``n`` tokens, K = ``k`` codes of width
    ``d`` (fixed rule, no autotuning)."""
    if interpreted:  # the interpreter: few, large tiles (its cost is per operation),
        # whose plain-sum product stays within its tensor limit (exact duplicates tie)
        bd = max(16, min(next_pow2(d), 128)) if d <= 128 else 64
        bk = min(256, INTERPRETER_MAX_ELEMENTS // (64 * bd))
        return cfg(BLOCK_N=64, BLOCK_K=bk, BLOCK_D=bd, SINGLE_D=d <= 128)
    for row in gpu_config_table(dtype, precision, arch):
        if row.holds(n, k, d):
            return row.config
    raise AssertionError("unreachable: the last row of every table has no bound")


# The interpreter's largest tensor (numpy arrays beyond it are refused): the plain-sum
# product of a tile is BLOCK_N x BLOCK_D x BLOCK_K elements.
INTERPRETER_MAX_ELEMENTS = 1 << 20


def interpreter_uses_dot(c: Config) -> bool:
    """Under the interpreter, a configuration runs plain sums (exact duplicates tie,
    see the module docstring) unless its 3-D product exceeds the interpreter's tensor
    limit; then tl.dot (numpy.matmul) runs it."""
    b = c.constexprs()
    return b["BLOCK_N"] * b["BLOCK_D"] * b["BLOCK_K"] > INTERPRETER_MAX_ELEMENTS


def choose_splits(n_tiles: int, k_tiles: int, device: torch.device,
                  splits: int | None = None) -> int:
    """Split-K count: forced (argument, then SIMVQ_TRITON_SPLIT_K) or, by default,
    enough splits to give every SM one program when the token tiles alone do not."""
    if splits is None:
        splits = forced_splits()
    if splits is None:
        sms = num_sms(device)
        splits = max(1, sms // n_tiles) if n_tiles < sms else 1
    return max(1, min(int(splits), k_tiles))


def nearest_code_triton(z: torch.Tensor, codebook: torch.Tensor, *, qn: torch.Tensor | None
                        = None, config: Config | None = None, splits: int | None = None,
                        use_dot: bool | None = None):
    """z (N, d), codebook (K, d) (same float dtype, any strides) -> (idx int64 (N,),
    dist fp32 (N,)). ``qn``: ||codebook||^2 if the caller has it (computed from the
    values that enter the product). ``config``/``splits`` override the fixed rules,
    ``use_dot`` the interpreter's choice of tl.dot (tests; always tl.dot on a GPU).
    Inputs are validated by the caller (K >= 1, K < 2^31, finite)."""
    n, d = z.shape
    k = codebook.shape[0]
    dev = z.device
    if n == 0:
        return (torch.empty(0, dtype=torch.long, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev))
    prec = dot_precision(z.dtype)
    interpreted = dev.type == "cpu"
    if qn is None:
        qn = row_sqnorm(codebook)
    zs, qs = z, codebook
    if prec == "tf32":
        # the tensor cores read the top 19 bits of an fp32 operand (truncation, up to
        # 2^-10 relative); rounding both operands to the nearest tf32 value first makes
        # every product err by at most u = 2^-11 per operand, as design.md §3 assumes.
        # The interpreter multiplies these tf32 values exactly, like the tensor cores.
        zs, qs = round_to_tf32(z), round_to_tf32(codebook)
    c = config or search_config(d, z.dtype, prec, interpreted, n=n, k=k,
                                arch="" if interpreted else gpu_arch(dev))
    blocks = c.constexprs()
    if blocks["SINGLE_D"] and d > blocks["BLOCK_D"]:
        raise ValueError(f"configuration {c.label()} holds d <= {blocks['BLOCK_D']}, not {d}")
    n_tiles = triton.cdiv(n, blocks["BLOCK_N"])
    k_tiles = triton.cdiv(k, blocks["BLOCK_K"])
    s = choose_splits(n_tiles, k_tiles, dev, splits)
    k_per_split = triton.cdiv(k_tiles, s) * blocks["BLOCK_K"]
    s = triton.cdiv(k, k_per_split)
    if not interpreted:
        use_dot = True
    elif use_dot is None:
        use_dot = interpreter_uses_dot(c)
    val = torch.empty((s, n), dtype=torch.float32, device=dev)
    idx = torch.empty((s, n), dtype=torch.int32, device=dev)
    launch(nearest_code_kernel, (n_tiles, s),
           zs, qs, qn, val, idx, n, k, d, k_per_split,
           zs.stride(0), zs.stride(1), qs.stride(0), qs.stride(1),
           INPUT_PRECISION=("ieee" if interpreted else prec),
           # the interpreter mis-multiplies bf16 in tl.dot: widen there (exact)
           UPCAST=(interpreted and z.dtype != torch.float32),
           # the interpreter's tl.dot is numpy.matmul, whose BLAS may round a column
           # differently by its position in the tile: exact duplicates would not tie
           USE_DOT=use_dot,
           device=dev, **blocks, **c.launch_options(dev))
    if s > 1:
        first = torch.argmin(val, dim=0, keepdim=True)  # first minimum: lowest split
        best = val.gather(0, first)[0]
        pick = idx.gather(0, first)[0]
    else:
        best, pick = val[0], idx[0]
    dist = (row_sqnorm(z) + best).clamp_min(0)
    return pick.long(), dist


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest tf32 value (10 explicit mantissa bits, ties away from zero,
    like cvt.rna.tf32.f32), as fp32. Finite inputs (validated by the caller)."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)
