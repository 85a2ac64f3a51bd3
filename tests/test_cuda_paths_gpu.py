"""The 'cuda' backend's launch-plan paths on a CUDA device, against the float64 oracle.

The CPU checks of the plans are in test_cuda_plan.py; these run the kernels where the
plans branch (skipped without a CUDA device):
- the search with the token tile wholly resident (small d) and partly resident, the
  rest streamed with the codes (d past what fits in the block's share of shared memory:
  bf16/fp16 beyond 384, fp32 beyond 416 on an H100, less on smaller GPUs), with one token
  tile and many code splits, and many token tiles;
- the backward at r = 127, 128 (one column tile, the bias as a column sum), 129, 257
  (several column tiles; the bias only from the first) and r = 1, d across row tiles;
- an index outside [0, K) makes dW and db NaN, never a wrong finite value.
"""
from __future__ import annotations

import os

import pytest
import torch

import oracle
import simvq_kernels as sk
from simvq_kernels import backends as _backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [(torch.bfloat16, None), (torch.float16, None), (torch.float32, "high"),
          (torch.float32, "highest")]
DTYPE_IDS = ["bf16", "fp16", "fp32-tf32", "fp32-highest"]


@pytest.fixture(autouse=True)
def cuda_backend():
    why = _backends.BACKENDS["cuda"].why_not(torch.device("cuda"), torch.float32)
    if why is not None:
        pytest.fail(f"the 'cuda' backend cannot run on this GPU machine: {why}")


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    dt, prec = request.param
    old = torch.get_float32_matmul_precision()
    if prec is not None:
        torch.set_float32_matmul_precision(prec)
    yield dt
    torch.set_float32_matmul_precision(old)


def _seed() -> int:
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(device="cuda", dtype=dtype)


# (N, K, d): one token tile with many code splits, many token tiles; d from one chunk
# to past the resident share (1000 bf16 = 32 chunks, 1000 fp32 = 63 chunks)
SEARCH_SHAPES = [(16, 20000, 40), (100, 3000, 200), (3000, 700, 200), (16, 20000, 1000),
                 (700, 3000, 1000), (300, 129, 520)]


@pytest.mark.parametrize("shape", SEARCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_search_resident_and_streamed_token_tile(dtype, shape):
    n, k, d = shape
    s = _seed()
    z = _randn(n, d, dtype=dtype)
    cb = _randn(k, d, dtype=dtype)
    cb[k // 2] = cb[3]  # an exact duplicate: the lower index wins
    oracle.poison_heap(n)
    idx, dist = sk.nearest_code(z, cb, backend="cuda")
    torch.cuda.synchronize()
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(),
                         oracle.unit_roundoff(dtype, "cuda"),
                         what=f"cuda {dtype} {shape} seed={s}")
    again = sk.nearest_code(z, cb, backend="cuda")
    assert torch.equal(idx, again[0]) and torch.equal(dist, again[1]), f"seed={s}"


@pytest.mark.parametrize("r", [1, 127, 128, 129, 257])
@pytest.mark.parametrize("d", [5, 130])
def test_backward_column_tiles_and_bias(dtype, d, r):
    n, k = 1500, 300
    s = _seed()
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    weight = _randn(d, r, dtype=dtype)
    bias = _randn(d, dtype=dtype)
    idx = torch.randint(0, k, (n,), device="cuda")
    g = _randn(n, d, dtype=dtype)
    oracle.poison_heap(d * r, d)
    dW, db = _backends.BACKENDS["cuda"].quantize_backward(g, basis, idx, weight)
    torch.cuda.synchronize()
    assert dW.shape == (d, r) and db.shape == (d,)
    oracle.check_grads(dW.cpu(), db.cpu(), basis.cpu(), weight.cpu(), bias.cpu(), idx.cpu(),
                       g.cpu(), what=f"cuda {dtype} d={d} r={r} seed={s}")


@pytest.mark.parametrize("r", [128, 129])
def test_backward_out_of_range_index_gives_nan(dtype, r):
    n, k, d = 700, 50, 130
    _seed()
    basis = _randn(k, r, dtype=dtype)
    weight = _randn(d, r, dtype=dtype)
    g = _randn(n, d, dtype=dtype)
    for bad in (-1, k, 2 ** 40):
        idx = torch.randint(0, k, (n,), device="cuda")
        idx[n // 3] = bad
        dW, db = _backends.BACKENDS["cuda"].quantize_backward(g, basis, idx, weight)
        torch.cuda.synchronize()
        assert torch.isnan(dW).all() and torch.isnan(db).all(), (bad, dW, db)
    idx = torch.randint(0, k, (n,), device="cuda")
    dW, db = _backends.BACKENDS["cuda"].quantize_backward(g, basis, idx, weight)
    assert torch.isfinite(dW).all() and torch.isfinite(db).all()
