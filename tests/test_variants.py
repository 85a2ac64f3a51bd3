"""The variants users ask for, against the float64 reference (design.md §3):

basis_dim != dim; rotation_trick=True (Fifty et al. 2024); ResidualSimVQ; the padding
mask (masked tokens pick no code and count in neither the loss, the gradients nor the
usage statistics); return_distances; usage tracking.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import simvq_kernels as sk

from .oracle import (assert_close_scaled, check_nearest, dist64_rows,
                     grad_rtol, project64, reference_layer64)

BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in sk.available_backends()]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ basis_dim != dim

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,r,bias", [(32, 8, True), (16, 48, False), (24, 1, True)])
def test_basis_dim_differs_from_dim(backend, d, r, bias):
    torch.manual_seed(d + r)
    layer = sk.SimVQ(d, 2000, basis_dim=r, bias=bias, backend=backend)
    assert layer.basis.shape == (2000, r) and layer.weight.shape == (d, r)
    g = _gen(1)
    z = torch.randn(7, 60, d, generator=g, requires_grad=True)
    up = torch.randn(z.shape, generator=g)
    out, idx, loss, dist = layer(z, return_distances=True)
    assert layer.last_backend == backend
    zf = z.detach().reshape(-1, d)
    b = None if layer.bias is None else layer.bias.detach()
    q64 = project64(layer.basis, layer.weight, b)
    check_nearest(zf, q64, idx.reshape(-1), dist.reshape(-1), u=0.0, check_ties=False,
                  what=f"r={r}")
    # out = z + (zq - z) has zq's value up to the projection's and the STE's rounding
    mag = layer.basis.abs()[idx.reshape(-1)].double() @ layer.weight.detach().abs().T.double()
    if b is not None:
        mag = mag + b.abs().double()
    assert_close_scaled(out.detach().reshape(-1, d), q64[idx.reshape(-1)],
                        mag + zf.abs().double(), 4 * (r + 2) * 2.0**-24, "out")
    ((out * up).sum() + loss).backward()
    ref = reference_layer64(zf, layer.basis, layer.weight, layer.bias, idx.reshape(-1),
                            up.reshape(-1, d))
    rtol = grad_rtol(torch.float32)
    assert_close_scaled(loss, ref["loss"], ref["scale_loss"], rtol, "loss")
    assert_close_scaled(z.grad.reshape(-1, d), ref["dz"], ref["scale_dz"], rtol, "dz")
    assert_close_scaled(layer.weight.grad, ref["dW"], ref["scale_dW"], rtol, "dW")
    if bias:
        assert_close_scaled(layer.bias.grad, ref["db"], ref["scale_db"], rtol, "db")
    torch.testing.assert_close(layer.indices_to_codes(idx), out.detach(), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------- rotation trick

def _rotation_grad64(z, zq, g):
    """dL/dz of the rotation trick in float64, from its definition: out = s R z with
    R = I - 2 w w^T + 2 q u^T (u = z/|z|, q = zq/|zq|, w = (u + q)/|u + q|) and
    s = |zq|/|z|, R and s constants -> dL/dz = s R^T g = s (g - 2 w (w.g) + 2 u (q.g))."""
    z, zq, g = z.double(), zq.double(), g.double()
    u = z / z.norm(dim=-1, keepdim=True)
    q = zq / zq.norm(dim=-1, keepdim=True)
    w = (u + q) / (u + q).norm(dim=-1, keepdim=True)
    s = zq.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True)
    return s * (g - 2 * w * (w * g).sum(-1, keepdim=True) + 2 * u * (q * g).sum(-1, keepdim=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_trick_forward_and_gradients(backend):
    torch.manual_seed(2)
    rot = sk.SimVQ(16, 500, backend=backend, rotation_trick=True)
    ste = sk.SimVQ(16, 500, backend=backend)
    ste.load_state_dict(rot.state_dict())
    g = _gen(3)
    z = torch.randn(5, 40, 16, generator=g, requires_grad=True)
    z2 = z.detach().clone().requires_grad_(True)
    up = torch.randn(z.shape, generator=g)
    out, idx, loss = rot(z)
    out2, idx2, loss2 = ste(z2)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(loss, loss2)
    # the value is the picked code (a rotation of z scaled to |zq|)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    ((out * up).sum() + loss).backward()
    ((out2 * up).sum() + loss2).backward()
    # the codebook learns from the loss only: same weight/bias grads as with the STE
    torch.testing.assert_close(rot.weight.grad, ste.weight.grad)
    torch.testing.assert_close(rot.bias.grad, ste.bias.grad)
    # z: rotated upstream gradient + the commitment term
    zf, zq = z.detach().reshape(-1, 16), out2.detach().reshape(-1, 16)
    want = _rotation_grad64(zf, zq, up.reshape(-1, 16))
    want = want + 2 * 0.25 / zf.numel() * (zf.double() - zq.double())
    torch.testing.assert_close(z.grad.reshape(-1, 16).double(), want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(z.grad, z2.grad)  # it is not the straight-through gradient


def test_rotation_trick_degenerate_rows_stay_finite():
    layer = sk.SimVQ(4, 3, rotation_trick=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4, 4))
        layer.bias.zero_()
        layer.basis.copy_(torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    z = torch.tensor([[0., 0, 0, 0], [-1, 0, 0, 0], [0.9, 0.1, 0, 0]], requires_grad=True)
    out, idx, loss = layer(z)
    (out.sum() + loss).backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


# ----------------------------------------------------------------------- ResidualSimVQ

def _residual_reference64(rvq, z, idx, up):
    """ResidualSimVQ in float64 from its definition, with the picks given."""
    z64 = z.detach().double().requires_grad_(True)
    ws = [l.weight.detach().double().requires_grad_(True) for l in rvq.layers]
    bs = [l.bias.detach().double().requires_grad_(True) for l in rvq.layers]
    r = z64
    total = 0
    loss = 0
    for i, layer in enumerate(rvq.layers):
        zq = F.embedding(idx[:, i], F.linear(layer.basis.double(), ws[i], bs[i]))
        loss = loss + 0.25 * ((zq.detach() - r) ** 2).mean() + ((zq - r.detach()) ** 2).mean()
        total = total + zq
        r = r - zq.detach()
    out = z64 + (total - z64).detach()
    ((out * up.double()).sum() + loss).backward()
    return out.detach(), loss.detach(), z64.grad, [w.grad for w in ws], [b.grad for b in bs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_simvq(backend):
    torch.manual_seed(4)
    rvq = sk.ResidualSimVQ(12, 300, num_quantizers=3, basis_dim=9, backend=backend).double()
    g = _gen(5)
    z = torch.randn(4, 30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(z.shape, generator=g, dtype=torch.float64)
    out, idx, loss, dist = rvq(z, return_distances=True)
    assert out.shape == z.shape and idx.shape == (4, 30, 3) and dist.shape == (4, 30, 3)
    assert rvq.last_backend == backend
    zf, idx_f = z.detach().reshape(-1, 12), idx.reshape(-1, 3)
    # each stage picks the nearest code of the residual left by the stages before it
    r = zf.clone()
    for i, layer in enumerate(rvq.layers):
        q64 = project64(layer.basis, layer.weight, layer.bias)
        check_nearest(r, q64, idx_f[:, i], dist.reshape(-1, 3)[:, i], u=2.0**-53,
                      what=f"stage {i}")
        r = r - q64[idx_f[:, i]]
    ((out * up).sum() + loss).backward()
    out64, loss64, dz64, dws, dbs = _residual_reference64(rvq, zf, idx_f, up.reshape(-1, 12))
    torch.testing.assert_close(out.reshape(-1, 12), out64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss64, rtol=1e-12, atol=1e-14)
    # one estimator on the sum: dL/dz = upstream + the stages' commitment terms
    torch.testing.assert_close(z.grad.reshape(-1, 12), dz64, rtol=1e-10, atol=1e-12)
    for layer, dw, db in zip(rvq.layers, dws, dbs):
        torch.testing.assert_close(layer.weight.grad, dw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-10, atol=1e-12)
    # decoding sums the stages and reproduces the quantised value
    torch.testing.assert_close(rvq.indices_to_codes(idx), out.detach(), rtol=1e-12,
                               atol=1e-12)
    assert rvq.codebooks.shape == (3, 300, 12)
    # more stages, smaller residual (on average)
    err = [(zf - out64).norm()]
    assert float(err[0]) < float(zf.norm())


def test_residual_channel_first_and_mask():
    torch.manual_seed(6)
    rvq = sk.ResidualSimVQ(8, 100, num_quantizers=2, channel_first=True, track_usage=True)
    z = torch.randn(3, 8, 5, 4)
    mask = torch.rand(3, 5, 4, generator=_gen(7)) > 0.3
    out, idx, loss = rvq(z, mask)
    assert out.shape == z.shape and idx.shape == (3, 5, 4, 2)
    assert bool((idx[~mask] == -1).all()) and bool((idx[mask] >= 0).all())
    torch.testing.assert_close(out.movedim(1, -1)[~mask], z.movedim(1, -1)[~mask])
    codes = rvq.indices_to_codes(idx.clamp_min(0))
    assert codes.shape == z.shape
    torch.testing.assert_close(codes.movedim(1, -1)[mask], out.movedim(1, -1)[mask],
                               rtol=1e-5, atol=1e-5)
    for u in rvq.codebook_usage():
        assert u.total == int(mask.sum())
    with pytest.raises(ValueError, match="one index per stage"):
        rvq.indices_to_codes(idx[..., :1])


# ------------------------------------------------------------------------ the mask

@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_excludes_padding_everywhere(backend):
    torch.manual_seed(8)
    layer = sk.SimVQ(16, 400, backend=backend, track_usage=True)
    ref = sk.SimVQ(16, 400, backend=backend, track_usage=True)
    ref.load_state_dict(layer.state_dict())
    g = _gen(9)
    z = torch.randn(4, 25, 16, generator=g)
    mask = torch.rand(4, 25, generator=g) > 0.3
    z[~mask] = float("nan")  # padding may be garbage
    z[~mask][:, 0] = float("inf")
    z.requires_grad_(True)
    up = torch.randn(z.shape, generator=g)
    out, idx, loss, dist = layer(z, mask, return_distances=True)
    ((out * up).sum() + loss).backward()  # NaN value (padding), finite gradients
    # padded tokens: no code, zero distance, passed through with an identity gradient
    assert bool((idx[~mask] == -1).all()) and bool((dist[~mask] == 0).all())
    assert torch.equal(out[~mask].isnan(), z.detach()[~mask].isnan())
    assert torch.equal(z.grad[~mask], up[~mask])
    # real tokens: exactly what an unmasked layer gives on the real tokens alone
    zr = z.detach()[mask].clone().requires_grad_(True)
    out_r, idx_r, loss_r, dist_r = ref(zr, return_distances=True)
    ((out_r * up[mask]).sum() + loss_r).backward()
    assert torch.equal(idx[mask], idx_r)
    torch.testing.assert_close(out[mask], out_r)
    torch.testing.assert_close(dist[mask], dist_r)
    torch.testing.assert_close(loss, loss_r, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(z.grad[mask], zr.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(layer.weight.grad).all()
    # usage statistics count the real tokens only
    assert torch.equal(layer.codebook_usage().counts, ref.codebook_usage().counts)
    assert layer.codebook_usage().total == int(mask.sum())


def test_mask_all_padding_and_errors():
    layer = sk.SimVQ(8, 20)
    z = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out, idx, loss = layer(z, mask)
    assert loss.item() == 0.0 and bool((idx == -1).all()) and torch.equal(out, z)
    (out.sum() + loss).backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    with pytest.raises(ValueError, match="shape of the indices"):
        layer(z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer(z, torch.ones(2, 3))
    cf = sk.SimVQ(8, 20, channel_first=True)
    out, idx, _ = cf(torch.randn(2, 8, 3, 5), torch.ones(2, 3, 5, dtype=torch.bool))
    assert idx.shape == (2, 3, 5)
    out, idx, loss = layer(torch.randn(0, 8), torch.ones(0, dtype=torch.bool))
    assert idx.shape == (0,) and loss.item() == 0.0


# -------------------------------------------------------------------- distances

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_return_distances(dtype):
    torch.manual_seed(10)
    layer = sk.SimVQ(24, 700).to(dtype)
    z = torch.randn(3, 50, 24).to(dtype)
    out, idx, loss, dist = layer(z, return_distances=True)
    assert dist.shape == idx.shape
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    u = {torch.float32: 0.0, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}[dtype]
    q64 = project64(layer.basis, layer.weight, layer.bias)
    check_nearest(z.reshape(-1, 24), q64, idx.reshape(-1), dist.reshape(-1), u=u,
                  check_ties=False)
    d64 = dist64_rows(z.reshape(-1, 24), q64, idx.reshape(-1))
    assert bool((dist.reshape(-1).double().cpu() - d64).abs().max() <=
                1e-3 * (d64.max() + 1))


# ---------------------------------------------------------------------- usage

def test_usage_tracking():
    layer = sk.SimVQ(8, 30, track_usage=True)
    with pytest.raises(RuntimeError, match="track_usage"):
        sk.SimVQ(8, 30).codebook_usage()
    seen = []
    for s in range(3):
        _, idx, _ = layer(torch.randn(5, 7, 8, generator=_gen(s)))
        seen.append(idx.reshape(-1))
    usage = layer.codebook_usage()
    assert torch.equal(usage.counts, torch.bincount(torch.cat(seen), minlength=30))
    assert math.isclose(usage.utilisation(), float((usage.counts > 0).float().mean()))
    layer.double()  # counts stay integer and follow the module
    assert layer._usage_counts.dtype == torch.long
    assert usage.total == 105
    layer.reset_usage()
    assert layer.codebook_usage().total == 0
    assert "track_usage=True" in repr(layer)


def test_usage_counts_are_saved_and_resumed():
    """The counts live in the state dict (``usage_counts``): a resumed run continues
    them; a checkpoint without them (older versions) loads strictly and keeps the
    counts; a layer without tracking ignores them."""
    torch.manual_seed(30)
    layer = sk.SimVQ(8, 40, track_usage=True)
    layer(torch.randn(6, 9, 8, generator=_gen(31)))
    sd = layer.state_dict()
    assert torch.equal(sd["usage_counts"], layer._usage_counts)
    resumed = sk.SimVQ(8, 40, track_usage=True)
    resumed.load_state_dict(sd)
    assert torch.equal(resumed.codebook_usage().counts, layer.codebook_usage().counts)
    resumed(torch.randn(2, 3, 8, generator=_gen(32)))
    assert resumed.codebook_usage().total == 54 + 6
    old = {k: v for k, v in sd.items() if k != "usage_counts"}
    fresh = sk.SimVQ(8, 40, track_usage=True)
    fresh.load_state_dict(old)  # strict: no missing key
    assert fresh.codebook_usage().total == 0
    untracked = sk.SimVQ(8, 40)
    untracked.load_state_dict(sd)  # strict: no unexpected key
    assert "usage_counts" not in untracked.state_dict()
    assert "usage_counts" not in layer.state_dict_for("official")
    with pytest.raises(RuntimeError, match="usage_counts"):
        fresh.load_state_dict({**old, "usage_counts": torch.zeros(3, dtype=torch.long)})
    rvq = sk.ResidualSimVQ(8, 20, num_quantizers=2, track_usage=True)
    rvq(torch.randn(4, 8, generator=_gen(33)))
    rvq2 = sk.ResidualSimVQ(8, 20, num_quantizers=2, track_usage=True)
    rvq2.load_state_dict(rvq.state_dict())
    assert [u.total for u in rvq2.codebook_usage()] == [4, 4]


def test_channel_first_output_is_contiguous():
    """Code written for the official layer calls .view on the output."""
    layer = sk.SimVQ(16, 50, channel_first=True)
    out, idx, _ = layer(torch.randn(2, 16, 4, 4, generator=_gen(34)))
    assert out.is_contiguous() and out.view(2, -1).shape == (2, 256)
    assert layer.indices_to_codes(idx).is_contiguous()
    rvq = sk.ResidualSimVQ(16, 50, num_quantizers=2, channel_first=True)
    out, idx, _ = rvq(torch.randn(2, 16, 4, 4, generator=_gen(35)))
    assert out.is_contiguous() and rvq.indices_to_codes(idx).is_contiguous()


def test_backend_name_is_checked_at_construction():
    for make in (lambda: sk.SimVQ(8, 16, backend="cuad"),
                 lambda: sk.ResidualSimVQ(8, 16, num_quantizers=2, backend="cuad")):
        with pytest.raises(ValueError, match=r"`backend` 'cuad'.*'auto'.*'chunked'"):
            make()
