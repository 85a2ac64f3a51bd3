"""Triton SimVQ backward: grad_weight = grad_zq^T @ basis[idx] as a gather-GEMM.

Each program owns a (BLOCK_D x BLOCK_R) tile of grad_weight for one split of the tokens
and accumulates sum_n g[n, d_tile]^T basis[idx[n], r_tile] over that split in fp32,
gathering basis rows by index on the fly: no K x d (or K x r) buffer and no atomics.
Splits write partial tiles that are summed in a fixed order (deterministic).
grad_bias = sum_n grad_zq is a plain fp32 reduction.

Products: bf16 x bf16 and fp16 x fp16 on tensor cores (exact in fp32); anything else
(float32, mixed dtypes) is widened to fp32 and multiplied exactly ("ieee"), since the
gradient is compared at fp32 accuracy. Token, code-row and split offsets are int64.

Indices outside [0, K): the same contract as the 'cuda' backend, whose gather-GEMM
gives such a token a row of NaN: grad_weight and grad_bias come out NaN, never a finite
wrong value. Here the kernel never reads such a row (its load is masked) and the
launcher makes both gradients NaN when any index is out of range, with device-side ops
(no host synchronisation). Masking only the load keeps the kernel's registers and
shared memory as they were; writing NaN into the gathered tile before tl.dot cost a
layout conversion (255 instead of 110 registers for fp32 on sm_90a).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cfg, kernel, launch, num_sms


def _gather_gemm_tn_kernel(
    G, B, IDX, OUT,
    N, D, R, K, n_per_split,
    stride_gn, stride_gd, stride_bk, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, USE_DOT: tl.constexpr,
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
        rows = tl.load(IDX + offs_n, mask=n_mask, other=0)  # int64 code indices
        valid = n_mask & (rows >= 0) & (rows < K)  # a row outside [0, K) is never read
        g = tl.load(G + offs_n.to(tl.int64)[None, :] * stride_gn
                    + offs_d.to(tl.int64)[:, None] * stride_gd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        b = tl.load(B + rows.to(tl.int64)[:, None] * stride_bk
                    + offs_r.to(tl.int64)[None, :] * stride_br,
                    mask=valid[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        if UPCAST:
            g = g.to(tl.float32)
            b = b.to(tl.float32)
        if USE_DOT:
            acc = tl.dot(g, b, acc, input_precision="ieee")
        else:  # the interpreter: plain sums (its tl.dot is numpy.matmul on BLAS threads)
            acc += tl.sum(g[:, :, None] * b[None, :, :], axis=1)
    out = OUT + (pid_s.to(tl.int64) * D + offs_d.to(tl.int64)[:, None]) * R + offs_r[None, :]
    tl.store(out, acc, mask=d_mask[:, None] & r_mask[None, :])


gather_gemm_kernel = kernel(_gather_gemm_tn_kernel)


def backward_config(interpreted: bool, low_precision: bool):
    if interpreted:
        return cfg(BLOCK_N=32, BLOCK_D=32, BLOCK_R=32)
    if low_precision:
        return cfg(num_warps=4, num_stages=3, BLOCK_N=64, BLOCK_D=64, BLOCK_R=64)
    return cfg(num_warps=4, num_stages=2, BLOCK_N=16, BLOCK_D=64, BLOCK_R=64)


def quantize_backward_triton(grad_zq: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor,
                             weight: torch.Tensor, *, splits: int | None = None):
    """grad_zq (N, d), basis (K, r), idx int64 (N,), weight (d, r) ->
    (grad_weight (d, r), grad_bias (d,)) in weight's dtype. Any strides. An index
    outside [0, K) makes both gradients NaN (see the module docstring)."""
    n, d = grad_zq.shape
    k, r = basis.shape
    dev = grad_zq.device
    if n == 0:
        return torch.zeros_like(weight), weight.new_zeros(d)
    interpreted = dev.type == "cpu"
    low = grad_zq.dtype == basis.dtype and basis.dtype in (torch.bfloat16, torch.float16)
    c = backward_config(interpreted, low)
    blocks = c.constexprs()
    block_n = blocks["BLOCK_N"]
    tiles = triton.cdiv(d, blocks["BLOCK_D"]) * triton.cdiv(r, blocks["BLOCK_R"])
    if splits is None:
        target = 4 * num_sms(dev)
        splits = max(1, target // tiles)
    splits = max(1, min(int(splits), triton.cdiv(n, block_n)))
    n_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, n_per_split)
    idx = idx.contiguous()
    part = torch.empty((splits, d, r), dtype=torch.float32, device=dev)
    launch(gather_gemm_kernel,
           (triton.cdiv(d, blocks["BLOCK_D"]), triton.cdiv(r, blocks["BLOCK_R"]), splits),
           grad_zq, basis, idx, part, n, d, r, k, n_per_split,
           grad_zq.stride(0), grad_zq.stride(1), basis.stride(0), basis.stride(1),
           UPCAST=(interpreted or not low), USE_DOT=not interpreted, device=dev, **blocks,
           **c.launch_options(dev))
    dw = part.sum(0) if splits > 1 else part[0]
    db = grad_zq.sum(0, dtype=torch.float32)
    # an index out of range: both gradients NaN (device-side, no host synchronisation)
    bad = ((idx < 0) | (idx >= k)).any()
    dw = dw.masked_fill(bad, float("nan"))
    db = db.masked_fill(bad, float("nan"))
    return dw.to(weight.dtype), db.to(weight.dtype)
