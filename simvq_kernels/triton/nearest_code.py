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

# Tensor-core path (bf16, fp16, tf32) on a GPU, by d class: (max d, config).
# d <= 128 keeps the token tile on chip (SINGLE_D); larger d streams d in chunks.
_TC_CONFIGS = (
    (16, cfg(num_warps=4, num_stages=3, BLOCK_N=128, BLOCK_K=64, BLOCK_D=16, SINGLE_D=True)),
    (32, cfg(num_warps=4, num_stages=3, BLOCK_N=128, BLOCK_K=64, BLOCK_D=32, SINGLE_D=True)),
    (64, cfg(num_warps=4, num_stages=3, BLOCK_N=128, BLOCK_K=64, BLOCK_D=64, SINGLE_D=True)),
    (128, cfg(num_warps=8, num_stages=3, BLOCK_N=128, BLOCK_K=128, BLOCK_D=128, SINGLE_D=True)),
    (None, cfg(num_warps=8, num_stages=3, BLOCK_N=128, BLOCK_K=128, BLOCK_D=64, SINGLE_D=False)),
)
# tf32 operands are twice as wide: fewer pipeline stages / narrower code chunks.
_TF32_CONFIGS = (
    (16, cfg(num_warps=4, num_stages=3, BLOCK_N=128, BLOCK_K=64, BLOCK_D=16, SINGLE_D=True)),
    (32, cfg(num_warps=4, num_stages=3, BLOCK_N=128, BLOCK_K=64, BLOCK_D=32, SINGLE_D=True)),
    (64, cfg(num_warps=4, num_stages=2, BLOCK_N=128, BLOCK_K=64, BLOCK_D=64, SINGLE_D=True)),
    (128, cfg(num_warps=8, num_stages=2, BLOCK_N=128, BLOCK_K=64, BLOCK_D=128, SINGLE_D=True)),
    (None, cfg(num_warps=8, num_stages=2, BLOCK_N=128, BLOCK_K=128, BLOCK_D=32, SINGLE_D=False)),
)
# Exact fp32 products ("highest"): CUDA-core FMAs, small tiles.
_IEEE_CONFIGS = (
    (16, cfg(num_warps=4, num_stages=2, BLOCK_N=64, BLOCK_K=64, BLOCK_D=16, SINGLE_D=True)),
    (None, cfg(num_warps=4, num_stages=2, BLOCK_N=64, BLOCK_K=64, BLOCK_D=16, SINGLE_D=False)),
)


def gpu_config_table(dtype: torch.dtype, precision: str):
    """The (max d, Config) rows the GPU launcher chooses from for this dtype/precision."""
    if dtype == torch.float32:
        return _IEEE_CONFIGS if precision == "ieee" else _TF32_CONFIGS
    return _TC_CONFIGS


def search_config(d: int, dtype: torch.dtype, precision: str, interpreted: bool) -> Config:
    """The tile configuration for a search of width ``d`` (fixed rule, no autotuning)."""
    if interpreted:  # the interpreter: few, large tiles (its cost is per operation)
        bd = max(16, min(next_pow2(d), 128))
        return cfg(BLOCK_N=64, BLOCK_K=256, BLOCK_D=bd if d <= 128 else 64, SINGLE_D=d <= 128)
    for max_d, c in gpu_config_table(dtype, precision):
        if max_d is None or d <= max_d:
            return c
    raise AssertionError("unreachable: the last row has no bound")


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
                        = None, config: Config | None = None, splits: int | None = None):
    """z (N, d), codebook (K, d) (same float dtype, any strides) -> (idx int64 (N,),
    dist fp32 (N,)). ``qn``: ||codebook||^2 if the caller has it (computed from the
    values that enter the product). ``config``/``splits`` override the fixed rules
    (tests). Inputs are validated by the caller (K >= 1, K < 2^31, finite)."""
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
    c = config or search_config(d, z.dtype, prec, interpreted)
    blocks = c.constexprs()
    if blocks["SINGLE_D"] and d > blocks["BLOCK_D"]:
        raise ValueError(f"configuration {c.label()} holds d <= {blocks['BLOCK_D']}, not {d}")
    n_tiles = triton.cdiv(n, blocks["BLOCK_N"])
    k_tiles = triton.cdiv(k, blocks["BLOCK_K"])
    s = choose_splits(n_tiles, k_tiles, dev, splits)
    k_per_split = triton.cdiv(k_tiles, s) * blocks["BLOCK_K"]
    s = triton.cdiv(k, k_per_split)
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
           USE_DOT=not interpreted,
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
