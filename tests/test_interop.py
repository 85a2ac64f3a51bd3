"""Interoperability with vector-quantize-pytorch's SimVQ (as installed from the package
index) and the official SimVQ checkpoint layout: the same weights give the same
outputs, indices, losses and gradients; state dicts load both ways.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import simvq_kernels as sk

vqp = pytest.importorskip("vector_quantize_pytorch")  # a test dependency (.[test])


def _pair(dim, k, r=None, rotation_trick=False, channel_first=False, bias=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(dim=dim, codebook_size=k, rotation_trick=rotation_trick,
              channel_first=channel_first)
    if r is not None:
        kw["frozen_codebook_dim"] = r
    if bias:
        kw["codebook_transform"] = nn.Linear(r or dim, dim, bias=True)
    theirs = vqp.SimVQ(**kw)
    ours = sk.SimVQ(dim, k, basis_dim=r, bias=bias, rotation_trick=rotation_trick,
                    channel_first=channel_first)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _fwd_bwd(layer, x, up, weight):
    x = x.detach().clone().requires_grad_(True)
    q, idx, loss = layer(x)
    ((q * up).sum() + loss).backward()
    return q.detach(), idx, loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("rotation_trick", [False, True])
@pytest.mark.parametrize("r", [None, 10])
@pytest.mark.parametrize("channel_first", [False, True])
def test_same_outputs_and_gradients_as_vector_quantize_pytorch(rotation_trick, r,
                                                                 channel_first):
    theirs, ours = _pair(16, 400, r, rotation_trick, channel_first)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 20, generator=g) if channel_first else \
        torch.randn(3, 20, 16, generator=g)
    up = torch.randn(x.shape, generator=g)
    q1, i1, l1, dx1, dw1 = _fwd_bwd(theirs, x, up, theirs.code_transform.weight)
    q2, i2, l2, dx2, dw2 = _fwd_bwd(ours, x, up, ours.weight)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx2, dx1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw2, dw1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.codebook, theirs.codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.indices_to_codes(i2), theirs.indices_to_codes(i1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_save_for_vector_quantize_pytorch(bias):
    torch.manual_seed(2)
    ours = sk.SimVQ(12, 300, basis_dim=7, bias=bias)
    if bias:
        with torch.no_grad():
            ours.bias.normal_()
    sd = ours.state_dict_for("vector_quantize_pytorch")
    assert set(sd) == {"frozen_codebook", "code_transform.weight"} | \
        ({"code_transform.bias"} if bias else set())
    kw = dict(codebook_transform=nn.Linear(7, 12, bias=True)) if bias else {}
    theirs = vqp.SimVQ(dim=12, codebook_size=300, frozen_codebook_dim=7,
                       rotation_trick=False, **kw)
    theirs.load_state_dict(sd)
    x = torch.randn(4, 9, 12)
    q1, i1, l1 = theirs(x)
    q2, i2, l2 = ours(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)


def test_official_layout_round_trip():
    torch.manual_seed(3)
    a = sk.SimVQ(10, 200, channel_first=True)
    sd = a.state_dict_for("official")
    assert set(sd) == {"embedding.weight", "embedding_proj.weight", "embedding_proj.bias"}
    assert torch.equal(sd["embedding.weight"], a.basis)
    b = sk.SimVQ(10, 200, channel_first=True)
    b.load_state_dict(sd)
    z = torch.randn(2, 10, 4, 4)
    for x, y in zip(a(z), b(z)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="layout"):
        a.state_dict_for("taming")


def test_residual_matches_vector_quantize_pytorch_forward():
    """vector-quantize-pytorch's ResidualSimVQ state dict loads into ours; the quantised
    value, indices and total loss agree. (Its gradient to x applies one straight-through
    estimator per stage, i.e. num_quantizers x dL/dout; ours applies one to the sum.)"""
    torch.manual_seed(4)
    theirs = vqp.ResidualSimVQ(dim=16, num_quantizers=3, codebook_size=256,
                               rotation_trick=False)
    ours = sk.ResidualSimVQ(16, 256, num_quantizers=3, bias=False)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 30, 16)
    q1, i1, l1 = theirs(x)
    q2, i2, l2 = ours(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q2, q1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, l1.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.indices_to_codes(i2),
                               theirs.get_output_from_indices(i1), rtol=1e-5, atol=1e-5)


def test_official_checkpoint_keys_under_a_prefix():
    """A tokenizer checkpoint holds the quantiser under a prefix ('quantize.')."""
    torch.manual_seed(5)
    k, d = 128, 8
    ckpt = {"quantize.embedding.weight": torch.randn(k, d) * d**-0.5,
            "quantize.embedding_proj.weight": torch.randn(d, d) / math.sqrt(d),
            "quantize.embedding_proj.bias": torch.randn(d) * 0.1,
            "encoder.weight": torch.randn(d, 3)}
    model = nn.Module()
    model.quantize = sk.SimVQ(d, k)
    model.encoder = nn.Linear(3, d, bias=False)
    model.load_state_dict(ckpt)
    torch.testing.assert_close(model.quantize.codebook,
                               ckpt["quantize.embedding.weight"] @
                               ckpt["quantize.embedding_proj.weight"].T +
                               ckpt["quantize.embedding_proj.bias"])
