"""Core correctness: every backend available on CPU against the float64 oracle.

The criterion is design.md §3 (see tests/oracle.py): a pick passes if its exact distance
is within eps(z) of the exact minimum, and the returned distance is within eps(z) of the
exact distance of the pick. Index equality is asserted only where the inputs make it
exact (well-separated codes, exact duplicates). Inputs are fresh random draws, outputs of
the compiled ops are checked for full coverage (no unwritten element survives the check
because every index and distance is verified).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import simvq_kernels as sk
from simvq_kernels import reference

from .oracle import check_grads, check_nearest, unit_roundoff as u_for

BACKENDS = ["reference", "chunked", "cpu"]


def test_extension_is_built_and_loaded():
    # CI builds the extension; a missing one must fail here, not skip the cpu backend.
    assert "cpu" in sk.available_backends(), sk.backend_status()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n, k, d, seed, dtype=torch.float32):
    g = _gen(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    cb = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return z.to(dtype), cb.to(dtype)


GRID_N = [0, 1, 333, 4096]
GRID_K = [1, 7, 1000, 65537]
GRID_D = [1, 3, 64, 129]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", GRID_D)
@pytest.mark.parametrize("k", GRID_K)
@pytest.mark.parametrize("n", GRID_N)
def test_nearest_code_grid(backend, n, k, d):
    z, cb = _inputs(n, k, d, seed=1000 * n + 10 * k + d)
    out = sk.nearest_code_ex(z, cb, backend=backend)
    assert out.backend == backend
    assert out.indices.dtype == torch.int64 and out.indices.shape == (n,)
    assert out.distances.dtype == torch.float32 and out.distances.shape == (n,)
    check_nearest(z, cb, out.indices, out.distances, u=u_for(z.dtype, z.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_nearest_code_dtypes(backend, dtype):
    z, cb = _inputs(517, 3001, 48, seed=7, dtype=dtype)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_nearest(z, cb, idx, dist, u=u_for(dtype, z.device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_code_non_contiguous(backend):
    g = _gen(3)
    zbig = torch.randn(64, 700, generator=g)  # z = zbig.T[:, ::3]: strided both ways
    z = zbig.t()[:, ::3]
    cbig = torch.randn(2 * 1500, 40, generator=g)
    cb = cbig[::2, 8:30]  # every other row, offset columns (d = 22 like z)
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    check_nearest(z, cb, idx, dist, u=0.0)
    idx2, dist2 = sk.nearest_code(z.contiguous(), cb.contiguous(), backend=backend)
    assert torch.equal(idx, idx2)
    if backend == "cpu":  # the fused kernel packs its inputs: bit-identical results
        assert torch.equal(dist, dist2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [7, 1000, 5000])
def test_duplicate_codes_lowest_index_wins(backend, k):
    g = _gen(k)
    d = 16
    base = torch.randn(k // 4 + 1, d, generator=g)
    # every base row appears several times at scattered positions
    order = torch.randint(0, base.shape[0], (k,), generator=g)
    order[: base.shape[0]] = torch.arange(base.shape[0])
    order = order[torch.randperm(k, generator=g)]
    cb = base[order]
    # tokens sit exactly on codes (distance 0) or near them: the nearest row of base is
    # unique and well separated, and every copy of it ties exactly
    pick = torch.randint(0, base.shape[0], (300,), generator=g)
    z = base[pick] + 1e-3 * torch.randn(300, d, generator=g)
    z[:50] = base[pick[:50]]  # exact hits
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    first = torch.full((base.shape[0],), k, dtype=torch.long)
    first = first.scatter_reduce(0, order, torch.arange(k), reduce="amin")
    assert torch.equal(idx, first[pick]), "ties must go to the lowest index"
    check_nearest(z, cb, idx, dist, u=0.0)


# Small d on the CPU kernel's register-blocked path (32 tokens x 14 codes per block on
# AVX-512, 16 x 6 on AVX2, code tiles of whole panels up to 8192 codes, code-range
# splits when few token tiles): edges at K around multiples of 6, 14, 16, 32 and 4096
# and around 8190 (the largest whole-panel tile), N around block (16, 32) and
# token-tile multiples, d = 1..17.
SMALL_D_SHAPES = [(1, 1, 1), (3, 15, 2), (5, 16, 8), (7, 17, 16), (257, 31, 5),
                  (258, 32, 13), (1030, 33, 16), (1029, 4095, 3), (771, 4097, 8),
                  (2050, 8193, 11), (4096, 300, 17), (6, 20000, 4), (15, 5, 3),
                  (16, 6, 7), (17, 7, 2), (31, 13, 9), (32, 14, 6), (33, 29, 12),
                  (97, 8191, 6), (40, 8205, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", SMALL_D_SHAPES)
def test_small_d_shapes(backend, n, k, d):
    z, cb = _inputs(n, k, d, seed=n + 7 * k + 31 * d)
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    check_nearest(z, cb, idx, dist, u=u_for(z.dtype, z.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 8, 16])
def test_small_d_duplicates_across_blocks(backend, d):
    """Copies of one code in different panels and lanes and in different code tiles:
    the lowest copy must win."""
    g = _gen(d)
    k = 9000
    cb = torch.randn(k, d, generator=g) * 3
    hot = cb[5].clone()
    for pos in (21, 40, 4100, 8999):
        cb[pos] = hot
    z = torch.cat([hot[None].expand(8, d), hot + 1e-4 * torch.randn(1200, d, generator=g)])
    idx, dist = sk.nearest_code(z, cb, backend=backend)
    check_nearest(z, cb, idx, dist, u=0.0)
    assert not bool(torch.isin(idx, torch.tensor([21, 40, 4100, 8999])).any()), \
        "a later copy of code 5 won a tie"


@pytest.mark.parametrize("backend", BACKENDS)
def test_well_separated_indices_match_oracle_exactly(backend):
    g = _gen(11)
    k, d = 4000, 24
    cb = torch.randn(k, d, generator=g) * 4
    target = torch.randint(0, k, (2000,), generator=g)
    z = cb[target] + 0.01 * torch.randn(2000, d, generator=g)
    idx, _ = sk.nearest_code(z, cb, backend=backend)
    assert torch.equal(idx, target)


def test_backends_agree_on_random_data():
    z, cb = _inputs(2000, 9000, 32, seed=5)
    outs = {b: sk.nearest_code(z, cb, backend=b) for b in BACKENDS}
    for b in BACKENDS:
        check_nearest(z, cb, *outs[b], u=0.0)
    # diagnostic, not the criterion: on continuous random data near-ties are rare
    agree = (outs["cpu"][0] == outs["reference"][0]).float().mean().item()
    assert agree > 0.99


# ------------------------------------------------------------------ SimVQ quantize

def _simvq_params(k, d, r, seed, dtype=torch.float32, bias=True):
    g = _gen(seed)
    basis = (torch.randn(k, r, generator=g, dtype=torch.float64) * r**-0.5).to(dtype)
    weight = (torch.randn(d, r, generator=g, dtype=torch.float64) / math.sqrt(r)).to(dtype)
    b = (0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    return basis, weight, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,k,d,r", [(0, 5, 8, 8), (1, 1, 3, 3), (333, 1000, 64, 64),
                                     (700, 4099, 32, 17), (257, 300, 129, 129)])
def test_simvq_quantize_forward_and_grads(backend, bias, n, k, d, r):
    basis, weight, b = _simvq_params(k, d, r, seed=n + k + d + r)
    z = torch.randn(n, d, generator=_gen(r), dtype=torch.float32)
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if b is not None else None
    out = sk.quantize(z, basis, w, bb, backend=backend)
    assert out.backend == backend
    assert out.zq.dtype == z.dtype and out.zq.shape == (n, d)
    # the picks are checked against the exactly projected codebook
    q64 = reference.project_codebook(basis.double(), weight.double(),
                                     None if b is None else b.double())
    check_nearest(z, q64, out.indices, out.distances, u=0.0)
    torch.testing.assert_close(out.zq.double(), q64[out.indices], rtol=1e-5, atol=1e-5)

    # gradients: autograd through the float64 official math with the same picks
    g = torch.randn(n, d, generator=_gen(99), dtype=torch.float64)
    (out.zq.double() * g).sum().backward() if n else out.zq.sum().backward()
    w64 = weight.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    zq64 = F.embedding(out.indices, reference.project_codebook(basis.double(), w64, b64))
    (zq64 * g).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    if b is not None:
        torch.testing.assert_close(bb.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_simvq_quantize_low_precision(backend, dtype):
    basis, weight, b = _simvq_params(2048, 32, 32, seed=4, dtype=dtype)
    z = torch.randn(400, 32, generator=_gen(4)).to(dtype)
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    out = sk.quantize(z, basis, w, bb, backend=backend)
    assert out.zq.dtype == dtype
    q64 = reference.project_codebook(basis.double(), weight.double(), b.double())
    # the codebook itself is rounded to the input precision on some paths: allow for it
    check_nearest(z, q64, out.indices, out.distances, u=u_for(dtype, z.device))
    # upstream gradient in the input dtype; tolerance per dtype relative to the
    # magnitude bound |g|^T |B[idx]| (oracle.grad_rtol), so cancellation cannot hide
    g = torch.randn(400, 32, generator=_gen(5)).to(dtype)
    out.zq.backward(g)
    check_grads(w.grad, bb.grad, basis, weight, b, out.indices, g, what=f"{backend}/{dtype}")


def test_fused_backward_needs_no_codebook_sized_gradient():
    """The fused op's backward is the gather-GEMM: its result equals g^T basis[idx]."""
    basis, weight, b = _simvq_params(5000, 16, 8, seed=12)
    z = torch.randn(3000, 16, generator=_gen(12))
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    zq, idx = sk.simvq_quantize(z, basis, w, bb, backend="cpu")
    g = torch.randn_like(zq)
    dw, db = torch.autograd.grad(zq, (w, bb), g)
    torch.testing.assert_close(dw, g.t() @ basis[idx], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db, g.sum(0), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------- the layer

def _official_forward(z_bchw, basis, weight, bias, beta, legacy):
    """The official SimVQ layer's forward, written out from its published math
    (channel-first input, official distance formula, official loss)."""
    z = z_bchw.movedim(1, -1).contiguous()
    zf = z.view(-1, z.shape[-1])
    q = F.linear(basis, weight, bias)
    dist = (zf**2).sum(1, keepdim=True) + (q**2).sum(1) - 2 * zf @ q.t()
    idx = dist.argmin(1)
    zq = F.embedding(idx, q).view(z.shape)
    if not legacy:
        loss = beta * torch.mean((zq.detach() - z) ** 2) + torch.mean((zq - z.detach()) ** 2)
    else:
        loss = torch.mean((zq.detach() - z) ** 2) + beta * torch.mean((zq - z.detach()) ** 2)
    zq = z + (zq - z).detach()
    return zq.movedim(-1, 1), idx.view(z.shape[:-1]), loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy", [False, True])
def test_layer_matches_official_loss_and_gradients(backend, legacy):
    torch.manual_seed(0)
    layer = sk.SimVQ(24, 700, channel_first=True, legacy=legacy, backend=backend).double()
    z = torch.randn(3, 24, 9, 7, dtype=torch.float64, requires_grad=True)
    out, idx, loss = layer(z)
    assert layer.last_backend == backend
    z2 = z.detach().clone().requires_grad_(True)
    w2 = layer.weight.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().clone().requires_grad_(True)
    out2, idx2, loss2 = _official_forward(z2, layer.basis, w2, b2, 0.25, legacy)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    ((out * up).sum() + loss).backward()
    ((out2 * up).sum() + loss2).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, w2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, b2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_fp32_gradients_match_float64_reference(backend):
    torch.manual_seed(1)
    layer = sk.SimVQ(32, 3000, basis_dim=20, backend=backend)
    z = torch.randn(8, 50, 32, requires_grad=True)
    out, idx, loss = layer(z)
    up = torch.randn_like(out)
    ((out * up).sum() + loss).backward()
    # float64 reference with the same picks
    z64 = z.detach().double().requires_grad_(True)
    w64 = layer.weight.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True)
    zq64 = F.embedding(idx.reshape(-1), F.linear(layer.basis.double(), w64, b64)).view_as(z64)
    # the official loss (beta = 0.25) and straight-through estimator, written out
    loss64 = 0.25 * torch.mean((zq64.detach() - z64) ** 2) + torch.mean((zq64 - z64.detach()) ** 2)
    out64 = z64 + (zq64 - z64).detach()
    ((out64 * up.double()).sum() + loss64).backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 16, 40), (2, 16, 5, 6), (2, 16, 3, 4, 5)])
