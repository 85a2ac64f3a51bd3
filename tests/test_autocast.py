"""Mixed precision: torch.autocast (bf16, fp16; CPU, and CUDA where available) and pure
bf16/fp16 layers, against the float64 reference (design.md §3, tests/oracle.py).

Under autocast the layer runs the search on z and the parameters cast to the autocast
dtype (checked with a spy on ``ops.quantize``), with fp32 distances; the picks must meet
the §3 criterion on exactly those rounded values with u of that dtype; ``out`` comes back
in z's dtype, the loss in fp32; and the gradients of z, weight and bias must equal
autograd through the float64 reference (same picks) within ``oracle.grad_rtol`` of the
autocast dtype, relative to the magnitude bound of each gradient.
"""
from __future__ import annotations

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import ops

from .oracle import (assert_close_scaled, check_nearest, grad_rtol, project64,
                     reference_layer64, unit_roundoff)

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in sk.available_backends()]


def _cases():
    for dev in ("cpu", "cuda"):
        marks = [] if dev == "cpu" or HAS_CUDA else \
            [pytest.mark.skip(reason="needs a CUDA device")]
        backends = CPU_BACKENDS if dev == "cpu" else ["auto"]
        for backend in backends:
            for adt in (torch.bfloat16, torch.float16):
                for in_dt in ("fp32", "amp"):
                    yield pytest.param(dev, backend, adt, in_dt, marks=marks,
                                       id=f"{dev}-{backend}-{str(adt)[6:]}-z_{in_dt}")


@pytest.fixture
def spy(monkeypatch):
    """The dtypes the layer hands the quantiser: ops.quantize, or ops.quantize_train (the
    plain training step of float32 / float64 tokens)."""
    seen = []

    def wrap(real):
        def wrapped(z, basis, weight, bias=None, backend="auto", **kw):
            seen.append((z.dtype, basis.dtype, weight.dtype,
                         None if bias is None else bias.dtype))
            return real(z, basis, weight, bias, backend, **kw)
        return wrapped

    monkeypatch.setattr(ops, "quantize", wrap(ops.quantize))
    monkeypatch.setattr(ops, "quantize_train", wrap(ops.quantize_train))
    return seen


def _layer(dev, backend, seed, **kw):
    torch.manual_seed(seed)
    return sk.SimVQ(32, 1500, basis_dim=24, backend=backend, **kw).to(dev)


def _check_against_reference(layer, z, out, idx, loss, dist, up, adt, mask=None,
                             what=""):
    """Picks on the autocast-rounded inputs; gradients against float64 on the stored
    values (z as given, master parameters)."""
    n_mask = slice(None) if mask is None else mask.reshape(-1)
    zf = z.detach().reshape(-1, z.shape[-1])
    idx_f = idx.reshape(-1)
    # the search saw z and the parameters rounded to the autocast dtype
    q_c = project64(layer.basis.to(adt), layer.weight.detach().to(adt),
                    layer.bias.detach().to(adt))
    check_nearest(zf.to(adt)[n_mask], q_c, idx_f[n_mask], dist.reshape(-1)[n_mask],
                  u=unit_roundoff(adt, z.device), check_ties=False, what=what)
    zr, ir = zf[n_mask], idx_f[n_mask]
    ref = reference_layer64(zr, layer.basis, layer.weight, layer.bias, ir,
                            up.reshape(-1, up.shape[-1])[n_mask])
    rtol = grad_rtol(adt)
    assert_close_scaled(loss, ref["loss"], ref["scale_loss"], rtol, f"{what} loss")
    assert_close_scaled(z.grad.reshape(-1, z.shape[-1])[n_mask], ref["dz"], ref["scale_dz"],
                        rtol, f"{what} dz")
    assert_close_scaled(layer.weight.grad, ref["dW"], ref["scale_dW"], rtol, f"{what} dW")
    assert_close_scaled(layer.bias.grad, ref["db"], ref["scale_db"], rtol, f"{what} db")
    # out has the value of the picked codes (rounded to z's dtype)
    want = project64(layer.basis, layer.weight, layer.bias)[ir.cpu()]
    assert_close_scaled(out.reshape(-1, z.shape[-1])[n_mask], want,
                        want.abs() + zr.double().abs().cpu(), 2 * grad_rtol(z.dtype),
                        f"{what} out")


