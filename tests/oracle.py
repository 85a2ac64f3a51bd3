"""The design.md §3 correctness criterion as reusable test helpers.

The oracle is the reference math run in float64 on the *stored* values of the inputs
(a bf16 tensor is widened exactly to float64, so input rounding never counts as error).
A backend's pick k for token z passes if

    d64(z, Q_k) - min_j d64(z, Q_j) <= eps(z)
    eps(z) = 4u * ||z|| * max_j ||Q_j|| + a(d) * (||z||^2 + max_j ||Q_j||^2)
    a(d)   = max(1e-6, 4 * sqrt(d) * 2^-24)

and its returned distance must lie within eps(z) of d64(z, Q_k). ``u`` is the unit
roundoff of the products actually used (see :func:`unit_roundoff`); a(d) is the float32
accumulation term (see :func:`accumulation_term`): it grows with the length d of the
sums, and no tolerance here depends on how one CPU's BLAS happens to block them.

Everything here is memory-bounded: the float64 oracle is computed in tiles of at most
``tile_elems`` distances, so checking a subset of rows of an N = 70,000 x K = 262,144
problem never builds a float64 N x K matrix. Check big shapes on a random subset of
rows (:func:`sample_rows`).

Public API (kept stable; tests/test_core.py imports it too):

    unit_roundoff(dtype, device="cpu", matmul_precision=None) -> float
    accumulation_term(d) -> float   a(d) = max(1e-6, 4 sqrt(d) 2^-24)
    eps_per_token(z, codebook=None, u=0.0, *, q_max_norm=None) -> float64 (N,)
    oracle_nearest64(z, codebook) -> (idx int64 (N,), dist float64 (N,))
    dist64_rows(z, codebook, idx) -> float64 (N,)   d64(z_n, Q_idx[n]), computed directly
    check_nearest(z, codebook, idx, dist, u, *, expect_idx=None, check_ties=True, what="")
    project64(basis, weight, bias=None) -> float64 (K, d) codebook
    projection_eps(z, basis, weight, bias=None) -> (extra_eps (N,), delta (K, d))
    check_quantize(z, basis, weight, bias, zq, idx, dist, u, *, expect_idx=None, what="")
    grad_rtol(dtype) -> float
    reference_grads64(basis, weight, bias, idx, grad_zq) -> (dW64, db64 or None)
    check_grads(dW, db, basis, weight, bias, idx, grad_zq, *, rtol=None, what="")
    assert_close_scaled(actual, expected, scale, rtol, name, atol=0.0)
    subnormal_spacing(dtype) -> float
    reference_layer64(z, basis, weight, bias, idx, grad_out, beta=0.25, legacy=False)
        -> dict(loss, dz, dW, db, and magnitude bounds for each) for the SimVQ layer
    sample_rows(n, m, seed=0) -> int64 (min(n, m),)
    first_of_duplicates(codebook) -> int64 (K,)   lowest index holding the same row
    poison_heap(*numels)   best-effort: make the next allocations of these sizes hold
                           garbage, so that output elements a kernel forgets to write fail
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "unit_roundoff",
    "accumulation_term",
    "eps_per_token",
    "oracle_nearest64",
    "dist64_rows",
    "check_nearest",
    "project64",
    "projection_eps",
    "check_quantize",
    "grad_rtol",
    "reference_grads64",
    "check_grads",
    "reference_layer64",
    "assert_close_scaled",
    "subnormal_spacing",
    "sample_rows",
    "first_of_duplicates",
    "poison_heap",
]

# Max float64 elements in one oracle tile (8 bytes each: 32 MiB).
TILE_ELEMS = 1 << 22


# ----------------------------------------------------------------------- roundoff

def unit_roundoff(dtype: torch.dtype, device="cpu", matmul_precision: str | None = None
                  ) -> float:
    """The ``u`` of design.md §3 for inputs of ``dtype`` searched on ``device``.

    - float64: 2^-53 (products in float64).
    - float32 on CPU: 0. The CPU backends form exact fp32 products (no tf32 on CPU),
      so only the accumulation error remains, which the a(d) term of eps covers.
    - float32 on CUDA: 0 if ``torch.get_float32_matmul_precision()`` is "highest",
      else 2^-11 (tf32 products: 10 explicit mantissa bits).
    - bfloat16: 2^-8; float16: 2^-11. Note: the products of two bf16 (8-bit
      significand) or two fp16 (11-bit) values are *exact* in fp32 (16 or 22 bits <
      24), so for ``nearest_code`` on bf16/fp16 inputs the u-term is slack. It is not
      slack for ``simvq_quantize``, where a backend may round the projected codebook
      Q = B W^T + b to the input dtype before the search (the official formula does,
      under autocast); the u-term of that dtype covers that rounding.
    """
    if dtype == torch.float64:
        return 2.0 ** -53
    if dtype == torch.bfloat16:
        return 2.0 ** -8
    if dtype == torch.float16:
        return 2.0 ** -11
    if dtype == torch.float32:
        dev = torch.device(device)
        if dev.type == "cpu":
            return 0.0
        prec = matmul_precision or torch.get_float32_matmul_precision()
        return 0.0 if prec == "highest" else 2.0 ** -11
    raise TypeError(f"no unit roundoff for {dtype}")


def accumulation_term(d: int) -> float:
    """a(d) = max(1e-6, 4 sqrt(d) 2^-24): the relative float32 accumulation error allowed
    for d-term dot products and norms (design.md §3).

    Blocked float32 sums of random-signed terms err by about sqrt(d) u (u = 2^-24); the
    order of the sums differs between BLAS builds and between the AVX2 and AVX-512 kernels
    of one build, so the error at a given d differs between CPUs. The factor 4 covers that
    spread; the 1e-6 floor covers small d. A flat 1e-6 held on one CPU at d = 262,147 and
    failed on another (every backend, the reference included).
    """
    return max(1e-6, 4.0 * math.sqrt(max(int(d), 0)) * 2.0 ** -24)


# --------------------------------------------------------------------------- oracle

def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _tile_sizes(n: int, k: int, d: int, tile_elems: int) -> tuple[int, int]:
    tk = max(1, min(k, tile_elems // max(1, min(n, 1024))))
    tn = max(1, min(n, tile_elems // tk))
    return tn, tk


def oracle_nearest64(z: torch.Tensor, codebook: torch.Tensor, *, tile_elems: int = TILE_ELEMS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 nearest code of every row of ``z`` (ties: lowest index).

    Computed tile by tile (memory O(tile_elems)); the distance of each tile is the
    official expanded formula ||z||^2 + ||Q||^2 - 2 z.Q in float64, and the returned
    distance of the winner is recomputed directly as sum((z - Q_k)^2) in float64.
    Returns (idx int64 (N,), dist float64 (N,)) on CPU.
    """
    z64, q64 = _f64(z), _f64(codebook)
    n, k = z64.shape[0], q64.shape[0]
    if k == 0:
        raise ValueError("oracle_nearest64: empty codebook")
    idx = torch.zeros(n, dtype=torch.long)
    best = torch.full((n,), math.inf, dtype=torch.float64)
    if n == 0:
        return idx, best
    qn = (q64 * q64).sum(1)
    zn = (z64 * z64).sum(1)
    tn, tk = _tile_sizes(n, k, z64.shape[1], tile_elems)
    for n0 in range(0, n, tn):
        zc = z64[n0:n0 + tn]
        b = best[n0:n0 + tn]
        bi = idx[n0:n0 + tn]
        for k0 in range(0, k, tk):
            part = zn[n0:n0 + tn, None] + qn[None, k0:k0 + tk] - 2.0 * (zc @ q64[k0:k0 + tk].T)
            v, i = torch.min(part, dim=1)
            better = v < b
            b.copy_(torch.where(better, v, b))
            bi.copy_(torch.where(better, i + k0, bi))
    return idx, dist64_rows(z64, q64, idx)


