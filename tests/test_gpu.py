"""GPU backends ('cuda', 'triton') on a CUDA device, against the float64 oracle.

Every test is parametrised over the GPU backends and needs a CUDA device; on a machine
without one the whole module skips ("needs a CUDA device"). On a GPU machine a GPU
backend that is not usable (e.g. an extension built without CUDA kernels) fails the
test, it is not skipped: the acceptance run must exercise both.

What is checked (design.md §3; each check draws fresh random inputs, the seed is in
the message):
- the oracle grid: nearest_code and quantize over shapes that cross every tile, chunk
  and split edge, in bf16, fp16 and fp32 (tf32 and "highest" precision);
- ties: exact duplicate codes (and duplicate basis rows) anywhere in the codebook go
  to the lowest index; well-separated inputs give the oracle's indices exactly;
- the backward (dW, db) against autograd through the float64 reference;
- bad input raises errors naming the argument;
- determinism: bit-identical reruns (forward and backward); for 'cuda', a token's
  result does not depend on the batch it is in (the split-K merge);
- CUDA-graph capture and replay, the current stream, a second device (cuda:1);
- the SimVQ layer end to end (loss, out, dz, dW, db).
"""
from __future__ import annotations

import os

import pytest
import torch

import oracle
import simvq_kernels as sk
from simvq_kernels import backends as _backends
from simvq_kernels import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ("cuda", "triton")
# (dtype, fp32 matmul precision)
DTYPES = [(torch.bfloat16, None), (torch.float16, None), (torch.float32, "high"),
          (torch.float32, "highest")]
DTYPE_IDS = ["bf16", "fp16", "fp32-tf32", "fp32-highest"]

# (N, K, d): tile edges (128 tokens, 128 codes), chunk edges (64 bytes: 32 bf16/fp16 or
# 16 fp32 values of d), many code splits (small N, large K), and d over several chunks
SHAPES = [
    (1, 1, 1),
    (5, 3, 7),
    (128, 128, 32),
    (129, 129, 33),
    (300, 1000, 64),
    (77, 513, 129),
    (1000, 4097, 128),
    (2048, 300, 8),
    (16, 70001, 16),
    (4, 5, 600),
]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    name = request.param
    b = _backends.BACKENDS[name]
    why = b.why_not(torch.device("cuda"), torch.float32)
    if why is not None:
        pytest.fail(f"GPU backend {name!r} cannot run on this GPU machine: {why}")
    return name


@pytest.fixture(params=list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def dtype(request):
    (dt, prec), _ = request.param
    old = torch.get_float32_matmul_precision()
    if prec is not None:
        torch.set_float32_matmul_precision(prec)
    yield dt
    torch.set_float32_matmul_precision(old)


def _seed() -> int:
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def _u(dt) -> float:
    return oracle.unit_roundoff(dt, "cuda")


def _poison(*numels):
    """Allocate and free NaN / garbage blocks of the output sizes on the device, so that
    the caching allocator hands them to the op's outputs: unwritten elements fail."""
    junk = []
    for n in numels:
        if n > 0:
            junk.append(torch.full((n,), float("nan"), device="cuda"))
            junk.append(torch.full((n,), -(2 ** 62), dtype=torch.int64, device="cuda"))
    del junk


def _randn(*shape, dtype, device="cuda"):
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


# ----------------------------------------------------------------- the oracle grid

@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}x{d}" for n, k, d in SHAPES])
def test_nearest_code_oracle_grid(backend, dtype, shape):
    n, k, d = shape
    s = _seed()
    z = _randn(n, d, dtype=dtype)
    cb = _randn(k, d, dtype=dtype)
    _poison(n)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    torch.cuda.synchronize()
    assert idx.device == z.device and dist.device == z.device
    assert dist.dtype == torch.float32
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dtype),
                         what=f"{backend} {dtype} {shape} seed={s}")


