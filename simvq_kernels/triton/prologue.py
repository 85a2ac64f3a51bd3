"""Triton prologue kernels: row squared norms and the SimVQ projection.

- ``row_sqnorm(x)``: ||x_m||^2 per row in fp32, of the stored values (the codebook
  the caller gave), so the search's ||Q_k||^2 - 2 z.Q_k errs only in the product
  (tf32 rounding, if any, is a product error: 4u ||z|| ||Q|| covers it).
- ``project(basis, weight, bias, out_dtype)``: Q = B W^T + b, exact products and fp32
  accumulation, rounded once to ``out_dtype`` (the dtype the search multiplies), and
  ||Q_k||^2 of the fp32 values before that rounding: the codebook the search ranks
  against is the fp32 projection, and rounding Q to bf16/fp16 only perturbs the
  product z.Q_k (by <= u ||z|| ||Q_k||), never the norms.

Both compute every row with the same instruction sequence wherever it sits, so exact
duplicate basis rows give bit-identical codes and norms, and the search's strict '<'
then sends ties to the lowest index with no duplicate map. All offsets that scale with
a row index are int64 (K x d can pass 2^31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cfg, kernel, launch, next_pow2


def _row_sqnorm_kernel(
    X, OUT, M, D, stride_m, stride_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = X + offs_m.to(tl.int64)[:, None] * stride_m
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + dd.to(tl.int64)[None, :] * stride_d,
                    mask=m_mask[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(OUT + offs_m, acc, mask=m_mask)


row_sqnorm_kernel = kernel(_row_sqnorm_kernel)


def sqnorm_config(interpreted: bool):
    if interpreted:
        return cfg(BLOCK_M=64, BLOCK_D=64)
    return cfg(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_D=32)


def row_sqnorm(x: torch.Tensor) -> torch.Tensor:
    """||x_m||^2 in fp32, (M,), for a 2-D float tensor (any strides)."""
    m, d = x.shape
    out = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    c = sqnorm_config(x.device.type == "cpu")
    launch(row_sqnorm_kernel, (triton.cdiv(m, c.constexprs()["BLOCK_M"]),),
           x, out, m, d, x.stride(0), x.stride(1),
           device=x.device,
           **c.constexprs(), **c.launch_options(x.device))
    return out


def _project_kernel(
    B, W, BIAS, Q, QN_PART, K, R, D,
    stride_bk, stride_br, stride_wd, stride_wr, stride_bias, stride_qk,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, BF16_BITS: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_mask = offs_k < K
    d_mask = offs_d < D
    b_rows = B + offs_k.to(tl.int64)[:, None] * stride_bk
    w_cols = W + offs_d.to(tl.int64)[None, :] * stride_wd
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < R
        b = tl.load(b_rows + rr.to(tl.int64)[None, :] * stride_br,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        w = tl.load(w_cols + rr.to(tl.int64)[:, None] * stride_wr,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
            w = w.to(tl.float32)
        if USE_DOT:
            acc = tl.dot(b, w, acc, input_precision="ieee")
        else:  # the interpreter: sequential sums over r, alike for every row (see search)
            acc += tl.sum(b[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d.to(tl.int64) * stride_bias, mask=d_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out = Q + offs_k.to(tl.int64)[:, None] * stride_qk + offs_d[None, :]
    if BF16_BITS:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + 32767 + ((bits >> 16) & 1)) >> 16
        qv = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:  # round to nearest even (cvt.rn) on the GPU
        qv = acc.to(Q.dtype.element_ty)
    tl.store(out, qv, mask=k_mask[:, None] & d_mask[None, :])
    # this d tile's share of ||Q_k||^2, from the fp32 values (masked columns hold 0)
    part = tl.sum(acc * acc, axis=1)
    tl.store(QN_PART + pid_d.to(tl.int64) * K + offs_k, part, mask=k_mask)


project_kernel = kernel(_project_kernel)


def project_config(interpreted: bool, dtype: torch.dtype):
    if interpreted:
        return cfg(BLOCK_K=64, BLOCK_D=32, BLOCK_R=32)
    if dtype == torch.float32:  # exact fp32 products: CUDA-core FMAs
        return cfg(num_warps=4, num_stages=2, BLOCK_K=64, BLOCK_D=64, BLOCK_R=16)
    return cfg(num_warps=4, num_stages=3, BLOCK_K=128, BLOCK_D=64, BLOCK_R=32)


def project(basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, qn): Q = basis @ weight.T + bias, (K, d) contiguous in ``out_dtype``
    (products exact, fp32 accumulation, one rounding at the end) and
    qn = ||Q_k||^2 (K,) fp32 of the values before that rounding."""
    k, r = basis.shape
    d = weight.shape[0]
    dev = basis.device
    q = torch.empty((k, d), dtype=out_dtype, device=dev)
    if k == 0 or d == 0:
        return q, torch.zeros((k,), dtype=torch.float32, device=dev)
    same_low = basis.dtype == weight.dtype and basis.dtype in (torch.bfloat16, torch.float16)
    interpreted = dev.type == "cpu"
    c = project_config(interpreted, torch.float32 if not same_low else basis.dtype)
    blocks = c.constexprs()
    grid = (triton.cdiv(k, blocks["BLOCK_K"]), triton.cdiv(d, blocks["BLOCK_D"]))
    has_bias = bias is not None
    part = torch.empty((grid[1], k), dtype=torch.float32, device=dev)
    launch(project_kernel, grid,
           basis, weight, bias if has_bias else weight, q, part, k, r, d,
           basis.stride(0), basis.stride(1), weight.stride(0), weight.stride(1),
           bias.stride(0) if has_bias else 0, q.stride(0),
           HAS_BIAS=has_bias, UPCAST=(interpreted or not same_low),
           BF16_BITS=(interpreted and out_dtype == torch.bfloat16), USE_DOT=not interpreted,
           device=dev,
           **blocks, **c.launch_options(dev))
    qn = part.sum(0) if grid[1] > 1 else part[0]  # d tiles added in a fixed order
    return q, qn


__all__ = ["row_sqnorm", "project", "next_pow2"]
