"""Limits: 64-bit index arithmetic, the largest design shape, the kernels' own limits,
and magnitudes at the edges of float32.

- N * K > 2^31 (N = 70,000, K = 32,768): every index must be right on every row, in
  particular rows n >= 65,536, whose n * K no longer fits in 32 bits. The codebook is a
  randomly permuted 2-D lattice (d = 2, well separated even in float32), so the
  expected index of every token is known exactly and all 70,000 rows are checked; a
  d = 1 random problem is checked on a random subset of rows (always including the
  first and last) with the tiled float64 oracle. simvq_quantize and its backward run at
  the same size. The 'reference' backend is excluded here: it is the official formula
  and builds the N x K matrix (9 GiB at this size) by design.
- K = 262,144, N = 16,384 (the largest design codebook with a full image batch): the
  fused CPU kernel, checked on a row subset with
  the oracle. Peak memory is measured in a child process (ru_maxrss, so other tests'
  allocations do not count): the CPU kernel is O(N + K + threads x tile), bounded here
  by 64 MiB above the inputs (measured: ~12 MiB). The N x K float32 matrix would be
  16 GiB.
- The kernels' limits: K >= 2^31 - 1024 is refused by the CPU kernel with a clear error
  (tests/test_bad_input.py). There is no width limit: d is the GEMM's inner dimension,
  so a very wide d (2^18, 2^20) must work on every backend, and so must a wide basis r.
- Magnitudes: every dtype but float64 is searched in float32. Finite inputs whose
  squared norms overflow float32 (|x| sqrt(d) >~ 2^63) or whose products fall into its
  subnormal range (|x| <~ 2^-64) must still get the right indices (bug 01, fixed: on
  CPU such inputs are searched in float64). Distances are returned in float32 by contract, so there they may be inf (above
  float32's range) or lose precision below its normal range; the test allows exactly
  that and nothing more.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import backends as _backends

import oracle as O

CPU_BACKENDS = [b for b in sk.available_backends()
                if _backends.BACKENDS[b].why_not(torch.device("cpu"), torch.float32) is None]
BIG = [b for b in CPU_BACKENDS if b != "reference"]  # 'reference' builds N x K by design


def _lattice(k, seed):
    """K distinct points of a 2-D integer grid around the origin, randomly permuted:
    (codebook (K, 2) float32, grid spacing 1)."""
    side = int(math.ceil(math.sqrt(k)))
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pts = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1)[:k].float() - side / 2
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    return pts[perm]


def _tokens_near(codebook, n, seed, radius=0.3):
    """n tokens, each within `radius` (< half the grid spacing) of a known code."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, codebook.shape[0], (n,), generator=g)
    noise = (torch.rand(n, codebook.shape[1], generator=g) * 2 - 1) * radius / math.sqrt(2)
    return codebook[target] + noise, target


@pytest.mark.parametrize("backend", BIG)
def test_n_times_k_beyond_2_31_every_row_exact(backend):
    n, k = 70_000, 32_768
    assert n * k > 2 ** 31
    q = _lattice(k, seed=1)
    z, target = _tokens_near(q, n, seed=2)
    O.poison_heap(n, 2 * n)
    idx, dist = sk.nearest_code(z, q, backend=backend)
    wrong = (idx != target).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} wrong indices, first rows {wrong[:5].tolist()}" \
        f" (rows >= 65536 have n*K >= 2^31): got {idx[wrong[:5]].tolist()}, want " \
        f"{target[wrong[:5]].tolist()}"
    assert int(idx[65_536:].max()) > 2 ** 14  # the high rows do reach high indices
    want = O.dist64_rows(z, q, target)
    eps = O.eps_per_token(z, q, 0.0)
    assert bool(((dist.double() - want).abs() <= eps).all())


@pytest.mark.parametrize("backend", BIG)
def test_n_times_k_beyond_2_31_random_d1_subset_oracle(backend):
    n, k = 70_000, 32_768
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 1, generator=g)
    q = torch.randn(k, 1, generator=g)
    idx, dist = sk.nearest_code(z, q, backend=backend)
    rows = torch.cat([O.sample_rows(n, 300, seed=4), torch.arange(65_530, 65_545)]).unique()
    O.check_nearest(z[rows], q, idx[rows], dist[rows], 0.0, what=f"{backend} rows {rows.numel()}")


