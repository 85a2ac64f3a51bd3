"""The SimVQ layer's fused training step (``ops.quantize_train``; the ``cpu`` backend's
``quantize_train`` / ``quantize_train_backward`` ops): the projection, the search, the
straight-through output and both commitment losses in one call, and dz, dW, db in one
backward call with no N x d temporary.

Checked here: the same indices as the composed step (``quantize`` + the estimator)
and values, losses and gradients equal to it up to the rounding of the sums, against
float64 autograd through the reference formula; bit-identical across thread counts and
ISAs; the paths that must not take it (mask, rotation trick, autocast, low precision)
do not; bad arguments name the argument."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import _ext, ops
from simvq_kernels.backends import BACKENDS


@pytest.fixture(autouse=True)
def _need_cpu_backend():
    if "cpu" not in sk.available_backends():
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")


def _layer(d, k, dtype, **kw):
    torch.manual_seed(3)
    return sk.SimVQ(d, k, backend="cpu", **kw).to(dtype)


def _step(layer, z, g, w_loss=3.0):
    x = z.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, idx, loss = layer(x)
    (w_loss * loss + (out * g).sum()).backward()
    return out.detach(), idx, loss.detach(), x.grad, layer.weight.grad, \
        (None if layer.bias is None else layer.bias.grad)


def _oracle(layer, z, g, idx, w_loss=3.0):
    """float64 autograd of the official formulas at the given indices."""
    B = layer.basis.double()
    W = layer.weight.detach().double().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().double().requires_grad_(True)
    x = z.double().reshape(-1, z.shape[-1]).requires_grad_(True)
    q = B @ W.T + (b if b is not None else 0)
    zq = q[idx.reshape(-1)]
    commit = ((zq.detach() - x) ** 2).mean()
    code = ((zq - x.detach()) ** 2).mean()
    loss = ((commit + layer.beta * code) if layer.legacy else (layer.beta * commit + code))
    loss = loss * layer.commitment_weight
    out = x + (zq - x).detach()
    (w_loss * loss + (out * g.double().reshape(-1, z.shape[-1])).sum()).backward()
    return out, loss, x.grad, W.grad, (None if b is None else b.grad)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("d,k,n,kw", [
    (24, 300, 2500, {}),                       # 3 chunks of tokens, the last partial
    (7, 50, 1, {"bias": False}),               # one token, no bias
    (33, 1000, 1024, {"legacy": True, "commitment_weight": 0.7, "beta": 0.5}),
    (16, 40, 1500, {"basis_dim": 5}),          # r != d
])
def test_fused_step_against_float64(dtype, tol, d, k, n, kw):
    layer = _layer(d, k, dtype, **kw)
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, d, generator=g).to(dtype)
    up = torch.randn(n, d, generator=g).to(dtype)
    out, idx, loss, dz, dw, db = _step(layer, z, up)
    assert layer.last_backend == "cpu"
    # the picks: the fused step's indices are the composed quantize's
    q = ops.quantize(z, layer.basis, layer.weight.detach(),
                     None if layer.bias is None else layer.bias.detach(), backend="cpu")
    assert torch.equal(idx, q.indices)
    o_out, o_loss, o_dz, o_dw, o_db = _oracle(layer, z, up, idx)
    assert out.dtype == dtype and loss.dtype == dtype
    assert _rel(out, o_out) < tol and abs(loss.item() - o_loss.item()) <= tol * o_loss.item()
    for name, got, want in (("dz", dz, o_dz), ("dW", dw, o_dw), ("db", db, o_db)):
        if want is None:
            assert got is None
            continue
        assert _rel(got, want) < tol, f"{name}: relative error {_rel(got, want):.2e}"


def test_fused_and_composed_steps_agree(monkeypatch):
    """The cpu backend with and without its fused step: same indices, values within
    rounding (the fused step scales dW after its sum, the composed one before)."""
    layer = _layer(20, 500, torch.float32)
    g = torch.Generator().manual_seed(1)
    z, up = torch.randn(3000, 20, generator=g), torch.randn(3000, 20, generator=g)
    fused = _step(layer, z, up)
    monkeypatch.setattr(type(BACKENDS["cpu"]), "has_train_step", False)
    composed = _step(layer, z, up)
    assert torch.equal(fused[1], composed[1])
    for name, a, b in zip(("out", "idx", "loss", "dz", "dW", "db"), fused, composed):
        if name != "idx":
            assert _rel(a, b.double()) < 1e-5, name


def _digest(*ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_fused_step_bit_identical_across_threads_and_isas():
    layer = _layer(33, 700, torch.float32)
    g = torch.Generator().manual_seed(2)
    z, up = torch.randn(2100, 33, generator=g), torch.randn(2100, 33, generator=g)
    cfg = json.loads(torch.ops.simvq.cpu_kernel_config())
    isas = ["scalar", "avx2", "avx512"]
    isas = isas[:isas.index(cfg["native_isa"]) + 1]
    threads0 = torch.get_num_threads()
    seen = {}
    try:
        for isa in isas:
            torch.ops.simvq.set_cpu_kernel_config(isa, None, None)
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                seen.setdefault(_digest(*_step(layer, z, up)), []).append((isa, threads))
    finally:
        torch.set_num_threads(threads0)
        torch.ops.simvq.set_cpu_kernel_config(
            cfg["isa"] if cfg["isa_from"] != "native" else "auto", None, None)
    assert len(seen) == 1, f"the fused step differs by ISA / thread count: {seen}"


@pytest.mark.parametrize("what", ["mask", "rotation", "bf16", "autocast", "no-grad"])
def test_paths_that_do_not_take_the_fused_step(what, monkeypatch):
    calls = []
    real = BACKENDS["cpu"].quantize_train
    monkeypatch.setattr(BACKENDS["cpu"], "quantize_train",
                        lambda *a: calls.append(1) or real(*a))
    layer = _layer(16, 64, torch.bfloat16 if what == "bf16" else torch.float32,
                   rotation_trick=(what == "rotation"))
    z = torch.randn(4, 30, 16, dtype=layer.weight.dtype, requires_grad=True)
    if what == "mask":
        mask = torch.ones(4, 30, dtype=torch.bool)
        mask[:, 20:] = False
        layer(z, mask)
    elif what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(z)
    elif what == "no-grad":
        with torch.no_grad():
            layer(z)
    else:
        layer(z)
    assert calls == []
    if what in ("mask", "autocast", "no-grad"):  # the same layer's plain step takes it
        layer(z)
        assert calls == [1]


def test_train_ops_name_bad_arguments():
    _ext.load()
    z = torch.randn(10, 4)
    basis, weight = torch.randn(20, 3), torch.randn(4, 3)
    out, idx, dist, sumsq, codebook = torch.ops.simvq.quantize_train(z, basis, weight, None)
    assert sumsq.dtype == torch.float64 and codebook.shape == (20, 4)
    with pytest.raises(RuntimeError, match="`z`"):
        torch.ops.simvq.quantize_train(z.bfloat16(), basis.bfloat16(), weight.bfloat16(), None)
    with pytest.raises(RuntimeError, match="`indices` must lie in"):
        torch.ops.simvq.quantize_train_backward(z, z, basis, codebook, idx + 20, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="`d_out`"):
        torch.ops.simvq.quantize_train_backward(z[:5], z, basis, codebook, idx, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="`codebook`"):
        torch.ops.simvq.quantize_train_backward(z, z, basis, codebook[:5], idx, 1.0, 1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 20, 1500), (5, 20), (4, 20, 2, 3, 5)])
def test_fused_step_channel_first(dtype, tol, shape):
    """Channel-first tokens (B, d, ...) go through the fused step in place: the same
    indices, output layout and values as the channel-last step on the moved tokens."""
    layer = _layer(20, 300, dtype, channel_first=True)
    g = torch.Generator().manual_seed(len(shape))
    z = torch.randn(shape, generator=g).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    out, idx, loss, dz, dw, db = _step(layer, z, up)
    assert layer.last_backend == "cpu" and out.shape == z.shape
    assert idx.shape == (shape[0], *shape[2:])
    zl = z.movedim(1, -1)
    o_out, o_loss, o_dz, o_dw, o_db = _oracle(layer, zl, up.movedim(1, -1), idx)
    q = ops.quantize(zl.reshape(-1, 20), layer.basis, layer.weight.detach(),
                     layer.bias.detach(), backend="cpu")
    assert torch.equal(idx.reshape(-1), q.indices)
    assert _rel(out.movedim(1, -1).reshape(-1, 20), o_out) < tol
    assert abs(loss.item() - o_loss.item()) <= tol * o_loss.item()
    assert _rel(dz.movedim(1, -1).reshape(-1, 20), o_dz) < tol
    assert _rel(dw, o_dw) < tol and _rel(db, o_db) < tol


def test_fused_step_channel_first_non_contiguous_input():
    layer = _layer(16, 200, torch.float32, channel_first=True)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(4, 30, 16, generator=g)
    z = base.transpose(1, 2)  # (4, 16, 30), not contiguous
    up = torch.randn(4, 16, 30, generator=g)
    out, idx, loss, dz, dw, db = _step(layer, z, up)
    ref = _step(layer, z.contiguous(), up)
    for a, b in zip((out, idx, loss, dz, dw, db), ref):
        assert torch.equal(a, b)


def test_quantize_train_channel_first_matches_composed():
    """ops.quantize_train(channel_first=True): the fused op and the composed path (the
    cpu backend with its fused step switched off) agree."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 12, 700, generator=g)
    basis = torch.randn(90, 10, generator=g) * 10 ** -0.5
    w = torch.randn(12, 10, generator=g).requires_grad_(True)
    b = torch.randn(12, generator=g).requires_grad_(True)
    up = torch.randn(3, 12, 700, generator=g)
    results = []
    for fused in (True, False):
        BACKENDS["cpu"].__class__.has_train_step = fused
        try:
            x = z.clone().requires_grad_(True)
            w.grad = b.grad = None
            step = ops.quantize_train(x, basis, w, b, backend="cpu", channel_first=True)
            assert step.out.shape == z.shape and step.indices.shape == (3 * 700,)
            (step.commit + 0.5 * step.codebook + (step.out * up).sum()).backward()
            results.append((step.out.detach(), step.indices, x.grad, w.grad.clone(),
                            b.grad.clone()))
        finally:
            BACKENDS["cpu"].__class__.has_train_step = True
    (o1, i1, dz1, dw1, db1), (o2, i2, dz2, dw2, db2) = results
    assert torch.equal(i1, i2)
    for a, c in ((o1, o2), (dz1, dz2), (dw1, dw2), (db1, db2)):
        assert _rel(a, c.double()) < 1e-5