@pytest.mark.parametrize("shape", [(5, 3, 7, 7), (129, 129, 33, 20), (300, 1000, 64, 64),
                                   (77, 4097, 128, 96), (16, 70001, 16, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_quantize_oracle_grid(backend, dtype, shape, with_bias):
    n, k, d, r = shape
    s = _seed()
    z = _randn(n, d, dtype=dtype)
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    weight = _randn(d, r, dtype=dtype)
    bias = _randn(d, dtype=dtype) if with_bias else None
    _poison(n, n * d)
    out = ops.quantize(z, basis, weight, bias, backend=backend)
    torch.cuda.synchronize()
    assert out.backend == backend
    oracle.check_quantize(z.cpu(), basis.cpu(), weight.cpu(),
                          None if bias is None else bias.cpu(), out.zq.cpu(),
                          out.indices.cpu(), out.distances.cpu(), _u(dtype),
                          what=f"{backend} {dtype} {shape} bias={with_bias} seed={s}")


def test_large_shape_sampled_rows(backend):
    """The image config's shape (N = 16384, K = 8192, d = 128) in bf16, checked on a
    random subset of rows."""
    s = _seed()
    n, k, d = 16384, 8192, 128
    z = _randn(n, d, dtype=torch.bfloat16)
    cb = _randn(k, d, dtype=torch.bfloat16)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    rows = oracle.sample_rows(n, 512, seed=s)
    zc, cbc = z.cpu(), cb.cpu()
    qmax = float(cbc.double().norm(dim=1).max())
    oracle.check_nearest(zc[rows], cbc, idx.cpu()[rows], dist.cpu()[rows],
                         _u(torch.bfloat16), q_max_norm=qmax, what=f"{backend} seed={s}")


def test_empty_and_tiny(backend, dtype):
    z = _randn(0, 16, dtype=dtype)
    cb = _randn(3, 16, dtype=dtype)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    assert idx.shape == (0,) and dist.shape == (0,) and idx.dtype == torch.int64
    z = _randn(9, 1, dtype=dtype)
    cb = _randn(1, 1, dtype=dtype)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    assert idx.tolist() == [0] * 9
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dtype))


def test_non_contiguous_inputs(backend, dtype):
    s = _seed()
    big = _randn(301, 2 * 70 + 3, dtype=dtype)
    z = big[1:, 3::2]  # offset, strided view (300, 70)
    cbt = _randn(70, 515, dtype=dtype)
    cb = cbt.t()[2:]  # transposed view (513, 70)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dtype),
                         what=f"{backend} seed={s}")


# ------------------------------------------------------------------------- ties

def test_duplicate_codes_go_to_lowest_index(backend, dtype):
    """Copies of codes spread over tiles and code splits; tokens equal to a duplicated
    code (distance 0 to every copy) and random tokens (equal values for every copy)."""
    s = _seed()
    k, d = 9000, 48
    cb = _randn(k, d, dtype=dtype)
    src = [3, 130, 4000, 8000]
    for j, dst in zip(src, ([700, 8998], [131, 255, 5000], [4001, 8800], [8999])):
        cb[dst] = cb[j]
    z = torch.cat([cb[src].repeat(3, 1), cb[[8998, 255, 8800, 8999]],
                   _randn(200, d, dtype=dtype)])
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    want = torch.tensor(src * 4)
    assert idx[:16].cpu().tolist() == want.tolist(), f"seed={s}"
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dtype),
                         what=f"{backend} seed={s}")


def test_duplicate_basis_rows_go_to_lowest_index(backend, dtype):
    s = _seed()
    k, r, d = 5000, 32, 40
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    basis[[1000, 4999]] = basis[7]
    basis[[2000]] = basis[130]
    weight = _randn(d, r, dtype=dtype)
    bias = _randn(d, dtype=dtype)
    q = (basis.double() @ weight.double().t() + bias.double()).to(dtype)
    z = torch.cat([q[[7, 1000, 4999, 130, 2000]], _randn(100, d, dtype=dtype)])
    out = ops.quantize(z, basis, weight, bias, backend=backend)
    assert out.indices[:5].cpu().tolist() == [7, 7, 7, 130, 130], f"seed={s}"
    oracle.check_quantize(z.cpu(), basis.cpu(), weight.cpu(), bias.cpu(), out.zq.cpu(),
                          out.indices.cpu(), out.distances.cpu(), _u(dtype),
                          what=f"{backend} seed={s}")