def test_channel_first_any_rank(shape):
    torch.manual_seed(2)
    cf = sk.SimVQ(16, 300, channel_first=True)
    cl = sk.SimVQ(16, 300)
    cl.load_state_dict(cf.state_dict())
    z = torch.randn(*shape)
    out, idx, loss = cf(z)
    out2, idx2, loss2 = cl(z.movedim(1, -1))
    assert out.shape == z.shape and idx.shape == (shape[0],) + shape[2:]
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(out, out2.movedim(-1, 1))
    torch.testing.assert_close(loss, loss2)
    # decoding applies the projection and returns the input layout
    codes = cf.indices_to_codes(idx)
    assert codes.shape == z.shape
    torch.testing.assert_close(codes, out, rtol=1e-5, atol=1e-5)


def test_indices_to_codes_applies_projection():
    torch.manual_seed(3)
    layer = sk.SimVQ(8, 50)
    idx = torch.randint(0, 50, (4, 6))
    codes = layer.indices_to_codes(idx)
    torch.testing.assert_close(codes, layer.codebook[idx])
    assert not torch.allclose(codes, layer.basis[idx])  # the official bug, not copied


def test_layer_zero_tokens():
    layer = sk.SimVQ(8, 10)
    z = torch.randn(0, 8, requires_grad=True)
    out, idx, loss = layer(z)
    assert out.shape == (0, 8) and idx.shape == (0,) and loss.item() == 0.0
    loss.backward()


