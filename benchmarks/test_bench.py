"""pytest-benchmark suite: search, layer forward, layer backward and a training step,
per backend and per bench preset shape (see conftest.py for the options).

Every test first checks its result once against the float64 oracle (design.md §3),
outside the timed region, so a wrong kernel fails instead of posting a fast time. The
timed callable synchronises the device before it returns. Shapes a backend cannot hold
(the reference builds N x K) are skipped with the reason.
"""
import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import bench


def _skip_if_too_big(backend, shape, op, device):
    why = bench.skip_reason(backend, bench.Case(shape, op), device,
                            bench.total_memory_bytes(device))
    if why and why != "n/a":
        pytest.skip(why)


def _layer(inp, backend, device):
    s = inp.shape
    layer = sk.SimVQ(s.d, s.k, basis_dim=s.basis_dim, backend=backend).to(device)
    with torch.no_grad():
        layer.basis.copy_(inp.basis)
        layer.weight.copy_(inp.weight)
        layer.bias.copy_(inp.bias)
    return layer


def _check(op, inp, out, device):
    res = bench.check_output(op, inp, out, u=bench.unit_roundoff(device), check_rows=1024)
    assert res.ok, res.detail
    return res


def _info(benchmark, shape, backend, res):
    benchmark.extra_info.update(
        {"backend": backend, "N": shape.n, "K": shape.k, "d": shape.d,
         "search_gflop": shape.search_flops / 1e9, "check": res.detail})


def test_search(benchmark, backend, shape, device, rounds):
    """sk.nearest_code: the fused search alone (projected codebook given)."""
    _skip_if_too_big(backend, shape, "fwd", device)
    inp = bench.make_inputs(shape, device)
    idx, dist = sk.nearest_code(inp.z, inp.codebook, backend=backend)
    res = _check("fwd", inp, {"idx": idx, "dist": dist}, device)

    def run():
        out = sk.nearest_code(inp.z, inp.codebook, backend=backend)
        bench._sync(device)
        return out
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    _info(benchmark, shape, backend, res)


def test_layer_forward(benchmark, backend, shape, device, rounds):
    """SimVQ layer forward (projection + search + gather + loss), no autograd graph."""
    _skip_if_too_big(backend, shape, "layer", device)
    inp = bench.make_inputs(shape, device)
    layer = _layer(inp, backend, device)
    with torch.no_grad():
        out, idx, loss = layer(inp.z)
    res = _check("layer", inp, {"idx": idx, "grads": None, "grad_note": "forward only"},
                 device)
    with torch.no_grad():
        codes = layer.indices_to_codes(idx)
    assert torch.allclose(out, codes, rtol=1e-5, atol=1e-5 * float(codes.abs().max())), \
        "layer output is not the picked code (straight-through value)"

    def run():
        with torch.no_grad():
            o = layer(inp.z)
        bench._sync(device)
        return o
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    _info(benchmark, shape, backend, res)


def test_layer_backward(benchmark, backend, shape, device, rounds):
    """The backward alone of loss + sum(out * g); the forward graph is built in setup."""
    _skip_if_too_big(backend, shape, "layer", device)
    inp = bench.make_inputs(shape, device)
    layer = _layer(inp, backend, device)
    x = inp.z.clone().requires_grad_(True)
    params = (x, layer.weight, layer.bias)

    def setup():
        for p in params:
            p.grad = None
        out, idx, loss = layer(x)
        return (loss + (out * inp.g_out).sum(), idx), {}

    total, idx = setup()[0]
    total.backward()
    res = _check("layer", inp, {"idx": idx, "grads": {
        "z": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}}, device)

    def run(total, idx):
        total.backward()
        bench._sync(device)
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    _info(benchmark, shape, backend, res)


def test_train_step(benchmark, backend, shape, device, rounds):
    """A full SimVQ training step: forward, backward, SGD update of weight and bias."""
    _skip_if_too_big(backend, shape, "layer", device)
    inp = bench.make_inputs(shape, device)
    layer = _layer(inp, backend, device)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)
    x = inp.z.clone().requires_grad_(True)

    def step():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        out, idx, loss = layer(x)
        (loss + (out * inp.g_out).sum()).backward()
        return idx

    idx = step()  # checked before any update, so the oracle sees the same parameters
    res = _check("layer", inp, {"idx": idx, "grads": {
        "z": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}}, device)

    def run():
        step()
        opt.step()
        bench._sync(device)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    _info(benchmark, shape, backend, res)
