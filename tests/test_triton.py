"""The 'triton' backend, run on CPU tensors by Triton's interpreter.

Every check uses the design.md §3 criterion of tests/oracle.py on fresh random inputs.
The kernels are built both as compiled and as interpreted functions
(simvq_kernels/triton/common.py), so this module needs no import order: the backend
serves CPU tensors while TRITON_INTERPRET=1 is set, which a module fixture does (and
undoes). The interpreter checks index arithmetic, masks, splits and merges, not the GPU
compiler: tests/test_kernels_report.py compiles every configuration for sm_90a/sm_80.

The interpreter pays per operation, so shapes cover the edges (N in {0, 1, 17, 333,
2049}, K in {1, 7, 1000, 4099}, d in {1, 3, 64, 100, 128, 129}) without the full product.
"""
from __future__ import annotations

import copy
import logging
import math
import mmap
import zlib

import oracle
import pytest
import torch

import simvq_kernels as sk
from simvq_kernels.backends import BackendUnavailableError
from simvq_kernels.triton import ops as tops
from simvq_kernels.triton.common import SPLIT_K_ENV, cfg
from simvq_kernels.triton.nearest_code import (TABLES, interpreter_uses_dot,
                                               nearest_code_triton, search_config,
                                               table_configs)
from simvq_kernels.triton.quantize_backward import quantize_backward_triton


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """TRITON_INTERPRET=1 for this module only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv(SPLIT_K_ENV, raising=False)
        yield


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _u(dtype, precision="highest"):
    """u of the products the triton backend uses (GPU semantics, also emulated by the
    interpreter: tf32 rounding under "high")."""
    return oracle.unit_roundoff(dtype, "cuda", precision)


# (N, K, d, dtype, float32 matmul precision)
NEAREST_CASES = [
    (0, 7, 3, torch.float32, "highest"),
    (1, 1, 1, torch.float32, "highest"),
    (17, 7, 3, torch.float32, "highest"),
    (17, 4099, 1, torch.float32, "highest"),
    (333, 1000, 64, torch.float32, "highest"),
    (1, 4099, 129, torch.float32, "highest"),
    (2049, 7, 129, torch.float32, "highest"),
    (2049, 1000, 3, torch.float32, "highest"),
    (17, 7, 3, torch.float32, "high"),
    (333, 1000, 64, torch.float32, "high"),
    (1, 4099, 129, torch.float32, "high"),
    (70, 300, 128, torch.float32, "high"),
    (17, 7, 3, torch.bfloat16, "highest"),
    (333, 1000, 64, torch.bfloat16, "highest"),
    (333, 1000, 100, torch.bfloat16, "highest"),
    (2049, 7, 129, torch.bfloat16, "highest"),
    (1, 4099, 1, torch.bfloat16, "highest"),
    (0, 1, 64, torch.bfloat16, "highest"),
    (17, 4099, 3, torch.float16, "highest"),
    (333, 1000, 129, torch.float16, "highest"),
    (2049, 1, 64, torch.float16, "highest"),
]


@pytest.mark.parametrize("n,k,d,dtype,prec", NEAREST_CASES,
                         ids=[f"{n}x{k}x{d}-{str(t)[6:]}-{p}" for n, k, d, t, p in NEAREST_CASES])
def test_nearest_code(n, k, d, dtype, prec, matmul_precision):
    matmul_precision(prec)
    g = _gen(n, k, d, str(dtype), prec)
    z = torch.randn(n, d, generator=g).to(dtype)
    q = (torch.randn(k, d, generator=g) * 1.5).to(dtype)
    oracle.poison_heap(n, 2 * n)
    idx, dist = sk.nearest_code(z, q, backend="triton")
    oracle.check_nearest(z, q, idx, dist, _u(dtype, prec), what=f"triton {dtype} {prec}")


# (N, K, d, r, dtype, bias)
QUANTIZE_CASES = [
    (17, 7, 3, 5, torch.float32, True),
    (333, 1000, 64, 64, torch.float32, False),
    (1, 4099, 1, 3, torch.float32, True),
    (333, 1000, 64, 64, torch.bfloat16, True),
    (17, 7, 129, 33, torch.bfloat16, False),
    (333, 1000, 3, 64, torch.float16, True),
    (0, 7, 3, 5, torch.float16, True),
]


@pytest.mark.parametrize("n,k,d,r,dtype,bias", QUANTIZE_CASES)
def test_quantize_and_grads(n, k, d, r, dtype, bias):
    g = _gen("q", n, k, d, r, str(dtype), bias)
    z = torch.randn(n, d, generator=g).to(dtype)
    basis = torch.randn(k, r, generator=g).to(dtype)
    weight = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(d, generator=g)).to(dtype).requires_grad_(True) if bias else None
    zq, idx, dist = tops.quantize(z, basis, weight, b)
    oracle.check_quantize(z, basis, weight, b, zq, idx, dist, _u(dtype), what=f"{dtype}")
    grad = torch.randn(n, d, generator=g).to(dtype)
    zq.backward(grad)
    oracle.check_grads(weight.grad, None if b is None else b.grad, basis, weight, b, idx,
                       grad, what=f"{dtype}")
    # the public op returns the same picks
    zq2, idx2 = sk.simvq_quantize(z, basis, weight.detach(), None if b is None else b.detach(),
                                  backend="triton")
    assert torch.equal(idx2, idx) and torch.equal(zq2, zq.detach())


def test_float64_is_refused():
    z, q = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        sk.nearest_code(z, q, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        sk.simvq_quantize(z, q, torch.randn(3, 3, dtype=torch.float64), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        nearest_code_triton(z, q)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        sk.nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="triton")


# --------------------------------------------------------- ties and exact duplicates

SMALL = cfg(BLOCK_N=16, BLOCK_K=16, BLOCK_D=32, SINGLE_D=True)
SMALL_LOOP = cfg(BLOCK_N=16, BLOCK_K=16, BLOCK_D=16, SINGLE_D=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config,splits", [(SMALL, 1), (SMALL, 5), (SMALL_LOOP, 3), (None, None)])
def test_exact_ties_go_to_the_lowest_index(dtype, config, splits):
    """Small integers: every distance is exact in every dtype, so many codes tie exactly;
    the pick must be the oracle's lowest index, across chunks, splits and d chunks."""
    g = _gen("ties", str(dtype), splits)
    k, d, n = 77, 19, 40
    q = torch.randint(-2, 3, (k, d), generator=g).to(dtype)
    q[40], q[60], q[76] = q[3], q[3], q[17]  # exact duplicates in later chunks/splits
    z = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    z[:8] = q[[3, 40, 60, 17, 76, 3, 60, 76]]  # tokens sitting on duplicated codes
    idx, dist = nearest_code_triton(z, q, config=config, splits=splits)
    o_idx, o_dist = oracle.oracle_nearest64(z, q)
    assert torch.equal(idx, o_idx), (idx[idx != o_idx], o_idx[idx != o_idx])
    assert torch.equal(dist.double(), o_dist)
    oracle.check_nearest(z, q, idx, dist, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicate_codes_random_values(dtype, matmul_precision):
    """Exact copies of random codes (products not exact) at positions in different
    chunks and splits: every copy is computed alike, so the lowest copy wins."""
    matmul_precision("high" if dtype == torch.float32 else "highest")
    g = _gen("dups", str(dtype))
    k, d = 300, 33
    q = torch.randn(k, d, generator=g)
    for src, dst in ((5, 150), (5, 299), (77, 78), (200, 201), (0, 255)):
        q[dst] = q[src]
    q = q.to(dtype)
    picks = torch.tensor([150, 299, 78, 201, 255, 5, 77, 0])
    z = (q[picks].float() + 1e-3 * torch.randn(len(picks), d, generator=g)).to(dtype)
    for config, splits in ((SMALL_LOOP, 4), (None, None)):
        idx, dist = nearest_code_triton(z, q, config=config, splits=splits)
        oracle.check_nearest(z, q, idx, dist, _u(dtype, torch.get_float32_matmul_precision()),
                             expect_idx=torch.tensor([5, 5, 77, 200, 0, 5, 77, 0]))


def test_duplicate_basis_rows_in_quantize():
    g = _gen("dupbasis")
    k, r, d = 200, 7, 1  # d = 1: the projection is a matrix-vector product per row
    basis = torch.randn(k, r, generator=g)
    basis[150], basis[199], basis[64] = basis[3], basis[3], basis[10]
    weight, bias = torch.randn(d, r, generator=g), torch.randn(d, generator=g)
    z = (basis[[150, 199, 64, 3, 10]] @ weight.t() + bias)
    zq, idx, dist = tops.quantize(z, basis, weight, bias)
    oracle.check_quantize(z, basis, weight, bias, zq, idx, dist, 0.0,
                          expect_idx=torch.tensor([3, 3, 10, 3, 10]))


# ------------------------------------------- every configuration a GPU would pick

def _gpu_configs():
    """Every distinct configuration of every tile table (a table shared by both
    architectures once), with the dtype and matmul precision that pick it."""
    seen, out = set(), []
    for (arch, kind), table in TABLES.items():
        for c in table_configs(table):
            if (kind, c) in seen:
                continue
            seen.add((kind, c))
            out.append((arch, kind, c))
    return out


GPU_CONFIGS = _gpu_configs()
_KIND_DTYPE = {"tc": (torch.bfloat16, "highest"), "tf32": (torch.float32, "high"),
               "ieee": (torch.float32, "highest")}


def _edge_shape(c):
    """N, K, d that divide none of the configuration's tiles: two token tiles (the last
    with 3 rows), six code tiles (the last with 7 codes: three splits of two tiles when
    3 are asked for), and for a whole-d tile d = BLOCK_D - 3, for a d loop three chunks
    (the last with 5 columns)."""
    b = c.constexprs()
    d = max(1, b["BLOCK_D"] - 3) if b["SINGLE_D"] else 2 * b["BLOCK_D"] + 5
    return b["BLOCK_N"] + 3, 5 * b["BLOCK_K"] + 7, d


def test_interpreter_tiles_fit_its_plain_sum_path():
    """The interpreter's own tiles run plain sums (exact duplicates tie) at every d."""
    for d in (1, 16, 17, 64, 65, 100, 128, 129, 512):
        c = search_config(d, torch.float32, "ieee", interpreted=True)
        assert not interpreter_uses_dot(c), (d, c.label())


@pytest.mark.parametrize("arch,kind,config", GPU_CONFIGS,
                         ids=[f"{a}-{k}-{c.label().replace(' ', '-')}"
                              for a, k, c in GPU_CONFIGS])
def test_every_gpu_tile_configuration(arch, kind, config, matmul_precision):
    """Each configuration of the GPU tile tables, run by the interpreter on edge shapes
    with splits 1 and 3: small-integer inputs (every distance exact in every dtype, so
    exact duplicates and ties abound) must give the oracle's lowest index and exact
    distances, and random inputs must pass design.md §3. Configurations whose plain-sum
    product exceeds the interpreter's tensor limit run with tl.dot (numpy.matmul),
    which is exact on these integers too."""
    _check_configuration(arch, kind, config, matmul_precision, "cpu")


def _check_configuration(arch, kind, config, matmul_precision, device):
    dtype, prec = _KIND_DTYPE[kind]
    matmul_precision(prec)
    n, k, d = _edge_shape(config)
    bk = config.constexprs()["BLOCK_K"]
    g = _gen("gpu-config", arch, kind, config.label())
    q = torch.randint(-2, 3, (k, d), generator=g).to(dtype)
    # exact duplicates in the last code tile and in other splits, tokens sitting on them
    for src, dst in ((3, k - 1), (3, 2 * bk + 1), (bk + 5, 4 * bk + 2), (0, k - 4)):
        q[dst] = q[src]
    z = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    z[:4] = q[[k - 1, 2 * bk + 1, 4 * bk + 2, k - 4]]
    z[-3:] = q[[3, bk + 5, 0]]  # the last, partial token tile
    o_idx, o_dist = oracle.oracle_nearest64(z, q)
    assert o_idx[:4].tolist() == [3, 3, bk + 5, 0]
    for splits in (1, 3):
        idx, dist = nearest_code_triton(z.to(device), q.to(device), config=config,
                                        splits=splits)
        idx, dist = idx.cpu(), dist.cpu()
        bad = idx != o_idx
        assert not bool(bad.any()), (splits, interpreter_uses_dot(config), idx[bad],
                                     o_idx[bad])
        assert torch.equal(dist.double(), o_dist), splits
    zr = torch.randn(n, d, generator=g).to(dtype)
    qr = (1.5 * torch.randn(k, d, generator=g)).to(dtype)
    idx, dist = nearest_code_triton(zr.to(device), qr.to(device), config=config, splits=3)
    oracle.check_nearest(zr, qr, idx.cpu(), dist.cpu(), _u(dtype, prec),
                         what=f"{arch} {kind} {config.label()}")


# ------------------------------------------------------------------------- split-K

@pytest.mark.parametrize("forced", ["1", "3", "64"])
def test_split_k_forced_on_and_off(forced, monkeypatch):
    g = _gen("split", forced)
    z, q = torch.randn(40, 20, generator=g), torch.randn(1000, 20, generator=g)
    idx_auto, dist_auto = sk.nearest_code(z, q, backend="triton")
    monkeypatch.setenv(SPLIT_K_ENV, forced)
    idx, dist = sk.nearest_code(z, q, backend="triton")
    oracle.check_nearest(z, q, idx, dist, 0.0)
    # every (token, code) value is computed alike whatever the split: same answer
    assert torch.equal(idx, idx_auto) and torch.equal(dist, dist_auto)


def test_split_k_env_rejects_garbage(monkeypatch):
    monkeypatch.setenv(SPLIT_K_ENV, "zero")
    with pytest.raises(ValueError, match=SPLIT_K_ENV):
        nearest_code_triton(torch.randn(3, 2), torch.randn(4, 2))


# ---------------------------------------------------------- views and big offsets

def test_non_contiguous_and_offset_views():
    g = _gen("views")
    zbig = torch.randn(90, 50, generator=g)
    z = zbig[7:, ::3][:, :16]  # offset, column stride 3
    qT = torch.randn(16, 300, generator=g)
    q = qT.t()  # (300, 16) with strides (1, 300)
    idx, dist = sk.nearest_code(z, q, backend="triton")
    oracle.check_nearest(z, q, idx, dist, 0.0)
    basis = torch.randn(300, 24, generator=g)[:, ::2]  # (300, 12), stride (24, 2)
    wT = torch.randn(12, 16, generator=g) / 4
    weight = wT.t().requires_grad_(True)  # (16, 12), strides (1, 16)
    bias = torch.randn(32, generator=g)[::2].requires_grad_(True)
    zq, idx, dist = tops.quantize(z, basis, weight, bias)
    oracle.check_quantize(z, basis, weight, bias, zq, idx, dist, 0.0)
    grad = torch.randn(16, 83, generator=g).t()  # non-contiguous upstream gradient
    zq.backward(grad)
    oracle.check_grads(weight.grad, bias.grad, basis, weight, bias, idx, grad)


def _huge_view(rows, cols, row_stride, dtype, g):
    """A (rows, cols) view whose last rows lie more than 2^31 elements past its first:
    int32 offset arithmetic would wrap. The storage is a 16 GiB sparse anonymous
    mapping (only touched pages are backed) and the view starts in its middle, so a
    wrapped (negative) offset still reads mapped memory (zeros) and fails the check
    instead of crashing."""
    mm = mmap.mmap(-1, 2**34, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
    big = torch.frombuffer(mm, dtype=dtype)
    half = big.numel() // 2
    assert (rows - 1) * row_stride + cols < half
    v = big[half:].as_strided((rows, cols), (row_stride, 1))
    v.copy_(torch.randn(rows, cols, generator=g).to(dtype))
    return v, mm


def test_offsets_past_2_to_the_31_are_int64():
    """Token rows, code rows and gathered basis rows 2^31+ elements from the base
    (row stride ~2^30 elements, 4 rows): the kernels must address them in int64."""
    g = _gen("int64")
    dtype = torch.float16
    z, mz = _huge_view(4, 5, 2**30 + 3, dtype, g)
    q, mq = _huge_view(3, 5, 2**30 + 1, dtype, g)
    idx, dist = nearest_code_triton(z, q)
    oracle.check_nearest(z, q, idx, dist, 0.0)
    basis, mb = _huge_view(4, 6, 2**30 + 7, dtype, g)
    grad, mg = _huge_view(4, 5, 2**30 + 5, dtype, g)
    weight = torch.randn(5, 6, generator=g).to(dtype)
    rows = torch.tensor([3, 2, 3, 1])
    dw, db = quantize_backward_triton(grad, basis, rows, weight)
    oracle.check_grads(dw, db, basis, weight, torch.zeros(5, dtype=dtype), rows, grad)
    del z, q, basis, grad
    for m in (mz, mq, mb, mg):
        m.close()


# ----------------------------------------------------------------- backward alone

@pytest.mark.parametrize("n,k,d,r,dtype", [(0, 5, 3, 4, torch.float32),
                                           (1, 7, 3, 1, torch.float32),
                                           (2049, 1000, 64, 64, torch.bfloat16),
                                           (333, 50, 129, 17, torch.float16),
                                           (333, 4099, 17, 129, torch.float32)])
def test_quantize_backward(n, k, d, r, dtype):
    g = _gen("bwd", n, k, d, r, str(dtype))
    grad = torch.randn(n, d, generator=g).to(dtype)
    basis = torch.randn(k, r, generator=g).to(dtype)
    weight = torch.randn(d, r, generator=g).to(dtype)
    idx = torch.randint(0, k, (n,), generator=g)
    for splits in (1, 3):
        dw, db = quantize_backward_triton(grad, basis, idx, weight, splits=splits)
        assert dw.dtype == weight.dtype and db.dtype == weight.dtype
        oracle.check_grads(dw, db, basis, weight, torch.zeros(d, dtype=dtype), idx, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_index_out_of_range_gives_nan(dtype):
    """The 'cuda' backend's contract: an index outside [0, K) makes grad_weight and
    grad_bias NaN (never a finite wrong value), without reading outside the basis.
    The basis is a view in the middle of a larger buffer whose neighbours are huge:
    a gather past either end would give a finite, wrong gradient or an inf."""
    g = _gen("bwd-range", str(dtype))
    n, k, d, r = 50, 9, 5, 6
    store = torch.full((3 * k, r), 1e30).to(dtype)
    basis = store[k:2 * k]
    basis.copy_(torch.randn(k, r, generator=g).to(dtype))
    grad = torch.randn(n, d, generator=g).to(dtype)
    weight = torch.randn(d, r, generator=g).to(dtype)
    good = torch.randint(0, k, (n,), generator=g)
    dw, db = quantize_backward_triton(grad, basis, good, weight)
    assert bool(torch.isfinite(dw).all() and torch.isfinite(db).all())
    for bad in (-1, k, k + 3, -k, 2**40):
        idx = good.clone()
        idx[n // 2] = bad
        for splits in (1, 3):
            dw, db = quantize_backward_triton(grad, basis, idx, weight, splits=splits)
            assert bool(torch.isnan(dw).all()), (bad, splits, dw)
            assert bool(torch.isnan(db).all()), (bad, splits, db)


# ----------------------------------------------------------------- the SimVQ layer

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_end_to_end(dtype):
    torch.manual_seed(7)
    layer = sk.SimVQ(64, 1000, basis_dim=48, backend="triton").to(dtype)
    g = _gen("layer", str(dtype))
    with torch.no_grad():
        q64 = oracle.project64(layer.basis, layer.weight, layer.bias)
    pick = torch.randint(0, 1000, (4 * 9,), generator=g)
    z64 = q64[pick] + 0.1 * q64.abs().mean() * torch.randn(36, 64, generator=g,
                                                           dtype=torch.float64)
    z = z64.reshape(4, 9, 64).to(dtype).requires_grad_(True)
    out, idx, loss = layer(z)
    assert layer.last_backend == "triton"
    z_flat = z.detach().reshape(-1, 64)
    flat_idx = idx.reshape(-1)
    extra = oracle.projection_eps(z_flat, layer.basis, layer.weight, layer.bias)[0]
    eps = oracle.eps_per_token(z_flat, q64, _u(dtype)) + extra
    gap = oracle.dist64_rows(z_flat, q64, flat_idx) - oracle.oracle_nearest64(z_flat, q64)[1]
    assert bool((gap <= eps).all())
    grad_out = torch.randn(z.shape, generator=g, dtype=torch.float64)
    (loss + (out * grad_out.to(dtype)).sum()).backward()
    ref = oracle.reference_layer64(z_flat, layer.basis, layer.weight, layer.bias, flat_idx,
                                   grad_out.reshape(-1, 64))
    rtol, atol = oracle.grad_rtol(dtype), oracle.subnormal_spacing(dtype)
    oracle.assert_close_scaled(loss.detach().reshape(()), ref["loss"], ref["scale_loss"],
                               4 * rtol, "loss", atol)
    oracle.assert_close_scaled(z.grad.reshape(-1, 64), ref["dz"], ref["scale_dz"], rtol,
                               "dz", atol)
    oracle.assert_close_scaled(layer.weight.grad, ref["dW"], ref["scale_dW"], rtol, "dW",
                               atol)
    oracle.assert_close_scaled(layer.bias.grad, ref["db"], ref["scale_db"], rtol, "db", atol)


# ------------------------------------------------------------------ torch.compile

def _opcheck_inputs(g):
    z, cb = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)
    basis = torch.randn(30, 5, generator=g)
    w = torch.randn(6, 5, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    return z, cb, basis, w, b


def test_opcheck_every_op():
    from torch.library import opcheck
    g = _gen("opcheck")
    z, cb, basis, w, b = _opcheck_inputs(g)
    opcheck(torch.ops.simvq_triton.nearest_code.default, (z, cb))
    opcheck(torch.ops.simvq_triton.nearest_code_cpu.default, (z, cb))
    opcheck(torch.ops.simvq_triton.quantize.default, (z, basis, w, b))
    opcheck(torch.ops.simvq_triton.quantize.default, (z, basis, w, None))
    opcheck(torch.ops.simvq_triton.quantize_cpu.default, (z, basis, w.detach(), b.detach()))
    idx = torch.randint(0, 30, (40,), generator=g)
    gz = torch.randn(40, 6, generator=g)
    opcheck(torch.ops.simvq_triton.quantize_backward.default, (gz, basis, idx, w.detach()))
    opcheck(torch.ops.simvq_triton.quantize_backward_cpu.default,
            (gz, basis, idx, w.detach()))


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(3)
    layer = sk.SimVQ(16, 100, backend="triton")
    z = torch.randn(2, 5, 16)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    out_c, idx_c, loss_c = compiled(z.clone().requires_grad_(True))
    out_e, idx_e, loss_e = layer(z.clone().requires_grad_(True))
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    params_c = dict(compiled._orig_mod.named_parameters())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(params_c[name].grad, p.grad)

    def ops_only(z, cb):
        return sk.nearest_code(z, cb, backend="triton")

    cb = torch.randn(50, 16)
    i_c, d_c = torch.compile(ops_only, backend="aot_eager", fullgraph=True)(z[0], cb)
    i_e, d_e = ops_only(z[0], cb)
    assert torch.equal(i_c, i_e) and torch.equal(d_c, d_e)


def test_cuda_path_traces_into_triton_kernels(monkeypatch):
    """On CUDA tensors the ops are triton_ops: AOTAutograd decomposes them into the
    Triton kernel calls Inductor compiles. Traced here with fake CUDA tensors (no GPU)."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    import simvq_kernels.triton.nearest_code as nc
    import simvq_kernels.triton.quantize_backward as qb
    monkeypatch.setattr(nc, "num_sms", lambda device: 132)
    monkeypatch.setattr(nc, "gpu_arch", lambda device: "sm_90")
    monkeypatch.setattr(qb, "num_sms", lambda device: 132)
    # without a GPU driver, the mutation analysis falls back to "every input is
    # mutated" (correct, merely conservative) and logs a warning
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm.code)
        return gm

    def layer_step(z, basis, w, b):
        zq, idx, dist = torch.ops.simvq_triton.quantize(z, basis, w, b)
        idx2, dist2 = torch.ops.simvq_triton.nearest_code(z, zq)
        dw, db = torch.ops.simvq_triton.quantize_backward(zq, basis, idx2, w)
        return dw.float().sum() + db.float().sum() + dist.sum()

    # forward only: the autograd engine wants a CUDA context for a backward pass
    with FakeTensorMode():
        z = torch.empty(300, 128, device="cuda", dtype=torch.bfloat16)
        basis = torch.empty(1000, 128, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(128, 128, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(128, device="cuda", dtype=torch.bfloat16)
        aot_function(layer_step, fw_compiler=keep)(z, basis, w, b)
    assert len(graphs) == 1
    # quantize: projection, search, ||z||^2; nearest_code: ||Q||^2, search, ||z||^2;
    # the gather-GEMM: 7 kernel calls and no opaque op left
    assert graphs[0].count("triton_kernel_wrapper_functional(") == 7, graphs[0]
    assert "simvq_triton" not in graphs[0]


# ------------------------------------------------------- on a GPU (compiled kernels)
# These run the compiled kernels on CUDA tensors (skipped without a CUDA device); the
# interpreter is switched off for them (TRITON_INTERPRET also changes how Triton's
# compiler evaluates constexpr functions).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


CUDA_CASES = [
    (16384, 1024, 128, torch.bfloat16, "highest"),
    (16384, 1024, 128, torch.float32, "high"),
    (1500, 8192, 512, torch.float32, "highest"),
    (1500, 8192, 512, torch.bfloat16, "highest"),
    (333, 4099, 3, torch.float16, "highest"),
    (1, 262144, 32, torch.bfloat16, "highest"),
    (2049, 65536, 64, torch.float32, "high"),
    (17, 7, 129, torch.float16, "highest"),
]


@needs_cuda
@pytest.mark.parametrize("n,k,d,dtype,prec", CUDA_CASES,
                         ids=[f"{n}x{k}x{d}-{str(t)[6:]}-{p}" for n, k, d, t, p in CUDA_CASES])
def test_cuda_nearest_code(n, k, d, dtype, prec, matmul_precision, compiled_triton):
    matmul_precision(prec)
    g = _gen("cuda", n, k, d, str(dtype), prec)
    z = torch.randn(n, d, generator=g).to(dtype).cuda()
    q = (1.5 * torch.randn(k, d, generator=g)).to(dtype).cuda()
    idx, dist = sk.nearest_code(z, q, backend="triton")
    rows = oracle.sample_rows(n, 256)
    oracle.check_nearest(z.cpu()[rows], q.cpu(), idx.cpu()[rows], dist.cpu()[rows],
                         _u(dtype, prec), what=f"cuda {dtype} {prec}")


@needs_cuda
@pytest.mark.parametrize("arch,kind,config", GPU_CONFIGS,
                         ids=[f"{a}-{k}-{c.label().replace(' ', '-')}"
                              for a, k, c in GPU_CONFIGS])
def test_cuda_every_tile_configuration_of_this_gpu(arch, kind, config, matmul_precision,
                                                  compiled_triton):
    """The interpreter's test of every tile configuration, compiled for this GPU: the
    rows of its architecture's tables on edge shapes, splits 1 and 3, exact ties."""
    from simvq_kernels.triton.nearest_code import gpu_arch

    if arch != gpu_arch(torch.device("cuda")):
        pytest.skip(f"a {arch} row; this GPU takes the {gpu_arch(torch.device('cuda'))} "
                    "tables")
    _check_configuration(arch, kind, config, matmul_precision, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype,prec", [(torch.bfloat16, "highest"), (torch.float16, "highest"),
                                        (torch.float32, "high"), (torch.float32, "highest")])
def test_cuda_backward_index_out_of_range_gives_nan(dtype, prec, matmul_precision,
                                                    compiled_triton):
    """The out-of-range contract on the device (the 'cuda' backend's): NaN gradients,
    no out-of-bounds read (compute-sanitizer's memcheck runs this file in run.sh)."""
    matmul_precision(prec)
    g = _gen("cuda-bwd-range", str(dtype))
    n, k, d, r = 3000, 50, 128, 64
    basis = torch.randn(k, r, generator=g).to(dtype).cuda()
    grad = torch.randn(n, d, generator=g).to(dtype).cuda()
    weight = torch.randn(d, r, generator=g).to(dtype).cuda()
    for bad in (-1, k, 2**40):
        idx = torch.randint(0, k, (n,), generator=g)
        idx[n // 3] = bad
        dw, db = quantize_backward_triton(grad, basis, idx.cuda(), weight)
        assert bool(torch.isnan(dw).all() and torch.isnan(db).all()), bad


@needs_cuda
@pytest.mark.parametrize("dtype,prec", [(torch.bfloat16, "highest"), (torch.float16, "highest"),
                                        (torch.float32, "high"), (torch.float32, "highest")])
def test_cuda_duplicates_tie_to_the_lowest_index(dtype, prec, matmul_precision,
                                                 compiled_triton, monkeypatch):
    """The tensor cores compute every code alike wherever it sits in a tile: exact
    copies of a code in other tiles and splits must lose to the first copy."""
    matmul_precision(prec)
    g = _gen("cuda-dups", str(dtype), prec)
    k, d = 5000, 128
    q = torch.randn(k, d, generator=g)
    pairs = ((5, 150), (5, 4999), (77, 78), (200, 201), (0, 2555), (1000, 3001))
    for src, dst in pairs:
        q[dst] = q[src]
    q = q.to(dtype)
    picks = torch.tensor([dst for _, dst in pairs] + [src for src, _ in pairs])
    expect = torch.tensor([src for src, _ in pairs] * 2)
    z = (q[picks].float() + 1e-3 * torch.randn(len(picks), d, generator=g)).to(dtype)
    for split in ("1", "7", "auto"):
        monkeypatch.setenv(SPLIT_K_ENV, split)
        idx, dist = sk.nearest_code(z.cuda(), q.cuda(), backend="triton")
        oracle.check_nearest(z, q, idx.cpu(), dist.cpu(), _u(dtype, prec), expect_idx=expect)
    basis = torch.randn(k, 64, generator=g).to(dtype)
    for src, dst in pairs:
        basis[dst] = basis[src]
    w = (torch.randn(d, 64, generator=g) / 8).to(dtype)
    b = torch.randn(d, generator=g).to(dtype)
    z2 = (oracle.project64(basis, w, b)[picks] + 1e-3).to(dtype)
    zq, idx, dist = tops.quantize(z2.cuda(), basis.cuda(), w.cuda(), b.cuda())
    assert torch.equal(idx.cpu(), expect)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_quantize_and_grads(dtype, compiled_triton):
    g = _gen("cuda-q", str(dtype))
    n, k, d, r = 4096, 16384, 128, 128
    z = torch.randn(n, d, generator=g).to(dtype)
    basis = torch.randn(k, r, generator=g).to(dtype)
    weight = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(dtype)
    bias = (0.3 * torch.randn(d, generator=g)).to(dtype)
    w, b = weight.cuda().requires_grad_(True), bias.cuda().requires_grad_(True)
    zq, idx, dist = tops.quantize(z.cuda(), basis.cuda(), w, b)
    rows = oracle.sample_rows(n, 256)
    oracle.check_quantize(z[rows], basis, weight, bias, zq.detach().cpu()[rows],
                          idx.cpu()[rows], dist.cpu()[rows], _u(dtype))
    grad = torch.randn(n, d, generator=g).to(dtype)
    zq.backward(grad.cuda())
    oracle.check_grads(w.grad.cpu(), b.grad.cpu(), basis, weight, bias, idx.cpu(), grad)


@needs_cuda
def test_cuda_offsets_past_2_to_the_31(compiled_triton, monkeypatch):
    """N x d and splits x N past 2^31 elements on the device (about 25 GB)."""
    free, _ = torch.cuda.mem_get_info()
    assert free > 40 * 2**30, "needs a GPU with 40 GiB free (H100/H200)"
    n, d, k = 2**24 + 77, 128, 130 * 128
    g = torch.Generator(device="cuda").manual_seed(5)
    z = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(k, d, device="cuda", dtype=torch.bfloat16, generator=g)
    monkeypatch.setenv(SPLIT_K_ENV, "130")  # splits x N > 2^31 in the partial buffers
    idx, dist = sk.nearest_code(z, q, backend="triton")
    rows = torch.cat([oracle.sample_rows(n, 64), torch.arange(n - 64, n)])
    oracle.check_nearest(z[rows.cuda()].cpu(), q.cpu(), idx[rows.cuda()].cpu(),
                         dist[rows.cuda()].cpu(), _u(torch.bfloat16))


@needs_cuda
def test_cuda_inductor_fullgraph_matches_eager(compiled_triton):
    torch.manual_seed(3)
    layer = sk.SimVQ(128, 4096, backend="triton").cuda()
    z = torch.randn(8, 256, 128, device="cuda")
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True)
    out_c, idx_c, loss_c = compiled(z)
    out_e, idx_e, loss_e = layer(z)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(loss_c, loss_e)


@needs_cuda
def test_cuda_graph_capture(compiled_triton):
    """No autotuning, no host synchronisation: the ops can be captured in a CUDA graph."""
    z = torch.randn(1000, 64, device="cuda")
    q = torch.randn(5000, 64, device="cuda")
    idx0, dist0 = tops.nearest_code(z, q)  # compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, dist = tops.nearest_code(z, q)
    z.copy_(torch.randn(1000, 64, device="cuda"))
    graph.replay()
    idx_e, dist_e = tops.nearest_code(z, q)
    assert torch.equal(idx, idx_e) and torch.equal(dist, dist_e)