def dist64_rows(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """d64(z_n, Q_{idx[n]}) = sum((z_n - Q_idx[n])^2) in float64, (N,). idx must be valid."""
    z64, q64 = _f64(z), _f64(codebook)
    idx = idx.detach().to("cpu", torch.long)
    out = torch.empty(z64.shape[0], dtype=torch.float64)
    step = max(1, TILE_ELEMS // max(1, z64.shape[1]))
    for n0 in range(0, z64.shape[0], step):
        diff = z64[n0:n0 + step] - q64.index_select(0, idx[n0:n0 + step])
        out[n0:n0 + step] = (diff * diff).sum(1)
    return out


def eps_per_token(z: torch.Tensor, codebook: torch.Tensor | None = None, u: float = 0.0, *,
                  q_max_norm: float | None = None) -> torch.Tensor:
    """eps(z) of design.md §3 per row of ``z``, float64 (N,) on CPU.

    eps(z) = 4u ||z|| max_j ||Q_j|| + a(d) (||z||^2 + max_j ||Q_j||^2), d = z's width,
    a(d) from :func:`accumulation_term`.
    Pass either ``codebook`` or its largest row norm ``q_max_norm``.
    """
    z64 = _f64(z)
    if q_max_norm is None:
        if codebook is None:
            raise ValueError("eps_per_token needs `codebook` or `q_max_norm`")
        q64 = _f64(codebook)
        q_max_norm = float(q64.norm(dim=1).max()) if q64.shape[0] else 0.0
    zn = z64.norm(dim=1)
    a = accumulation_term(z64.shape[1] if z64.dim() == 2 else 1)
    return 4.0 * u * zn * q_max_norm + a * (zn * zn + q_max_norm * q_max_norm)


def first_of_duplicates(codebook: torch.Tensor) -> torch.Tensor:
    """For each code k, the lowest index j with Q_j == Q_k exactly (bitwise values),
    int64 (K,). A pick k with first_of_duplicates[k] != k breaks 'ties go to the
    lowest index' (an exact duplicate with a lower index is exactly as near)."""
    q = codebook.detach().cpu()
    if q.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    q = q.to(torch.float64) + 0.0  # -0.0 == 0.0 as a value: normalise the sign of zero
    _, inverse = torch.unique(q, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), q.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(q.shape[0]), reduce="amin")
    return first[inverse]


def _fmt_rows(bad: torch.Tensor, limit: int = 5) -> str:
    rows = bad.nonzero().flatten()
    head = rows[:limit].tolist()
    return f"{rows.numel()} row(s), e.g. {head}"


def check_nearest(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor,
                  dist: torch.Tensor, u: float, *, expect_idx: torch.Tensor | None = None,
                  check_ties: bool = True, q_max_norm: float | None = None,
                  extra_eps: torch.Tensor | float = 0.0, what: str = "") -> None:
    """Assert that (idx, dist) returned by a backend for (z, codebook) meet §3.

    Checks: shapes (N,), idx int64 in [0, K); dist finite and >= 0; the pick is within
    eps(z) of the float64 optimum; the distance within eps(z) of d64(z, Q_idx);
    if ``expect_idx`` is given, exact index agreement (use it only for inputs built with
    well-separated gaps or exact duplicates); if ``check_ties``, no exact duplicate of
    the picked code has a lower index. To check a subset of rows of a big problem, pass
    z[rows], idx[rows], dist[rows] (and ``q_max_norm`` to skip recomputing it).
    ``extra_eps`` (float64 (N,) or a float) is added to eps(z); check_quantize uses it
    for the rounding of the projected codebook, which §3 does not cover.
    Raises AssertionError with a message naming the failing rows.
    """
    tag = f"[{what}] " if what else ""
    n, k = z.shape[0], codebook.shape[0]
    assert isinstance(idx, torch.Tensor) and isinstance(dist, torch.Tensor), \
        f"{tag}idx/dist must be tensors"
    assert idx.dtype == torch.int64, f"{tag}indices must be int64, got {idx.dtype}"
    assert tuple(idx.shape) == (n,), f"{tag}indices shape {tuple(idx.shape)} != ({n},)"
    assert tuple(dist.shape) == (n,), f"{tag}distances shape {tuple(dist.shape)} != ({n},)"
    assert dist.is_floating_point(), f"{tag}distances must be floating, got {dist.dtype}"
    if n == 0:
        return
    idx_c = idx.detach().cpu()
    out_of_range = (idx_c < 0) | (idx_c >= k)
    assert not bool(out_of_range.any()), \
        f"{tag}indices outside [0, {k}): {_fmt_rows(out_of_range)}, values " \
        f"{idx_c[out_of_range][:5].tolist()}"
    dist64 = _f64(dist)
    bad = ~torch.isfinite(dist64) | (dist64 < 0)
    assert not bool(bad.any()), f"{tag}distances non-finite or negative: {_fmt_rows(bad)}, " \
        f"values {dist64[bad][:5].tolist()}"

    eps = eps_per_token(z, codebook, u, q_max_norm=q_max_norm) + extra_eps
    o_idx, o_dist = oracle_nearest64(z, codebook)
    picked = dist64_rows(z, codebook, idx_c)
    gap = picked - o_dist
    bad = gap > eps
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise AssertionError(
            f"{tag}pick not within eps of the float64 optimum in {_fmt_rows(bad)}; row {r}: "
            f"picked {int(idx_c[r])} at d64={picked[r].item():.17g}, oracle picks "
            f"{int(o_idx[r])} at d64={o_dist[r].item():.17g}, gap {gap[r].item():.3g} > "
            f"eps {eps[r].item():.3g} (u={u})")
    err = (dist64 - picked).abs()
    bad = err > eps
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise AssertionError(
            f"{tag}returned distance off by more than eps in {_fmt_rows(bad)}; row {r}: "
            f"returned {dist64[r].item():.17g}, d64 of the pick {int(idx_c[r])} is "
            f"{picked[r].item():.17g}, |err| {err[r].item():.3g} > eps {eps[r].item():.3g}")
    if expect_idx is not None:
        exp = expect_idx.detach().cpu().long()
        bad = exp != idx_c
        assert not bool(bad.any()), \
            f"{tag}indices differ from the expected ones in {_fmt_rows(bad)}: got " \
            f"{idx_c[bad][:5].tolist()}, expected {exp[bad][:5].tolist()}"
    if check_ties:
        first = first_of_duplicates(codebook)
        bad = first[idx_c] != idx_c
        assert not bool(bad.any()), \
            f"{tag}tie not broken to the lowest index in {_fmt_rows(bad)}: picked " \
            f"{idx_c[bad][:5].tolist()}, identical lower codes {first[idx_c][bad][:5].tolist()}"


# ------------------------------------------------------------------------- quantize

def project64(basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The implicit codebook Q = basis @ weight.T + bias in float64, (K, d) on CPU."""
    q = _f64(basis) @ _f64(weight).T
    if bias is not None:
        q = q + _f64(bias)
    return q


def _round_unit(dtype: torch.dtype) -> float:
    """Relative error of rounding a value to ``dtype`` (round to nearest)."""
    return {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9,
            torch.float16: 2.0 ** -11}[dtype]


def subnormal_spacing(dtype: torch.dtype) -> float:
    """Spacing of ``dtype``'s subnormal numbers: the absolute rounding error floor of a
    result stored in that dtype (2^-24 for float16, 2^-133 for bfloat16, ...)."""
    fi = torch.finfo(dtype)
    return float(fi.tiny) * float(fi.eps)


def projection_eps(z, basis, weight, bias=None, compute_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The allowance for a backend's rounding of the projected codebook (see
    :func:`check_quantize`): returns (extra_eps float64 (N,), delta float64 (K, d)),
    delta_ki = (r + 2) u_c (|B_k| . |W_i| + |b_i|) bounding |Q_ki - Q64_ki| for a
    projection accumulated in ``compute_dtype`` (default: float32, or float64 for
    float64 inputs), extra_eps = 2 (||z|| + max_k ||Q64_k||) D + D^2, D = max_k ||delta_k||."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    u_c = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24}.get(
        compute_dtype, _round_unit(compute_dtype) if compute_dtype in
        (torch.bfloat16, torch.float16) else 2.0 ** -24)
    r = basis.shape[1]
    mag = _f64(basis).abs() @ _f64(weight).abs().T
    if bias is not None:
        mag = mag + _f64(bias).abs()
    delta = (r + 2) * u_c * mag
    big_d = float(delta.norm(dim=1).max()) if delta.shape[0] else 0.0
    q_max = float(project64(basis, weight, bias).norm(dim=1).max()) if delta.shape[0] else 0.0
    extra = 2.0 * (_f64(z).norm(dim=1) + q_max) * big_d + big_d ** 2
    return extra, delta


def check_quantize(z, basis, weight, bias, zq, idx, dist, u: float, *,
                   expect_idx: torch.Tensor | None = None, check_ties: bool = True,
                   what: str = "") -> None:
    """Assert that (zq, idx, dist) of ``simvq_quantize``/``quantize`` meet §3.

    The codebook is the float64 projection Q64 of the stored basis/weight/bias.

    Search: :func:`check_nearest` against Q64 with eps(z) widened by the rounding a
    backend may make when it projects the codebook (the contract: accumulate in fp32
    for non-float64 inputs, never round Q to bf16/fp16): with the per-element bound
    delta_ki = (r + 2) * u_c * (|B_k| . |W_i| + |b_i|), u_c = 2^-24 (2^-53 for float64),
    and D = max_k ||delta_k||, a pick may lose 2 (||z|| + max||Q||) D + D^2 more. This
    matters only where the projection cancels (|Q| << |B||W|); §3 itself speaks of the
    search on a given codebook.

    zq: z's shape and dtype, and per element
    |zq - Q64[idx]| <= delta_idx,i + 2 u_out |Q64[idx]| + (subnormal spacing of z's dtype)
    with u_out the rounding to z's dtype.
    """
    tag = f"[{what}] " if what else ""
    q64 = project64(basis, weight, bias)
    extra, delta = projection_eps(z, basis, weight, bias)
    q_max = float(q64.norm(dim=1).max())
    check_nearest(z, q64, idx, dist, u, expect_idx=expect_idx, check_ties=False,
                  q_max_norm=q_max, extra_eps=extra, what=what)
    if check_ties:
        # exact duplicates of the *basis* rows project to identical codes on every backend
        first = first_of_duplicates(basis)
        idx_c = idx.detach().cpu()
        bad = first[idx_c] != idx_c
        assert not bool(bad.any()), \
            f"{tag}tie (duplicate basis rows) not broken to the lowest index in " \
            f"{_fmt_rows(bad)}"
    assert tuple(zq.shape) == tuple(z.shape), f"{tag}zq shape {tuple(zq.shape)} != {tuple(z.shape)}"
    assert zq.dtype == z.dtype, f"{tag}zq dtype {zq.dtype} != z's {z.dtype}"
    if z.shape[0] == 0:
        return
    idx_c = idx.detach().cpu()
    want = q64.index_select(0, idx_c)
    u_out = _round_unit(z.dtype)
    tol = delta.index_select(0, idx_c) + 2 * u_out * want.abs() + subnormal_spacing(z.dtype)
    err = (_f64(zq) - want).abs()
    bad = (err > tol) | ~torch.isfinite(_f64(zq))
    if bool(bad.any()):
        n_, j_ = (int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{tag}zq != Q[idx] in {int(bad.sum())} element(s); e.g. [{n_}, {j_}]: zq="
            f"{float(zq[n_, j_]):.9g}, Q64[idx]={want[n_, j_].item():.17g}, "
            f"tol {tol[n_, j_].item():.3g}")


# ------------------------------------------------------------------------ gradients

def grad_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of dW/db/dz against autograd through the float64 reference,
    relative to the magnitude bound sum_n |g_n| |B_idx[n]| (elementwise), per dtype.

    float64 1e-10; float32 1e-4 (fp32 accumulation over up to ~1e5 tokens, blocked);
    float16 4e-3 (result rounded to fp16, 2^-11, plus fp32 accumulation);
    bfloat16 1.6e-2 (result rounded to bf16, 2^-9, plus any bf16 partial sums of the
    official formula's dense embedding backward).
    """
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3,
            torch.bfloat16: 1.6e-2}[dtype]


def reference_grads64(basis, weight, bias, idx, grad_zq):
    """Autograd through the float64 reference: zq = F.embedding(idx, B W^T + b),
    backward of <grad_zq, zq>. Returns (dW64 (d, r), db64 (d,) or None) on CPU."""
    w = _f64(weight).requires_grad_(True)
    b = _f64(bias).requires_grad_(True) if bias is not None else None
    q = torch.nn.functional.linear(_f64(basis), w, b)
    zq = torch.nn.functional.embedding(idx.detach().cpu().long(), q)
    zq.backward(_f64(grad_zq))
    return w.grad, (b.grad if b is not None else None)


def assert_close_scaled(actual, expected, scale, rtol: float, name: str,
                        atol: float = 0.0) -> None:
    """|actual - expected| <= rtol * scale + atol elementwise (all float64-comparable);
    ``scale`` is a magnitude bound of the exact value (e.g. sum |a||b| for a sum of
    products), so cancellation does not make the tolerance vanish; ``atol`` is for the
    subnormal floor of a low-precision result (:func:`subnormal_spacing`)."""
    a, e, s = _f64(actual), _f64(expected), _f64(torch.as_tensor(scale))
    assert tuple(a.shape) == tuple(e.shape), \
        f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{name}: non-finite values"
    err = (a - e).abs()
    tol = rtol * s + atol + 1e-300
    bad = err > tol
    if bool(bad.any()):
        pos = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} element(s) off; e.g. at {pos}: got "
            f"{a[pos].item():.9g}, expected {e[pos].item():.17g}, |err| "
            f"{err[pos].item():.3g} > {rtol:g} * scale {s.expand_as(a)[pos].item():.3g}")


