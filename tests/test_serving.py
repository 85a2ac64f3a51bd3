"""The serving path: ``encode`` / ``decode`` and the cached codebook.

``encode(z)`` must give ``forward``'s indices (checked against the float64 oracle,
design.md §3), ``decode`` the codes of the indices in ``forward``'s layout, and the
cached codebook must never be stale: every way a parameter or buffer can change (an
optimizer step, ``load_state_dict``, in-place writes, ``.data`` writes, ``.to()``) is
seen by the next call. Small CPU shapes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import simvq_kernels as sk

from .oracle import check_nearest, project64

BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in sk.available_backends()]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_picks(layer, z, idx, what):
    """idx are valid nearest codes of z under the layer's current weights (oracle)."""
    zf = (z.movedim(1, -1) if layer.channel_first else z).reshape(-1, layer.dim)
    if layer._linear:
        q64 = project64(layer.basis, layer.weight, layer.bias)
    else:
        with torch.no_grad():
            q64 = layer.code_transform.double()(layer.basis.double())
            layer.code_transform.float()
    d = ((zf.double() - q64[idx.reshape(-1)]) ** 2).sum(-1)
    check_nearest(zf, q64, idx.reshape(-1), d.float(), u=0.0, check_ties=False, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channel_first", [False, True])
def test_encode_decode_match_forward(backend, channel_first):
    torch.manual_seed(0)
    layer = sk.SimVQ(12, 300, basis_dim=7, channel_first=channel_first, backend=backend)
    z = torch.randn(3, 12, 5, 4, generator=_gen(1)) if channel_first else \
        torch.randn(3, 20, 12, generator=_gen(1))
    out, idx, _ = layer(z)
    enc = layer.encode(z)
    assert enc.dtype == torch.long and enc.shape == idx.shape
    assert layer.last_backend == backend
    _check_picks(layer, z, enc, "encode")
    assert torch.equal(enc, idx)
    codes = layer.decode(enc)
    assert codes.shape == z.shape and codes.is_contiguous() and not codes.requires_grad
    torch.testing.assert_close(codes, out.detach(), rtol=1e-5, atol=1e-5)
    # the same under no_grad / inference_mode (forward then serves from the cache too)
    with torch.no_grad():
        out2, idx2, loss2 = layer(z)
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(out2, out.detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(layer.encode(z), idx)
        out3, idx3, _ = layer(z)
        assert torch.equal(idx3, idx)


def test_encode_with_mask_and_decode_padding_to_zeros():
    torch.manual_seed(2)
    layer = sk.SimVQ(8, 64)
    z = torch.randn(2, 10, 8, generator=_gen(3))
    mask = torch.rand(2, 10, generator=_gen(4)) > 0.4
    z[~mask] = float("nan")  # padding may hold anything
    _, idx, _ = layer(z, mask)
    enc = layer.encode(z, mask)
    assert torch.equal(enc, idx) and bool((enc[~mask] == -1).all())
    codes = layer.decode(enc)  # -1 decodes to zeros, documented
    assert bool((codes[~mask] == 0).all())
    torch.testing.assert_close(codes[mask], layer.indices_to_codes(enc[mask]))
    with pytest.raises(ValueError, match="`indices` must lie in"):
        layer.decode(torch.tensor([-2]))


def _cache_calls(layer):
    """Count codebook projections (cache misses)."""
    calls = []
    orig = layer._projected

    def counted(sdt):
        calls.append(sdt)
        return orig(sdt)
    layer._projected = counted
    return calls


def test_cache_is_reused_and_never_stale():
    torch.manual_seed(5)
    layer = sk.SimVQ(16, 500)
    calls = _cache_calls(layer)
    g = _gen(6)
    z = torch.randn(40, 16, generator=g)
    e1 = layer.encode(z)
    layer.encode(z)
    with torch.no_grad():
        layer(z)
    assert len(calls) == 1  # one projection for three calls

    def changed(step, expect_new_picks=True):
        before = len(calls)
        e = layer.encode(z)
        assert len(calls) == before + 1, f"{step}: the codebook was not recomputed"
        _check_picks(layer, z, e, step)
        return e

    # an optimizer step
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    out, _, loss = layer(z)
    (loss + out.square().mean()).backward()
    opt.step()
    e2 = changed("optimizer step")
    assert not torch.equal(e1, e2)
    # in-place under no_grad, a .data write (no version bump), load_state_dict
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    changed("in-place mul_")
    layer.weight.data.copy_(torch.randn(16, 16, generator=g))
    changed(".data copy_")
    layer.bias.data = torch.randn(16, generator=g)
    changed(".data assignment")
    other = sk.SimVQ(16, 500)
    layer.load_state_dict(other.state_dict())
    changed("load_state_dict (basis and weights)")
    with torch.no_grad():
        layer.basis.add_(0.5)
    changed("in-place change of the basis")
    # dtype change
    layer.double()
    e = layer.encode(z.double())
    _check_picks(layer, z.double(), e, "double")
    layer.float()
    layer.encode(z)
    n = len(calls)
    layer.encode(z)
    assert len(calls) == n


def test_ema_swap_through_data_is_seen():
    """taming's LitEma swaps EMA weights in with ``param.data.copy_`` for validation
    (no version bump): the cache must notice the new values and the swap back."""
    torch.manual_seed(7)
    layer = sk.SimVQ(8, 200)
    z = torch.randn(50, 8, generator=_gen(8))
    train_w = layer.weight.detach().clone()
    ema_w = torch.randn(8, 8, generator=_gen(9))
    e_train = layer.encode(z)
    layer.weight.data.copy_(ema_w)
    with torch.no_grad():
        e_ema = layer.encode(z)
    _check_picks(layer, z, e_ema, "ema weights")
    assert not torch.equal(e_train, e_ema)
    layer.weight.data.copy_(train_w)
    assert torch.equal(layer.encode(z), e_train)


def test_generic_transform_cache_sees_its_parameters():
    torch.manual_seed(10)
    mlp = nn.Sequential(nn.Linear(6, 20), nn.SiLU(), nn.Linear(20, 8))
    layer = sk.SimVQ(8, 150, basis_dim=6, codebook_transform=mlp)
    calls = _cache_calls(layer)
    z = torch.randn(30, 8, generator=_gen(11))
    e1 = layer.encode(z)
    layer.encode(z)
    assert len(calls) == 1
    with torch.no_grad():
        mlp[0].weight.mul_(3.0)
    e2 = layer.encode(z)
    assert len(calls) == 2
    _check_picks(layer, z, e2, "transform changed")
    assert not torch.equal(e1, e2)


def test_residual_encode_decode():
    torch.manual_seed(12)
    rvq = sk.ResidualSimVQ(8, 100, num_quantizers=3, channel_first=True)
    z = torch.randn(2, 8, 6, generator=_gen(13))
    out, idx, _ = rvq(z)
    enc = rvq.encode(z)
    assert torch.equal(enc, idx)
    dec = rvq.decode(enc)
    assert dec.is_contiguous()
    torch.testing.assert_close(dec, out.detach(), rtol=1e-5, atol=1e-5)


def test_encode_compiles_and_is_not_stale():
    torch.manual_seed(14)
    layer = sk.SimVQ(8, 64, backend="chunked")
    z = torch.randn(20, 8, generator=_gen(15))
    enc = torch.compile(layer.encode, fullgraph=True)
    with torch.no_grad():
        e1 = enc(z)
        assert torch.equal(e1, layer.encode(z))
        layer.weight.mul_(-1.0)
        e2 = enc(z)
    assert torch.equal(e2, layer.encode(z))
    _check_picks(layer, z, e2, "compiled after an update")


def test_encode_rejects_bad_input():
    layer = sk.SimVQ(8, 32)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        layer.encode(torch.randn(4, 7))
    with pytest.raises(TypeError, match="float64"):
        layer.encode(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="`z` contains NaN"):
        layer.encode(torch.full((2, 8), float("nan")))


def test_sharded_encode_single_rank():
    """ShardedSimVQ.encode runs the sharded search (here on a one-rank gloo group)."""
    import socket

    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(16)
        single = sk.SimVQ(8, 90)
        layer = sk.ShardedSimVQ.from_simvq(single)
        z = torch.randn(3, 7, 8, generator=_gen(17))
        enc = layer.encode(z)
        assert torch.equal(enc, single.encode(z))
        assert torch.equal(enc, layer(z)[1])
        torch.testing.assert_close(layer.decode(enc), single.decode(enc))
    finally:
        dist.destroy_process_group()


def test_encode_under_autocast_bf16():
    torch.manual_seed(18)
    layer = sk.SimVQ(16, 400)
    z = torch.randn(60, 16, generator=_gen(19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _ = layer(z)
        enc = layer.encode(z)
        with torch.no_grad():
            _, idx_ng, _ = layer(z)
    assert torch.equal(enc, idx_ng)
    # picks within the bf16 criterion of the codebook of the bf16-rounded parameters
    bf = {n: getattr(layer, n).detach().bfloat16().float() for n in ("basis", "weight", "bias")}
    q64 = project64(bf["basis"], bf["weight"], bf["bias"])
    zb = z.bfloat16().float()
    d = ((zb.double() - q64[enc]) ** 2).sum(-1)
    check_nearest(zb, q64, enc, d.float(), u=2.0**-8, check_ties=False, what="autocast")
    assert float((enc == idx).double().mean()) > 0.9


def test_mlp_transform_compiles():
    """A non-linear codebook transform traces with fullgraph=True (the codebook is
    projected in the graph) and gives eager's outputs and gradients."""
    torch.manual_seed(20)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 8))
    layer = sk.SimVQ(8, 90, basis_dim=6, codebook_transform=mlp, backend="chunked")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    z = torch.randn(4, 7, 8, generator=_gen(21))
    res = []
    for f in (layer, compiled):
        for p in layer.parameters():
            p.grad = None
        zz = z.clone().requires_grad_(True)
        out, idx, loss = f(zz)
        (out.square().sum() + loss).backward()
        res.append((out.detach(), idx, loss.detach(), zz.grad,
                    [p.grad.clone() for p in layer.parameters()]))
    (o1, i1, l1, g1, p1), (o2, i2, l2, g2, p2) = res
    assert torch.equal(i1, i2)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(g2, g1)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a)


def test_layer_built_in_inference_mode_still_serves():
    """Parameters created under inference_mode have no version counter: nothing is
    cached, every call projects afresh."""
    with torch.inference_mode():
        layer = sk.SimVQ(8, 40)
        z = torch.randn(10, 8, generator=_gen(22))
        e1 = layer.encode(z)
        layer.weight.mul_(-1.0)
        e2 = layer.encode(z)
    _check_picks(layer, z, e2, "inference-mode layer")
    assert not torch.equal(e1, e2)
