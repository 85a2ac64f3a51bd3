"""Side by side with vector-quantize-pytorch (the installed package, 1.32 API):
``sk.SimVQ`` / ``sk.ResidualSimVQ`` built with its constructor arguments and loaded
with its weights give the same indices, outputs, losses and gradients, and its public
methods exist with the same meaning and shapes. Small CPU shapes.

Defaults that differ on purpose (documented in docs/migration.md): ours has a bias and
the straight-through estimator by default (vector-quantize-pytorch: no bias, rotation
trick); our ResidualSimVQ applies one estimator to the sum of the stages and returns
the summed loss unless ``stagewise_estimator=True`` / ``return_all_losses=True``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import simvq_kernels as sk

vqp = pytest.importorskip("vector_quantize_pytorch")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(layer, x, up, **kw):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    res = layer(x, **kw)
    out, idx, loss = res[:3]
    ((out * up).sum() + loss.sum()).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), idx, loss.detach(), x.grad, grads, res[3:]


def _assert_same(a, b, what, rtol=1e-5, atol=1e-6):
    (o1, i1, l1, dx1, g1, _), (o2, i2, l2, dx2, g2, _) = a, b
    assert torch.equal(i1, i2), f"{what}: indices differ"
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol, msg=f"{what}: output")
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=1e-7, msg=f"{what}: loss")
    torch.testing.assert_close(dx2, dx1, rtol=1e-4, atol=1e-6, msg=f"{what}: dx")
    return g1, g2


def _param_grads_match(g_theirs, g_ours, names):
    for theirs, ours in names.items():
        torch.testing.assert_close(g_ours[ours], g_theirs[theirs], rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {ours} (theirs: {theirs})")


# ------------------------------------------------------------------------- SimVQ

@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("channel_first", [False, True])
def test_same_construction_same_layer(rotation_trick, channel_first):
    """Same seed, same arguments (vector-quantize-pytorch's names): the same basis and
    projection are drawn (bias=False: their default transform has none), and the
    forward and backward agree."""
    kw = dict(dim=16, codebook_size=300, frozen_codebook_dim=10, channel_first=channel_first,
              rotation_trick=rotation_trick, input_to_quantize_commit_loss_weight=0.3,
              commitment_weight=1.7, init_fn=lambda t: t * 2.0)
    torch.manual_seed(0)
    theirs = vqp.SimVQ(**kw)
    torch.manual_seed(0)
    ours = sk.SimVQ(bias=False, **kw)
    assert torch.equal(ours.frozen_codebook, theirs.frozen_codebook)
    assert torch.equal(ours.code_transform.weight, theirs.code_transform.weight)
    assert ours.input_to_quantize_commit_loss_weight == 0.3
    g = _gen(1)
    x = torch.randn(3, 16, 7, 3, generator=g) if channel_first else \
        torch.randn(3, 21, 16, generator=g)
    up = torch.randn(x.shape, generator=g)
    a, b = _run(theirs, x, up), _run(ours, x, up)
    g1, g2 = _assert_same(a, b, "SimVQ")
    _param_grads_match(g1, g2, {"code_transform.weight": "weight"})
    assert b[0].is_contiguous()
    torch.testing.assert_close(ours.codebook, theirs.codebook)
    torch.testing.assert_close(ours.indices_to_codes(b[1]), theirs.indices_to_codes(a[1]))


def test_linear_transform_with_bias_keeps_the_fused_path():
    torch.manual_seed(2)
    theirs = vqp.SimVQ(dim=12, codebook_size=200,
                       codebook_transform=nn.Linear(12, 12, bias=True), rotation_trick=False)
    ours = sk.SimVQ(dim=12, codebook_size=200, codebook_transform=nn.Linear(12, 12),
                    rotation_trick=False)
    assert ours._linear and ours.bias is not None
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 15, 12, generator=_gen(3))
    up = torch.randn(x.shape, generator=_gen(4))
    a, b = _run(theirs, x, up), _run(ours, x, up)
    g1, g2 = _assert_same(a, b, "Linear transform")
    _param_grads_match(g1, g2, {"code_transform.weight": "weight",
                                "code_transform.bias": "bias"})


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_mlp_transform(rotation_trick):
    """Any per-row module as the codebook transform: the search over transform(basis)
    without grad, zq = transform(basis[idx]) with grad: the same gradients as theirs
    (transform of the whole codebook, then a gather)."""
    def mlp():
        return nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 16))
    torch.manual_seed(5)
    theirs = vqp.SimVQ(dim=16, codebook_size=250, frozen_codebook_dim=8,
                       codebook_transform=mlp(), rotation_trick=rotation_trick)
    ours = sk.SimVQ(dim=16, codebook_size=250, frozen_codebook_dim=8,
                    codebook_transform=mlp(), rotation_trick=rotation_trick)
    assert not ours._linear
    ours.load_state_dict(theirs.state_dict())  # frozen_codebook, code_transform.{0,2}.*
    assert set(ours.state_dict()) == {"basis", "code_transform.0.weight",
                                      "code_transform.0.bias", "code_transform.2.weight",
                                      "code_transform.2.bias"}
    x = torch.randn(2, 30, 16, generator=_gen(6))
    up = torch.randn(x.shape, generator=_gen(7))
    a, b = _run(theirs, x, up), _run(ours, x, up)
    g1, g2 = _assert_same(a, b, "MLP transform")
    _param_grads_match(g1, g2, {n: n for n in g1})
    torch.testing.assert_close(ours.codebook, theirs.codebook)
    torch.testing.assert_close(ours.indices_to_codes(b[1]), theirs.indices_to_codes(a[1]))
    # and back into theirs
    back = vqp.SimVQ(dim=16, codebook_size=250, frozen_codebook_dim=8,
                     codebook_transform=mlp(), rotation_trick=rotation_trick)
    back.load_state_dict(ours.state_dict_for("vector_quantize_pytorch"))
    assert torch.equal(back(x)[1], b[1])


def test_transform_must_be_per_row():
    with pytest.raises(ValueError, match="`codebook_transform`"):
        sk.SimVQ(16, 50, codebook_transform=nn.Linear(16, 8))
    with pytest.raises(ValueError, match="`codebook_transform` must map"):
        sk.SimVQ(16, 50, codebook_transform=nn.Sequential(nn.Linear(16, 8)))
    with pytest.raises(TypeError, match="codebook_transform="):
        sk.SimVQ(16, 50, nn.Linear(16, 16))  # their third positional argument
    with pytest.raises(ValueError, match="`backend`.*'cuad'.*choose"):
        sk.SimVQ(16, 50, backend="cuad")


# ----------------------------------------------------------------- ResidualSimVQ

def _residual_pair(seed, **kw):
    torch.manual_seed(seed)
    theirs = vqp.ResidualSimVQ(**kw)
    ours = sk.ResidualSimVQ(bias=False, stagewise_estimator=True, return_all_losses=True,
                            **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("channel_first", [False, True])
def test_residual_stagewise_matches(rotation_trick, channel_first):
    theirs, ours = _residual_pair(8, dim=12, num_quantizers=3, codebook_size=128,
                                  rotation_trick=rotation_trick, channel_first=channel_first)
    g = _gen(9)
    x = torch.randn(2, 12, 10, generator=g) if channel_first else \
        torch.randn(2, 10, 12, generator=g)
    up = torch.randn(x.shape, generator=g)
    a = _run(theirs, x, up, return_all_codes=True)
    b = _run(ours, x, up, return_all_codes=True)
    g1, g2 = _assert_same(a, b, "ResidualSimVQ")
    assert b[2].shape == (3,)
    _param_grads_match(g1, g2, {f"layers.{i}.code_transform.weight": f"layers.{i}.weight"
                                for i in range(3)})
    torch.testing.assert_close(b[5][0], a[5][0], rtol=1e-5, atol=1e-6)  # all codes
    idx = b[1]
    torch.testing.assert_close(ours.get_codes_from_indices(idx),
                               theirs.get_codes_from_indices(idx))
    torch.testing.assert_close(ours.get_output_from_indices(idx),
                               theirs.get_output_from_indices(idx))
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)
    assert ours.codebook_size == theirs.codebook_size == 128


def test_residual_default_estimator_differs_only_in_dx():
    """Our default (one estimator on the sum, summed loss): same picks, output and total
    loss; dL/dx is not num_quantizers x the upstream gradient."""
    torch.manual_seed(10)
    theirs = vqp.ResidualSimVQ(dim=8, num_quantizers=4, codebook_size=64,
                               rotation_trick=False)
    ours = sk.ResidualSimVQ(8, 64, num_quantizers=4, bias=False)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 9, 8, generator=_gen(11))
    up = torch.randn(x.shape, generator=_gen(12))
    a, b = _run(theirs, x, up), _run(ours, x, up)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[2], a[2].sum(), rtol=1e-5, atol=1e-7)
    # theirs: 4 x upstream + commitment terms; ours: 1 x upstream + the same terms
    torch.testing.assert_close(a[3] - b[3], 3 * up, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("multiple_of", [1, 2])
def test_residual_quantize_dropout_with_fixed_seed(multiple_of):
    kw = dict(dim=8, num_quantizers=5, codebook_size=64, rotation_trick=False,
              quantize_dropout=True, quantize_dropout_cutoff_index=1,
              quantize_dropout_multiple_of=multiple_of)
    theirs, ours = _residual_pair(13, **kw)
    x = torch.randn(2, 6, 8, generator=_gen(14))
    up = torch.randn(x.shape, generator=_gen(15))
    seen_drop = False
    for seed in range(6):
        a = _run(theirs, x, up, rand_quantize_dropout_fixed_seed=seed)
        b = _run(ours, x, up, rand_quantize_dropout_fixed_seed=seed)
        _assert_same(a, b, f"dropout seed {seed}")
        seen_drop |= bool((b[1] == -1).any())
        torch.testing.assert_close(ours.get_output_from_indices(b[1]),
                                   theirs.get_output_from_indices(a[1]))
    assert seen_drop
    # fewer stages than num_quantizers decode (quantize dropout on)
    coarse = b[1][..., :2].clamp_min(0)
    torch.testing.assert_close(ours.get_output_from_indices(coarse),
                               theirs.get_output_from_indices(coarse))
    # eval mode: no dropout
    theirs.eval()
    ours.eval()
    assert bool((ours(x)[1] >= 0).all())


def test_residual_shared_mlp_transform():
    """vector-quantize-pytorch passes one codebook_transform to every stage (shared)."""
    torch.manual_seed(16)
    mlp_t = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    mlp_o = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    theirs = vqp.ResidualSimVQ(dim=8, num_quantizers=2, codebook_size=64,
                               codebook_transform=mlp_t)
    ours = sk.ResidualSimVQ(8, 64, num_quantizers=2, codebook_transform=mlp_o,
                            rotation_trick=True, stagewise_estimator=True,
                            return_all_losses=True)
    assert ours.layers[0].code_transform is ours.layers[1].code_transform
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 8, generator=_gen(17))
    up = torch.randn(x.shape, generator=_gen(18))
    a, b = _run(theirs, x, up), _run(ours, x, up)
    g1, g2 = _assert_same(a, b, "shared MLP")
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(dict(mlp_o.named_parameters())[name].grad,
                                   dict(mlp_t.named_parameters())[name].grad,
                                   rtol=1e-4, atol=1e-6)


def test_residual_constructor_arguments():
    with pytest.raises(ValueError, match="`heads`"):
        sk.ResidualSimVQ(8, 16, num_quantizers=2, heads=2)
    with pytest.raises(ValueError, match="`quantize_dropout_cutoff_index`"):
        sk.ResidualSimVQ(8, 16, num_quantizers=2, quantize_dropout=True,
                         quantize_dropout_cutoff_index=2)
    rvq = sk.ResidualSimVQ(8, 16, num_quantizers=2, quantize_dropout=True)
    assert rvq.codebook_dim == 8 and rvq.codebook_size == 16