def check_grads(dW, db, basis, weight, bias, idx, grad_zq, *, rtol: float | None = None,
                what: str = "") -> None:
    """Compare a backend's (dW, db) for upstream ``grad_zq`` and picks ``idx`` with
    autograd through the float64 reference (same picks), elementwise, with tolerance
    ``rtol`` (default :func:`grad_rtol` of weight's dtype) times the magnitude bound
    |g|^T |B[idx]| (for dW) and sum_n |g_n| (for db)."""
    tag = f"[{what}] " if what else ""
    rtol = grad_rtol(weight.dtype) if rtol is None else rtol
    dW64, db64 = reference_grads64(basis, weight, bias, idx, grad_zq)
    g = _f64(grad_zq).abs()
    rows = _f64(basis).abs().index_select(0, idx.detach().cpu().long())
    atol = subnormal_spacing(weight.dtype)
    assert dW is not None, f"{tag}weight got no gradient"
    assert_close_scaled(dW, dW64, g.T @ rows, rtol, f"{tag}dW", atol)
    if bias is not None:
        assert db is not None, f"{tag}bias got no gradient"
        assert_close_scaled(db, db64, g.sum(0), rtol, f"{tag}db", atol)


def reference_layer64(z, basis, weight, bias, idx, grad_out, beta: float = 0.25,
                      legacy: bool = False) -> dict:
    """The SimVQ layer in float64 with the picks ``idx`` given (channel-last, z (N, d)):

        zq = (B W^T + b)[idx];  out = z + sg(zq - z)
        loss = beta * mean((sg(zq) - z)^2) + mean((zq - sg(z))^2)   (weights swapped if legacy)

    and the gradients of ``loss + <grad_out, out>`` by autograd. Returns a dict with
    float64 CPU tensors: loss, out, dz, dW, db (None without bias), and elementwise
    magnitude bounds scale_dz, scale_dW, scale_db of the exact gradients (so a
    tolerance relative to them survives cancellation)."""
    z64 = _f64(z).requires_grad_(True)
    w = _f64(weight).requires_grad_(True)
    b = _f64(bias).requires_grad_(True) if bias is not None else None
    b64 = _f64(basis)
    idx = idx.detach().cpu().long()
    zq = torch.nn.functional.embedding(idx, torch.nn.functional.linear(b64, w, b))
    m = z64.numel()
    commit = torch.mean((zq.detach() - z64) ** 2)
    codebook = torch.mean((zq - z64.detach()) ** 2)
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    loss = w_commit * commit + w_code * codebook
    out = z64 + (zq - z64).detach()
    g_out = _f64(grad_out)
    (loss + (out * g_out).sum()).backward()
    with torch.no_grad():
        diff_mag = zq.abs() + z64.abs()
        g_zq_mag = 2.0 * w_code / max(m, 1) * diff_mag
        rows = b64.abs().index_select(0, idx)
        res = dict(loss=loss.detach(), out=out.detach(), dz=z64.grad, dW=w.grad,
                   db=(b.grad if b is not None else None),
                   scale_dz=g_out.abs() + 2.0 * w_commit / max(m, 1) * diff_mag,
                   scale_dW=g_zq_mag.T @ rows, scale_db=g_zq_mag.sum(0),
                   scale_loss=(w_commit + w_code) * torch.mean(diff_mag ** 2))
    return res