def test_quantize_and_backward_n_times_k_beyond_2_31():
    """simvq_quantize on the CPU kernel at N*K > 2^31: the codebook is the lattice (basis
    = lattice, weight = identity, bias = 0: the projection is exact), so every index is
    known; zq = Q[idx] exactly; dW and db against the float64 reference."""
    if "cpu" not in CPU_BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    n, k = 70_000, 32_768
    basis = _lattice(k, seed=5)
    z, target = _tokens_near(basis, n, seed=6)
    weight = torch.eye(2).requires_grad_(True)
    bias = torch.zeros(2).requires_grad_(True)
    zq, idx = sk.simvq_quantize(z, basis, weight, bias, backend="cpu")
    assert torch.equal(idx, target)
    assert torch.equal(zq, basis[target])
    grad = torch.randn(n, 2, generator=torch.Generator().manual_seed(7))
    zq.backward(grad)
    O.check_grads(weight.grad, bias.grad, basis, weight, bias, idx, grad, what="cpu")


_PEAK_SCRIPT = textwrap.dedent("""
    import json, os, pickle, resource, sys
    import torch
    import simvq_kernels as sk
    n, k, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    q = torch.randn(k, d, generator=g)
    for b in sys.argv[4:]:  # load the extension, warm the allocator
        sk.nearest_code(z[:2], q[:3], backend=b)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    out = {"base": peak()}
    for b in sys.argv[4:]:  # lowest-memory backend first: ru_maxrss is a high-water mark
        idx, dist = sk.nearest_code(z, q, backend=b)
        out[b] = peak()
        with open(os.environ["SIMVQ_LIMITS_OUT"] + "." + b, "wb") as f:
            pickle.dump((idx, dist), f)
    print(json.dumps(out))
""")



def test_k_262144_n_16384_on_cpu_within_memory_bound(tmp_path):
    """The largest design codebook with a full batch on the fused CPU kernel, d = 8 (the
    N x K x d work is kept small; the index space is the full one): correct on a row
    subset, and the peak memory above the inputs stays within 64 MiB (the N x K float32
    matrix would be 16 GiB). ('chunked' at this size takes ~20 s and is covered at
    N*K > 2^31 above.)"""
    backends = [b for b in ("cpu",) if b in CPU_BACKENDS]
    if "cpu" not in backends:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    n, k, d = 16_384, 262_144, 8
    env = dict(os.environ, SIMVQ_LIMITS_OUT=str(tmp_path / "out"))
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(k), str(d),
                          *backends], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    budget = {"cpu": 64, "chunked": 512}  # MiB above the inputs; N x K fp32 is 16384 MiB
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    q = torch.randn(k, d, generator=g)
    rows = O.sample_rows(n, 200, seed=1)
    import pickle

    for b in backends:
        extra = peaks[b] - peaks["base"]
        assert extra <= budget[b], f"{b}: peak {extra:.0f} MiB above the inputs > {budget[b]}"
        with open(tmp_path / f"out.{b}", "rb") as f:
            idx, dist = pickle.load(f)
        O.check_nearest(z[rows], q, idx[rows], dist[rows], 0.0, what=f"{b} K=262144")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [2 ** 18 + 3, 2 ** 20 + 3])