@pytest.mark.parametrize("scale", [3e19, 2.0 ** -70])
def test_values_outside_float32_window_search_in_float64(scale):
    """Tokens and codes whose squares overflow (or underflow) float32: the training step
    falls back to the composed path and searches in float64, like quantize and the
    masked layer path; the picks are the float64 ones."""
    basis = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.95]]) * scale
    w = (torch.eye(2) * scale).requires_grad_(True)
    step = ops.quantize_train(z, basis, w, None, backend="cpu")
    assert step.indices.tolist() == [0, 1, 2]
    assert torch.isfinite(step.distances).all() and step.distances.dtype == torch.float32
    plain = ops.quantize(z, basis, w.detach(), None, backend="cpu")
    assert torch.equal(step.indices, plain.indices)
    layer = sk.SimVQ(2, 3, basis_dim=2, bias=False, backend="cpu")
    with torch.no_grad():
        layer.basis.copy_(basis)
        layer.weight.copy_(w.detach())
    assert layer(z)[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(3, 20, 37), (1, 20, 5), (2, 20, 1500), (7, 20, 64),
                                   (5, 64, 256), (5, 24, 300)])
def test_channel_first_op_bit_identical_to_channel_last_on_every_isa(shape):
    """quantize_train on channel-first tokens (B, d, T) gives exactly the bits of the
    channel-last op on the moved tokens: indices, distances, out, the sum of squares and
    the backward, on every ISA (the vector ISAs pack the channel-first tokens in place,
    blocks crossing batch items when T is not a multiple of the block; scalar gathers
    rows) and thread count (few tokens: the code range is split and merged). The shapes
    cover the layout moves' 8 x 8 blocks (d and T multiples of 8), their channel and
    token edges, and chunks of tokens that start inside a batch item."""
    g = torch.Generator().manual_seed(shape[2])
    d, r, k = shape[1], 9, 700
    z = torch.randn(shape, generator=g)
    up = torch.randn(shape, generator=g)
    basis = torch.randn(k, r, generator=g) * r ** -0.5
    w, b = torch.randn(d, r, generator=g), torch.randn(d, generator=g)
    rows = z.movedim(1, -1).reshape(-1, d).contiguous()
    up_rows = up.movedim(1, -1).reshape(-1, d).contiguous()

    def back(t):  # (B, d, T) -> (N, d)
        return t.movedim(1, -1).reshape(-1, d)

    cfg = json.loads(torch.ops.simvq.cpu_kernel_config())
    isas = ["scalar", "avx2", "avx512"]
    isas = isas[:isas.index(cfg["native_isa"]) + 1]
    threads0 = torch.get_num_threads()
    try:
        for isa in isas:
            torch.ops.simvq.set_cpu_kernel_config(isa, None, None)
            for threads in (1, 3):
                torch.set_num_threads(threads)
                cl = torch.ops.simvq.quantize_train(rows, basis, w, b)
                cf = torch.ops.simvq.quantize_train(z, basis, w, b)
                assert torch.equal(back(cf[0]), cl[0]), (isa, threads, "out")
                for i, name in ((1, "indices"), (2, "distances"), (3, "sum of squares"),
                                (4, "codebook")):
                    assert torch.equal(cf[i], cl[i]), (isa, threads, name)
                gl = torch.ops.simvq.quantize_train_backward(up_rows, rows, basis, cl[4],
                                                             cl[1], 0.3, 0.7)
                gf = torch.ops.simvq.quantize_train_backward(up, z, basis, cf[4], cf[1],
                                                             0.3, 0.7)
                assert torch.equal(back(gf[0]), gl[0]), (isa, threads, "dz")
                assert torch.equal(gf[1], gl[1]) and torch.equal(gf[2], gl[2]), \
                    (isa, threads, "dW, db")
    finally:
        torch.set_num_threads(threads0)
        torch.ops.simvq.set_cpu_kernel_config(
            cfg["isa"] if cfg["isa_from"] != "native" else "auto", None, None)
