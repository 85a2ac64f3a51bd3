"""The pure-PyTorch oracle: SimVQ's official math, on any device and dtype.

This module imports no backend and no optional dependency. It is what every other
backend is tested against (run in float64), and it is the 'reference' backend (the
official formula: one N x K distance matrix) and the 'chunked' backend (the same
math over tiles of at most ``chunk_n x chunk_k`` distances, with a running
(min, argmin) so that memory is bounded by the tile, not by N x K).

Low-precision inputs (bf16, fp16) are widened to float32 before any product, so the
products are exact and the sums accumulate in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_N = 4096
DEFAULT_CHUNK_K = 4096


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_t(a, b):
    """a @ b.T with every element computed alike. With one row in ``a`` the product is
    a matrix-vector product, and BLAS's gemv sums the last (len(b) mod 4) rows of ``b``
    in another order than the others, so exact duplicate rows of ``b`` (duplicate
    codes) would get different products and break 'ties go to the lowest index'.
    Two copies of the row make it a gemm, which treats every row of ``b`` alike."""
    if a.shape[0] == 1:
        return (torch.cat([a, a]) @ b.t())[:1]
    return a @ b.t()


def project_codebook(basis, weight, bias=None):
    """The implicit codebook Q = basis @ weight.T + bias, (K, d)."""
    if weight.shape[0] == 1:  # d = 1: a gemv over the basis rows, see _mm_t
        bias2 = None if bias is None else torch.cat([bias, bias])
        return F.linear(basis, torch.cat([weight, weight]), bias2)[:, :1]
    return F.linear(basis, weight, bias)


def pairwise_sq_dist(z, codebook):
    """The official formula: ||z||^2 + ||Q||^2 - 2 z Q^T, (N, K). Builds N x K."""
    return (
        torch.sum(z**2, dim=1, keepdim=True)
        + torch.sum(codebook**2, dim=1)
        - 2 * _mm_t(z, codebook)
    )


@torch.no_grad()
def first_of_duplicates(codebook):
    """For each code, the lowest index holding an identical row, int64 (K,).

    Exact duplicates tie exactly in exact arithmetic, but a GEMM may round their
    products differently (their positions pick different kernel paths), so the search
    results are mapped through this to honour 'ties go to the lowest index'.
    """
    k = codebook.shape[0]
    if codebook.shape[1] == 0:  # zero-width codes are all identical
        return torch.zeros(k, dtype=torch.long, device=codebook.device)
    if codebook.device.type == "meta":  # no values to compare: shape-only tracing
        return torch.arange(k, device=codebook.device)
    _, inverse = torch.unique(codebook, dim=0, return_inverse=True)
    first = torch.full((k,), k, dtype=torch.long, device=codebook.device)
    first = first.scatter_reduce(0, inverse, torch.arange(k, device=codebook.device),
                                 reduce="amin", include_self=True)
    return first[inverse]


@torch.no_grad()
def nearest_code(z, codebook, duplicate_map=None):
    """Official formula then argmin (first index on ties). Returns (idx int64, dist).
    ``duplicate_map``: :func:`first_of_duplicates` of ``codebook`` if the caller has it."""
    dt = compute_dtype(z.dtype)
    z, codebook = z.to(dt), codebook.to(dt)
    if z.shape[0] == 0:
        return (torch.empty(0, dtype=torch.long, device=z.device),
                torch.empty(0, dtype=dt, device=z.device))
    d = pairwise_sq_dist(z, codebook)
    if duplicate_map is None:
        duplicate_map = first_of_duplicates(codebook)
    idx = duplicate_map[torch.argmin(d, dim=1)]
    dist = d.gather(1, idx[:, None])[:, 0].clamp_min(0)
    return idx, dist


@torch.no_grad()
def nearest_code_chunked(z, codebook, chunk_n=DEFAULT_CHUNK_N, chunk_k=DEFAULT_CHUNK_K,
                         duplicate_map=None):
    """Same result as :func:`nearest_code` with memory O(chunk_n * chunk_k).

    Codes are scanned in increasing order with a strict '<' merge, so ties still go
    to the lowest index.
    """
    dt = compute_dtype(z.dtype)
    z, codebook = z.to(dt), codebook.to(dt)
    n, k = z.shape[0], codebook.shape[0]
    idx = torch.zeros(n, dtype=torch.long, device=z.device)
    best = torch.full((n,), float("inf"), dtype=dt, device=z.device)
    qn = torch.sum(codebook**2, dim=1)
    for n0 in range(0, n, chunk_n):
        zc = z[n0 : n0 + chunk_n]
        b = best[n0 : n0 + chunk_n]
        bi = idx[n0 : n0 + chunk_n]
        for k0 in range(0, k, chunk_k):
            part = qn[k0 : k0 + chunk_k] - 2 * _mm_t(zc, codebook[k0 : k0 + chunk_k])
            v, i = torch.min(part, dim=1)
            better = v < b
            b.copy_(torch.where(better, v, b))
            bi.copy_(torch.where(better, i + k0, bi))
    dist = (torch.sum(z**2, dim=1) + best).clamp_min(0)
    if n:
        if duplicate_map is None:
            duplicate_map = first_of_duplicates(codebook)
        idx = duplicate_map[idx]
    return idx, dist


def simvq_quantize(z, basis, weight, bias=None):
    """Official SimVQ forward: Q = Linear(basis), argmin of the official distance,
    zq = embedding(idx, Q). Differentiable w.r.t. weight and bias by plain autograd
    (whose embedding backward builds a dense K x d gradient). Returns (zq, idx, dist).

    bf16/fp16 inputs are widened to float32 before the projection (as everywhere in
    this module), so the search sees the exact codebook, not one rounded to bf16/fp16;
    only zq is rounded to z's dtype.

    Identical basis rows are the same code whatever the weight, but the projection GEMM
    may round them differently by row position, so picks are also mapped to the lowest
    identical basis row (ties go to the lowest index).
    """
    dt = compute_dtype(z.dtype)
    codebook = project_codebook(basis.to(dt), weight.to(dt),
                                None if bias is None else bias.to(dt))
    idx, dist = nearest_code(z.detach(), codebook.detach())
    idx = first_of_duplicates(basis.detach())[idx]
    zq = F.embedding(idx, codebook).to(z.dtype)
    return zq, idx, dist


def simvq_quantize_chunked(z, basis, weight, bias=None, chunk_n=DEFAULT_CHUNK_N,
                           chunk_k=DEFAULT_CHUNK_K):
    """Tile-bounded SimVQ forward. zq is re-projected from the gathered basis rows,
    zq = basis[idx] @ weight.T + bias, so autograd gives dW = g^T basis[idx] with
    no K x d buffer.
    """
    dt = compute_dtype(z.dtype)
    with torch.no_grad():
        codebook = project_codebook(basis.to(dt), weight.to(dt),
                                    None if bias is None else bias.to(dt))
        idx, dist = nearest_code_chunked(z, codebook, chunk_n, chunk_k)
        if idx.numel():
            idx = first_of_duplicates(basis)[idx]
    rows = basis.index_select(0, idx)
    zq = F.linear(rows, weight, bias).to(z.dtype)
    return zq, idx, dist
