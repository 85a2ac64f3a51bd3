"""Triton fused nearest-code search (FlashAssign-style): kernel and launcher.

Each program keeps a BLOCK_N tile of tokens and streams its share of the codebook in
BLOCK_K chunks: acc = z_tile @ q_chunk^T (tl.dot, fp32 accumulation), v = ||q||^2 - 2 acc,
and a running (min, argmin) per token with a strict '<' across chunks and the lowest
index inside a chunk, so ties go to the lowest index and the result is deterministic.
The N x K matrix never exists. When N is small the code range is split across a second
grid axis (SPLIT_K programs per token tile); each split writes its partial (min, argmin)
and a tiny deterministic merge in PyTorch takes the first minimum over splits (splits
are in code order, so that is the lowest index).

Precision: fp32 inputs use tl.dot's "ieee" path (exact fp32 products) when
``torch.get_float32_matmul_precision() == "highest"``, else "tf32"; bf16/fp16 inputs
multiply exactly into fp32. ||q||^2 is computed from the values that enter the product.

This module imports triton; it is only imported by the 'triton' backend when used.
On CPU tensors it runs under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT32_MAX = 2**31 - 1


@triton.jit
def _nearest_code_fwd(
    Z, Q, QN, OUT_VAL, OUT_IDX,
    N, K, D, k_per_split,
    stride_zn, stride_zd, stride_qk, stride_qd,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)

    best_val = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.full([BLOCK_N], 0, tl.int32) + k_begin
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            z = tl.load(Z + offs_n[:, None] * stride_zn + dd[None, :] * stride_zd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            q = tl.load(Q + offs_k[None, :] * stride_qk + dd[:, None] * stride_qd,
                        mask=k_mask[None, :] & d_mask[:, None], other=0.0)
            if UPCAST:  # exact: bf16/fp16 products fit in fp32
                z = z.to(tl.float32)
                q = q.to(tl.float32)
            acc = tl.dot(z, q, acc, input_precision=INPUT_PRECISION)
        qn = tl.load(QN + offs_k, mask=k_mask, other=0.0)
        v = qn[None, :] - 2.0 * acc
        v = tl.where(k_mask[None, :], v, float("inf"))
        m = tl.min(v, axis=1)
        j = tl.min(tl.where(v == m[:, None], offs_k[None, :], _INT32_MAX), axis=1)
        better = m < best_val
        best_val = tl.where(better, m, best_val)
        best_idx = tl.where(better, j, best_idx)

    out = pid_s * N + offs_n
    tl.store(OUT_VAL + out, best_val, mask=n_mask)
    tl.store(OUT_IDX + out, best_idx, mask=n_mask)


def _config(n, k, d, device):
    """Tile sizes per shape class (small d, d ~ 128, d ~ 512; small or large N)."""
    if device.type == "cpu":  # the interpreter: small tiles keep it quick
        return 16, 32, 16, 1
    block_d = 16 if d <= 16 else (32 if d <= 32 else 64)
    block_n = 64 if n <= 4096 else 128
    block_k = 128 if d <= 128 else 64
    return block_n, block_k, block_d, 4


def _num_sms(device):
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def nearest_code_triton(z: torch.Tensor, codebook: torch.Tensor):
    """z (N, d), codebook (K, d) -> (idx int64 (N,), dist fp32 (N,)). Inputs validated
    by the caller (same device/dtype, K >= 1, K < 2^31)."""
    n, d = z.shape
    k = codebook.shape[0]
    if n == 0:
        return (torch.empty(0, dtype=torch.long, device=z.device),
                torch.empty(0, dtype=torch.float32, device=z.device))
    if z.dtype == torch.float32:
        prec = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    elif z.dtype in (torch.bfloat16, torch.float16):
        prec = "ieee"
    else:
        raise TypeError(f"triton nearest_code: unsupported dtype {z.dtype}")
    qn = codebook.float().square().sum(1)
    if prec == "tf32":  # norms of the tf32-rounded values that enter the product
        qn = _round_tf32(codebook).square().sum(1)
    block_n, block_k, block_d, warps = _config(n, k, d, z.device)
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    target = 2 * _num_sms(z.device)
    splits = max(1, min(k_tiles, target // n_tiles)) if n_tiles < target else 1
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    val = torch.empty((splits, n), dtype=torch.float32, device=z.device)
    idx = torch.empty((splits, n), dtype=torch.int32, device=z.device)
    _nearest_code_fwd[(n_tiles, splits)](
        z, codebook, qn, val, idx, n, k, d, k_per_split,
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, INPUT_PRECISION=prec,
        # Triton's CPU interpreter mis-multiplies bf16 in tl.dot; widen there (exact)
        UPCAST=(z.device.type == "cpu" and z.dtype == torch.bfloat16),
        num_warps=warps,
    )
    if splits > 1:
        s = torch.argmin(val, dim=0)  # first minimum: the lowest split, lowest index
        best = val.gather(0, s[None])[0]
        pick = idx.gather(0, s[None])[0]
    else:
        best, pick = val[0], idx[0]
    zn = z.float().square().sum(1)
    dist = (zn + best).clamp_min(0)
    return pick.long(), dist


def _round_tf32(x):
    """Round fp32 to tf32 (10 explicit mantissa bits), nearest, ties away from zero."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x1000) & ~0x1FFF
    return bits.view(torch.float32)