# ---------------------------------------------------------------------------- misc

def sample_rows(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A sorted random subset of min(n, m) row indices of [0, n), always including the
    first and last rows (tile edges are where index arithmetic goes wrong)."""
    if n <= m:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[: max(0, m - 2)]
    rows = torch.cat([rows, torch.tensor([0, n - 1])])
    return torch.unique(rows)


def poison_heap(*numels: int) -> None:
    """Best effort at design.md §3's "outputs are poisoned before a kernel runs".

    The public ops allocate their own outputs, so they cannot be pre-filled. Instead,
    allocate and free blocks of the output sizes filled with garbage (NaN for floats,
    -2^62 for int64): the CPU allocator (glibc malloc) hands the same blocks to the
    next allocations of those sizes, so an element a kernel forgets to write holds
    garbage (an out-of-range index, a NaN distance) and the checks fail, instead of
    holding a lucky zero from a fresh page. Blocks served by fresh mmap pages (very
    large sizes) read as zeros, which the oracle checks also catch unless code 0
    happens to be the right answer.
    """
    junk = []
    for n in numels:
        n = int(n)
        if n <= 0:
            continue
        junk.append(torch.full((n,), -(2 ** 62), dtype=torch.int64))
        junk.append(torch.full((n,), math.nan, dtype=torch.float32))
        junk.append(torch.full((n,), math.nan, dtype=torch.float64))
    del junk