def test_codebook_usage_stream():
    u = sk.CodebookUsage(8)
    u.update(torch.tensor([0, 1, 1, 2]))
    u.update(torch.tensor([[2, 3], [3, 3]]))
    assert u.counts.tolist() == [1, 2, 2, 3, 0, 0, 0, 0]
    assert u.utilisation() == 0.5
    p = torch.tensor([1, 2, 2, 3], dtype=torch.float64) / 8
    assert math.isclose(u.perplexity(), math.exp(-(p * p.log()).sum().item()))
    with pytest.raises(ValueError, match="indices"):
        u.update(torch.tensor([8]))
    assert u.total == 8  # unchanged by the rejected batch
    full = sk.codebook_usage(torch.arange(8).repeat(3), 8)
    assert full["utilisation"] == 1.0 and math.isclose(full["perplexity"], 8.0)


# ------------------------------------------------------------ foreign state dicts

def test_load_official_state_dict():
    torch.manual_seed(4)
    k, d = 500, 12
    official = {
        "embedding.weight": torch.randn(k, d) * d**-0.5,
        "embedding_proj.weight": torch.randn(d, d) / math.sqrt(d),
        "embedding_proj.bias": torch.randn(d) * 0.1,
    }
    layer = sk.SimVQ(d, k, channel_first=True)
    layer.load_state_dict(dict(official))
    z = torch.randn(2, d, 5, 5)
    out, idx, loss = layer(z)
    out2, idx2, loss2 = _official_forward(z, official["embedding.weight"],
                                          official["embedding_proj.weight"],
                                          official["embedding_proj.bias"], 0.25, False)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(loss, loss2)


