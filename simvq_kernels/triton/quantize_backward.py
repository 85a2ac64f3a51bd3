"""Triton SimVQ backward: grad_weight = grad_zq^T @ basis[idx] as a gather-GEMM.

Each program owns a (BLOCK_D x BLOCK_R) tile of grad_weight for one split of the tokens
and accumulates sum_n g[n, d_tile]^T basis[idx[n], r_tile] over that split in fp32,
gathering basis rows by index on the fly: no K x d (or K x r) buffer and no atomics.
Splits write partial tiles that are summed in a fixed order (deterministic).
grad_bias = sum_n grad_zq is a plain fp32 reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_gemm_tn(
    G, B, IDX, OUT,
    N, D, R, n_per_split,
    stride_gn, stride_gd, stride_bk, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d_mask = offs_d < D
    r_mask = offs_r < R
    n_begin = pid_s * n_per_split
    n_end = tl.minimum(N, n_begin + n_per_split)
    acc = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        rows = tl.load(IDX + offs_n, mask=n_mask, other=0)
        g = tl.load(G + offs_n[None, :] * stride_gn + offs_d[:, None] * stride_gd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        b = tl.load(B + rows[:, None] * stride_bk + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        if UPCAST:
            g = g.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(g.dtype)
        acc = tl.dot(g, b, acc, input_precision="ieee")
    out = OUT + pid_s * D * R + offs_d[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=d_mask[:, None] & r_mask[None, :])


def quantize_backward_triton(grad_zq: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor,
                             weight: torch.Tensor):
    """grad_zq (N, d), basis (K, r), idx int64 (N,), weight (d, r) ->
    (grad_weight (d, r), grad_bias (d,)) in weight's dtype."""
    n, d = grad_zq.shape
    r = basis.shape[1]
    dev = grad_zq.device
    if n == 0:
        return torch.zeros_like(weight), weight.new_zeros(d)
    interp = dev.type == "cpu"
    block_n, block_d, block_r = (16, 16, 16) if interp else (64, 64, 64)
    tiles = triton.cdiv(d, block_d) * triton.cdiv(r, block_r)
    target = 2 if interp else 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    splits = max(1, min(triton.cdiv(n, block_n), target // tiles))
    n_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, n_per_split)
    part = torch.empty((splits, d, r), dtype=torch.float32, device=dev)
    g = grad_zq if grad_zq.dtype == basis.dtype else grad_zq.to(basis.dtype)
    _gather_gemm_tn[(triton.cdiv(d, block_d), triton.cdiv(r, block_r), splits)](
        g, basis, idx.to(torch.int32), part, n, d, r, n_per_split,
        g.stride(0), g.stride(1), basis.stride(0), basis.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_R=block_r,
        UPCAST=(interp or g.dtype == torch.float32),
    )
    dw = part.sum(0) if splits > 1 else part[0]
    db = grad_zq.float().sum(0)
    return dw.to(weight.dtype), db.to(weight.dtype)