def test_separated_inputs_give_the_oracle_indices(backend, dtype):
    s = _seed()
    k, d = 3000, 64
    cb = _randn(k, d, dtype=dtype) * 4
    perm = torch.randint(0, k, (1000,))
    z = (cb[perm].float() + 0.01 * torch.randn(1000, d, device="cuda")).to(dtype)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dtype),
                         expect_idx=oracle.oracle_nearest64(z.cpu(), cb.cpu())[0],
                         what=f"{backend} seed={s}")


# --------------------------------------------------------------------- backward

@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (1000, 500, 64, 64), (3000, 4097, 129, 33),
                                   (20000, 1024, 128, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_oracle(backend, dtype, shape):
    n, k, d, r = shape
    s = _seed()
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    weight = _randn(d, r, dtype=dtype)
    bias = _randn(d, dtype=dtype)
    idx = torch.randint(0, k, (n,), device="cuda")
    g = _randn(n, d, dtype=dtype)
    _poison(d * r, d)
    dW, db = _backends.BACKENDS[backend].quantize_backward(g, basis, idx, weight)
    assert dW.dtype == weight.dtype and db.dtype == weight.dtype
    oracle.check_grads(dW.cpu(), db.cpu(), basis.cpu(), weight.cpu(), bias.cpu(), idx.cpu(),
                       g.cpu(), what=f"{backend} {dtype} {shape} seed={s}")


def test_autograd_through_quantize(backend, dtype):
    s = _seed()
    n, k, d, r = 700, 1500, 64, 48
    z = _randn(n, d, dtype=dtype)
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    weight = _randn(d, r, dtype=dtype).requires_grad_(True)
    bias = _randn(d, dtype=dtype).requires_grad_(True)
    zq, idx = sk.simvq_quantize(z, basis, weight, bias, backend=backend)
    g = _randn(n, d, dtype=dtype)
    zq.backward(g)
    oracle.check_grads(weight.grad.cpu(), bias.grad.cpu(), basis.cpu(), weight.detach().cpu(),
                       bias.detach().cpu(), idx.cpu(), g.cpu(), what=f"{backend} seed={s}")


def test_cuda_float64():
    """float64 on the 'cuda' backend: its own CUDA-core path (no tensor cores)."""
    if _backends.BACKENDS["cuda"].install_problem() is not None:
        pytest.fail(_backends.BACKENDS["cuda"].install_problem())
    s = _seed()
    dt = torch.float64
    for n, k, d, r in [(1, 1, 1, 1), (77, 513, 129, 33), (300, 70001, 16, 16), (5, 9, 0, 4)]:
        what = f"cuda float64 {(n, k, d, r)} seed={s}"
        z = _randn(n, d, dtype=dt)
        cb = _randn(k, d, dtype=dt)
        idx, dist = sk.nearest_code(z, cb, backend="cuda")
        assert dist.dtype == torch.float64
        oracle.check_nearest(z.cpu(), cb.cpu(), idx.cpu(), dist.cpu(), _u(dt), what=what)
        basis = _randn(k, r, dtype=dt) * r ** -0.5
        weight = _randn(d, r, dtype=dt)
        bias = _randn(d, dtype=dt)
        out = ops.quantize(z, basis, weight, bias, backend="cuda")
        oracle.check_quantize(z.cpu(), basis.cpu(), weight.cpu(), bias.cpu(), out.zq.cpu(),
                              out.indices.cpu(), out.distances.cpu(), _u(dt), what=what)
        g = _randn(n, d, dtype=dt)
        dW, db = _backends.BACKENDS["cuda"].quantize_backward(g, basis, out.indices, weight)
        oracle.check_grads(dW.cpu(), db.cpu(), basis.cpu(), weight.cpu(), bias.cpu(),
                           out.indices.cpu(), g.cpu(), what=what)


# -------------------------------------------------------------------- bad input

def test_bad_input_names_the_argument(backend):
    z = _randn(10, 8, dtype=torch.float32)
    cb = _randn(20, 8, dtype=torch.float32)
    cases = [
        (lambda: sk.nearest_code(z[0], cb, backend=backend), "z"),
        (lambda: sk.nearest_code(z, cb[:, :5], backend=backend), "codebook"),
        (lambda: sk.nearest_code(z, cb.cpu(), backend=backend), "codebook"),
        (lambda: sk.nearest_code(z, cb.half(), backend=backend), "codebook"),
        (lambda: sk.nearest_code(z.long(), cb, backend=backend), "z"),
        (lambda: sk.nearest_code(z, cb[:0], backend=backend), "codebook"),
    ]
    for fn, name in cases:
        with pytest.raises((TypeError, ValueError, RuntimeError), match=f"`{name}`"):
            fn()


def test_cuda_ops_check_their_arguments():
    """The registered CUDA kernels check their own arguments too (torch.ops.simvq.* can
    be called directly)."""
    if _backends.BACKENDS["cuda"].install_problem() is not None:
        pytest.fail(_backends.BACKENDS["cuda"].install_problem())
    z = _randn(10, 8, dtype=torch.float32)
    cb = _randn(20, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="`codebook`"):
        torch.ops.simvq.nearest_code(z, cb[:, :4])
    with pytest.raises(RuntimeError, match="`z`"):
        torch.ops.simvq.nearest_code(z[0], cb)
    with pytest.raises(RuntimeError, match="`codebook`"):
        torch.ops.simvq.nearest_code(z, cb.half())
    w = _randn(8, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="`weight`"):
        torch.ops.simvq.quantize(z, _randn(20, 5, dtype=torch.float32), w, None)
    with pytest.raises(RuntimeError, match="`indices`"):
        torch.ops.simvq.quantize_backward(z, _randn(20, 4, dtype=torch.float32),
                                          torch.zeros(10, dtype=torch.int32, device="cuda"), w)


# ------------------------------------------------------------------ determinism

def test_bit_identical_reruns(backend, dtype):
    s = _seed()
    n, k, d, r = 3000, 5000, 96, 64
    z = _randn(n, d, dtype=dtype)
    basis = _randn(k, r, dtype=dtype) * r ** -0.5
    weight = _randn(d, r, dtype=dtype)
    bias = _randn(d, dtype=dtype)
    b = _backends.BACKENDS[backend]
    first = b.quantize(z, basis, weight, bias)
    g = _randn(n, d, dtype=dtype)
    grads = b.quantize_backward(g, basis, first[1], weight)
    for _ in range(3):
        again = b.quantize(z, basis, weight, bias)
        for a, e in zip(again, first):
            assert torch.equal(a, e), f"{backend} forward differs on rerun, seed={s}"
        again = b.quantize_backward(g, basis, first[1], weight)
        for a, e in zip(again, grads):
            assert torch.equal(a, e), f"{backend} backward differs on rerun, seed={s}"


def test_cuda_result_does_not_depend_on_the_batch(dtype):
    """The 'cuda' search splits the codes over blocks when the tokens alone do not fill
    the GPU; the merge is exact, so a token gets the same bits alone or in a big batch."""
    if _backends.BACKENDS["cuda"].install_problem() is not None:
        pytest.fail(_backends.BACKENDS["cuda"].install_problem())
    s = _seed()
    z = _randn(40000, 64, dtype=dtype)
    cb = _randn(20000, 64, dtype=dtype)
    big = torch.ops.simvq.nearest_code(z, cb)
    for sl in (slice(0, 3), slice(129, 200), slice(39990, 40000)):
        small = torch.ops.simvq.nearest_code(z[sl], cb)
        assert torch.equal(small[0], big[0][sl]), f"indices differ at {sl}, seed={s}"
        assert torch.equal(small[1], big[1][sl]), f"distances differ at {sl}, seed={s}"


# ------------------------------------------------ graphs, streams, second device

def test_cuda_graph_capture(backend):
    s = _seed()
    n, k, d, r = 1000, 3000, 64, 64
    dt = torch.bfloat16
    z = _randn(n, d, dtype=dt)
    basis = _randn(k, r, dtype=dt) * r ** -0.5
    weight = _randn(d, r, dtype=dt)
    bias = _randn(d, dtype=dt)
    g = _randn(n, d, dtype=dt)
    b = _backends.BACKENDS[backend]

    def step():
        zq, idx, dist = b.quantize(z, basis, weight, bias)
        dW, db = b.quantize_backward(g, basis, idx, weight)
        idx2, dist2 = b.nearest_code(z, zq)
        return zq, idx, dist, dW, db, idx2, dist2

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (Triton compiles, allocator pools)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for _ in range(2):
        z.copy_(_randn(n, d, dtype=dt))
        g.copy_(_randn(n, d, dtype=dt))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, e in zip(static, eager):
            assert torch.equal(a, e), f"{backend}: graph replay differs from eager, seed={s}"


def test_current_stream(backend):
    s = _seed()
    z = _randn(2000, 64, dtype=torch.float16)
    cb = _randn(4000, 64, dtype=torch.float16)
    ref = sk.nearest_code(z, cb, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        z2 = z * 1  # produced on the side stream: a kernel on another stream races it
        out = sk.nearest_code(z2, cb, backend=backend)
    side.synchronize()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), f"seed={s}"


def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a CUDA device: a second one (cuda:1)")
    s = _seed()
    dev = torch.device("cuda:1")
    z = _randn(500, 48, dtype=torch.bfloat16, device=dev)
    basis = _randn(2000, 32, dtype=torch.bfloat16, device=dev)
    weight = _randn(48, 32, dtype=torch.bfloat16, device=dev)
    bias = _randn(48, dtype=torch.bfloat16, device=dev)
    with torch.cuda.device(0):
        out = ops.quantize(z, basis, weight, bias, backend=backend)
        dW, db = _backends.BACKENDS[backend].quantize_backward(z, basis, out.indices, weight)
    assert out.zq.device == dev and out.indices.device == dev and dW.device == dev
    torch.cuda.synchronize(dev)
    oracle.check_quantize(z.cpu(), basis.cpu(), weight.cpu(), bias.cpu(), out.zq.cpu(),
                          out.indices.cpu(), out.distances.cpu(), _u(torch.bfloat16),
                          what=f"{backend} cuda:1 seed={s}")
    oracle.check_grads(dW.cpu(), db.cpu(), basis.cpu(), weight.cpu(), bias.cpu(),
                       out.indices.cpu(), z.cpu(), what=f"{backend} cuda:1 seed={s}")


# ------------------------------------------------------------------------ layer

@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer(backend, dt):
    s = _seed()
    layer = sk.SimVQ(64, 1024, backend=backend).to(device="cuda", dtype=dt)
    z = _randn(4, 50, 64, dtype=dt).requires_grad_(True)
    out, idx, loss = layer(z)
    g = _randn(4, 50, 64, dtype=dt)
    (loss + (out * g).sum()).backward()
    flat_idx = idx.reshape(-1)
    ref = oracle.reference_layer64(z.detach().reshape(-1, 64).cpu(), layer.basis.cpu(),
                                   layer.weight.detach().cpu(), layer.bias.detach().cpu(),
                                   flat_idx.cpu(), g.reshape(-1, 64).cpu())
    rtol = oracle.grad_rtol(dt)
    tag = f"{backend} {dt} seed={s}"
    oracle.assert_close_scaled(loss.detach().cpu().reshape(()), ref["loss"], ref["scale_loss"],
                               rtol, f"[{tag}] loss")
    oracle.assert_close_scaled(z.grad.reshape(-1, 64).cpu(), ref["dz"], ref["scale_dz"], rtol,
                               f"[{tag}] dz", oracle.subnormal_spacing(dt))
    oracle.assert_close_scaled(layer.weight.grad.cpu(), ref["dW"], ref["scale_dW"], rtol,
                               f"[{tag}] dW", oracle.subnormal_spacing(dt))
    oracle.assert_close_scaled(layer.bias.grad.cpu(), ref["db"], ref["scale_db"], rtol,
                               f"[{tag}] db", oracle.subnormal_spacing(dt))
    # the picks themselves
    zf = z.detach().reshape(-1, 64)
    q = ops.quantize(zf, layer.basis, layer.weight.detach(), layer.bias.detach(),
                     backend=backend)
    assert torch.equal(q.indices, flat_idx), tag
    oracle.check_quantize(zf.cpu(), layer.basis.cpu(), layer.weight.detach().cpu(),
                          layer.bias.detach().cpu(), q.zq.cpu(), q.indices.cpu(),
                          q.distances.cpu(), _u(dt), what=tag)