@pytest.mark.parametrize("dev,backend,adt,in_dt", list(_cases()))
def test_autocast_layer(dev, backend, adt, in_dt, spy):
    layer = _layer(dev, backend, seed=1)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 70, 32, generator=g).to(dev)
    if in_dt == "amp":  # as if produced by an encoder running under autocast
        z = z.to(adt)
    z.requires_grad_(True)
    up = torch.randn(z.shape, generator=g).to(dev)
    with torch.autocast(dev, dtype=adt):
        out, idx, loss, dist = layer(z, return_distances=True)
    assert spy and spy[-1] == (adt, adt, adt, adt), "the search did not run in the autocast dtype"
    assert out.dtype == z.dtype and out.shape == z.shape
    assert loss.dtype == torch.float32
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    assert layer.last_backend == (backend if backend != "auto" else layer.last_backend)
    ((out.float() * up).sum() + loss).backward()
    assert layer.weight.grad.dtype == torch.float32 and z.grad.dtype == z.dtype
    _check_against_reference(layer, z, out, idx, loss, dist, up, adt,
                             what=f"{dev}/{backend}/{adt}/{in_dt}")


@pytest.mark.parametrize("adt", [torch.bfloat16, torch.float16])
def test_autocast_with_mask_cpu(adt):
    layer = _layer("cpu", "auto", seed=3)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 50, 32, generator=g)
    mask = torch.rand(4, 50, generator=g) > 0.25
    z[~mask] = float("nan")  # padding may hold anything
    z.requires_grad_(True)
    up = torch.randn(z.shape, generator=g)
    with torch.autocast("cpu", dtype=adt):
        out, idx, loss, dist = layer(z, mask, return_distances=True)
    ((out * up).nan_to_num().sum() + loss).backward()
    assert bool((idx[~mask] == -1).all()) and bool((dist[~mask] == 0).all())
    assert torch.isfinite(loss) and torch.isfinite(layer.weight.grad).all()
    zz = z.detach().clone()
    zz[~mask] = 0.0
    zz.requires_grad_(True)
    zz.grad = z.grad.clone()
    _check_against_reference(layer, zz, out, idx, loss, dist, up, adt, mask=mask,
                             what=f"masked/{adt}")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pure_low_precision_layer(dev, dtype, spy):
    """Parameters and input both bf16 (or fp16), no autocast."""
    layer = _layer(dev, "auto", seed=5).to(dtype)
    assert layer.weight.dtype == dtype and layer.basis.dtype == dtype
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 80, 32, generator=g).to(device=dev, dtype=dtype).requires_grad_(True)
    up = torch.randn(z.shape, generator=g).to(device=dev, dtype=dtype)
    out, idx, loss, dist = layer(z, return_distances=True)
    assert spy[-1] == (dtype,) * 4
    assert out.dtype == dtype and dist.dtype == torch.float32
    assert loss.dtype == torch.float32  # accumulated and returned in fp32
    ((out * up).float().sum() + loss).backward()
    assert layer.weight.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    _check_against_reference(layer, z, out, idx, loss, dist, up, dtype,
                             what=f"pure {dtype}")


def test_autocast_leaves_float64_alone(spy):
    layer = _layer("cpu", "auto", seed=7).double()
    z = torch.randn(3, 40, 32, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, idx, loss = layer(z)
    assert spy[-1][0] == torch.float64 and out.dtype == torch.float64
    assert loss.dtype == torch.float64


def test_autocast_residual_and_rotation():
    torch.manual_seed(8)
    rvq = sk.ResidualSimVQ(32, 500, num_quantizers=3, rotation_trick=True)
    z = torch.randn(2, 60, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, idx, loss = rvq(z)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    assert idx.shape == (2, 60, 3)
    (out.sum() + loss).backward()
    for layer in rvq.layers:
        assert layer.weight.grad.dtype == torch.float32
        assert torch.isfinite(layer.weight.grad).all()
    # decoding the indices gives the quantised value
    torch.testing.assert_close(rvq.indices_to_codes(idx), out.detach(), rtol=1e-4, atol=1e-4)