def test_very_wide_d(backend, d):
    """No tile or index limit on the reduction dimension d. The full §3 criterion holds
    at every width: its accumulation term a(d) = max(1e-6, 4 sqrt(d) 2^-24) grows with
    the length of the float32 sums (a flat 1e-6 failed at d = 262,147 on a CPU whose
    BLAS blocks the sums differently). The picks must be the planted ones."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(5, d, generator=g)
    z = q[torch.tensor([3, 0, 4])] + 0.5 * torch.randn(3, d, generator=g)
    idx, dist = sk.nearest_code(z, q, backend=backend)
    O.check_nearest(z, q, idx, dist, 0.0, expect_idx=torch.tensor([3, 0, 4]), what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wide_basis_r(backend):
    """r = 2^16 + 1 (basis width), d = 3: projection and backward at a wide r."""
    r = 2 ** 16 + 1
    g = torch.Generator().manual_seed(9)
    basis = torch.randn(6, r, generator=g) * r ** -0.5
    weight = torch.randn(3, r, generator=g).requires_grad_(True)
    bias = torch.randn(3, generator=g).requires_grad_(True)
    z = torch.randn(11, 3, generator=g)
    out = sk.quantize(z, basis, weight, bias, backend=backend)
    O.check_quantize(z, basis, weight, bias, out.zq, out.indices, out.distances, 0.0,
                     check_ties=False, what=backend)
    grad = torch.randn(11, 3, generator=g)
    out.zq.backward(grad)
    O.check_grads(weight.grad, bias.grad, basis, weight, bias, out.indices, grad, what=backend)


# ------------------------------------------------------------ float32's range edges

def _check_picks_and_f32_distances(z, q, idx, dist, what):
    """Picks: the §3 criterion. Distances: float32 by contract, so compare with the
    float64 distance rounded to float32 (inf above float32's range), within eps(z) or
    float32's subnormal spacing."""
    picked = O.dist64_rows(z, q, idx.cpu())
    O.check_nearest(z, q, idx, picked, 0.0, check_ties=False, what=what)
    want32 = picked.to(torch.float32).double()
    got = dist.double()
    both_inf = torch.isinf(want32) & torch.isinf(got)
    eps = O.eps_per_token(z, q, 0.0) + O.subnormal_spacing(torch.float32)
    err = (got - want32).abs().where(~both_inf, torch.zeros_like(got))
    bad = ~(err <= torch.maximum(eps, want32.abs() * 2.0 ** -20))
    assert not bool(bad.any()), f"[{what}] distances off in {int(bad.sum())} rows, e.g. " \
        f"got {got[bad][:3].tolist()}, want {want32[bad][:3].tolist()}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exp", [-60, -20, 0, 20, 58])
def test_magnitudes_inside_float32_range(backend, dtype, exp):
    g = torch.Generator().manual_seed(10)
    z = (torch.randn(300, 16, generator=g) * 2.0 ** exp).to(dtype)
    q = (torch.randn(500, 16, generator=g) * 2.0 ** exp).to(dtype)
    idx, dist = sk.nearest_code(z, q, backend=backend)
    O.check_nearest(z, q, idx, dist, O.unit_roundoff(dtype), what=f"{backend} 2^{exp}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_magnitudes_beyond_float32_range_still_pick_right(backend):
    """Bug 01 regression test: finite inputs outside float32's safe window are searched
    in float64 on CPU (see _validate.needs_float64)."""
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        for exp in (-80, -70, 63, 70, 100):
            g = torch.Generator().manual_seed(11)
            z = (torch.randn(300, 16, generator=g) * 2.0 ** exp).to(dtype)
            q = (torch.randn(500, 16, generator=g) * 2.0 ** exp).to(dtype)
            try:
                idx, dist = sk.nearest_code(z, q, backend=backend)
                _check_picks_and_f32_distances(z, q, idx, dist, f"{backend} {dtype} 2^{exp}")
            except AssertionError as e:
                failures.append(str(e).splitlines()[0][:160])
    assert not failures, f"{len(failures)} of 10 cases: {failures[:3]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantize_huge_codebook_still_picks_right(backend):
    """Bug 01 regression test (quantize): the codebook bound r max|B| max|W| + max|b|."""
    g = torch.Generator().manual_seed(12)
    basis = torch.randn(400, 8, generator=g)
    weight = torch.randn(16, 8, generator=g) * 2.0 ** 62
    bias = torch.randn(16, generator=g) * 2.0 ** 62
    z = torch.randn(200, 16, generator=g) * 2.0 ** 63
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    out = sk.quantize(z, basis, w, b, backend=backend)
    q64 = O.project64(basis, weight, bias)
    _check_picks_and_f32_distances(z, q64, out.indices, out.distances, backend)
    assert out.zq.dtype == z.dtype and out.distances.dtype == torch.float32
    # the float64 detour is differentiable: dW = g^T basis[idx], db = sum g, in float32
    grad = torch.randn(200, 16, generator=g)
    out.zq.backward(grad)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    want_w = grad.double().t() @ basis.double()[out.indices]
    torch.testing.assert_close(w.grad.double(), want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), grad.double().sum(0), rtol=1e-5, atol=1e-5)