@pytest.mark.parametrize("bias", [False, True])
def test_load_vector_quantize_pytorch_state_dict(bias):
    vqp = pytest.importorskip("vector_quantize_pytorch")  # a test dependency (.[test])
    torch.manual_seed(5)
    theirs = vqp.SimVQ(dim=16, codebook_size=400, rotation_trick=False)
    ours = sk.SimVQ(16, 400, bias=bias)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 20, 16)
    q1, i1, l1 = theirs(x)
    q2, i2, l2 = ours(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.codebook, theirs.codebook, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- op registration

def test_opcheck_compiled_ops():
    from torch.library import opcheck

    g = _gen(21)
    z = torch.randn(70, 12, generator=g)
    cb = torch.randn(300, 12, generator=g)
    opcheck(torch.ops.simvq.nearest_code.default, (z, cb))
    basis = torch.randn(300, 6, generator=g)
    w = torch.randn(12, 6, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    opcheck(torch.ops.simvq.quantize.default, (z, basis, w, b))
    opcheck(torch.ops.simvq.quantize.default, (z, basis, w, None))
    idx = torch.randint(0, 300, (70,), generator=g)
    opcheck(torch.ops.simvq.quantize_backward.default, (z, basis, idx, w.detach()))


def test_explicit_backend_never_falls_back():
    z = torch.randn(4, 3)
    cb = torch.randn(5, 3)
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        sk.nearest_code(z, cb, backend="cuda")
    with pytest.raises(ValueError, match="unknown `backend`"):
        sk.nearest_code(z, cb, backend="fastest")
    assert sk.select_backend("auto", "cpu", torch.float32) == "cpu"
    assert sk.nearest_code_ex(z, cb).backend == "cpu"


def test_import_does_not_load_extension():
    import subprocess
    import sys

    code = ("import sys, simvq_kernels; "
            "assert 'simvq_kernels._C' not in sys.modules, 'extension imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
