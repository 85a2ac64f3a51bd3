"""The drop-in targets for the official SimVQ code (simvq_kernels.official.SimVQ and
SimVQ1D): constructor signature, return values, layouts, state-dict keys, remapping and
get_codebook_entry, checked against a float64 reference of the official math written
out here (CI cannot fetch the official repository).
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from simvq_kernels import official

from .oracle import assert_close_scaled, check_nearest, grad_rtol, project64, \
    reference_layer64

OFFICIAL_SIGNATURE = [("n_e", inspect.Parameter.empty), ("e_dim", inspect.Parameter.empty),
                      ("beta", 0.25), ("remap", None), ("unknown_index", "random"),
                      ("sane_index_shape", False), ("legacy", True)]
OFFICIAL_KEYS = ["embedding.weight", "embedding_proj.weight", "embedding_proj.bias"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _instantiate(target, params):
    """What the official code's ``instantiate_from_config`` does with a config."""
    module, cls = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**params)


def official64(z, basis, weight, bias, beta, legacy):
    """The official forward in float64, channel-first z (B, C, *S): the full distance
    matrix ||z||^2 + ||Q||^2 - 2 z Q^T, argmin, z_q, the commitment loss."""
    zc = z.double().movedim(1, -1)
    flat = zc.reshape(-1, zc.shape[-1])
    q = project64(basis, weight, bias)
    d = (flat ** 2).sum(1, keepdim=True) + (q ** 2).sum(1) - 2 * flat @ q.T
    idx = d.argmin(1)
    zq = q[idx].view(zc.shape)
    a, b = ((1.0, beta) if legacy else (beta, 1.0))
    loss = a * ((zq - zc) ** 2).mean() + b * ((zq - zc) ** 2).mean()
    return idx, zq.movedim(-1, 1), loss


@pytest.mark.parametrize("cls", [official.SimVQ, official.SimVQ1D])
def test_constructor_signature_matches_the_official(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    positional = [(p.name, p.default) for p in params
                  if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == OFFICIAL_SIGNATURE
    # extras are keyword-only
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[len(positional):])


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("sane", [False, True])
def test_image_target_against_the_official_math(legacy, sane):
    torch.manual_seed(0)
    q = _instantiate("simvq_kernels.official.SimVQ",
                     dict(n_e=300, e_dim=16, beta=0.25, legacy=legacy,
                          sane_index_shape=sane))
    assert (q.n_e, q.e_dim, q.beta, q.legacy, q.re_embed) == (300, 16, 0.25, legacy, 300)
    g = _gen(1)
    z = torch.randn(3, 16, 5, 4, generator=g, requires_grad=True)
    up = torch.randn(z.shape, generator=g)
    (z_q, emb_loss, indices), br = q(z)
    assert isinstance(br, official.LossBreakdown)
    assert br._fields == ("per_sample_entropy", "codebook_entropy", "commitment", "avg_probs")
    for t in (emb_loss, br.per_sample_entropy, br.codebook_entropy, br.avg_probs):
        assert t.shape == () and float(t) == 0.0
    assert z_q.shape == z.shape and z_q.is_contiguous()
    assert z_q.view(3, -1).shape == (3, 16 * 20)  # the official code calls .view
    assert indices.dtype == torch.long
    assert indices.shape == ((3, 5, 4) if sane else (3 * 5 * 4,))
    flat_idx = indices.reshape(-1)  # (b, h, w) order, as the official flattening
    zf = z.detach().movedim(1, -1).reshape(-1, 16)
    q64 = project64(q.embedding.weight, q.embedding_proj.weight, q.embedding_proj.bias)
    d = ((zf.double() - q64[flat_idx]) ** 2).sum(-1)
    check_nearest(zf, q64, flat_idx, d.float(), u=0.0, what="official image target")
    idx64, zq64, loss64 = official64(z.detach(), q.basis, q.weight, q.bias, 0.25, legacy)
    agree = float((idx64 == flat_idx).double().mean())
    assert agree > 0.95, f"index agreement with the official math {agree}"
    ref = reference_layer64(zf, q.basis, q.weight, q.bias, flat_idx, up.movedim(1, -1)
                            .reshape(-1, 16), beta=0.25, legacy=legacy)
    torch.testing.assert_close(z_q.detach().movedim(1, -1).reshape(-1, 16).double(),
                               ref["out"], rtol=1e-5, atol=1e-5)
    ((z_q * up).sum() + br.commitment).backward()
    rtol = grad_rtol(torch.float32)
    assert_close_scaled(br.commitment, ref["loss"], ref["scale_loss"], rtol, "loss")
    assert_close_scaled(z.grad.movedim(1, -1).reshape(-1, 16), ref["dz"], ref["scale_dz"],
                        rtol, "dz")
    assert_close_scaled(q.weight.grad, ref["dW"], ref["scale_dW"], rtol, "dW")
    assert_close_scaled(q.bias.grad, ref["db"], ref["scale_db"], rtol, "db")
    if bool((idx64 == flat_idx).all()):
        torch.testing.assert_close(br.commitment.double(), loss64, rtol=1e-5, atol=1e-7)


def test_audio_target_layouts_and_values():
    torch.manual_seed(2)
    q = official.SimVQ1D(n_e=200, e_dim=12, beta=0.25, legacy=False)
    z = torch.randn(2, 12, 9, generator=_gen(3))
    (z_q, _, indices), br = q(z)
    assert z_q.shape == (2, 12, 9) and z_q.is_contiguous() and indices.shape == (18,)
    zf = z.movedim(1, -1).reshape(-1, 12)
    q64 = project64(q.basis, q.weight, q.bias)
    check_nearest(zf, q64, indices, ((zf.double() - q64[indices]) ** 2).sum(-1).float(),
                  u=0.0, what="official audio target")
    torch.testing.assert_close(z_q.movedim(1, -1).reshape(-1, 12).double(), q64[indices],
                               rtol=1e-5, atol=1e-5)
    # get_codebook_entry applies the projection (the official one does not)
    codes = q.get_codebook_entry(indices, (2, 9, 12))
    assert codes.shape == (2, 12, 9)
    torch.testing.assert_close(codes, z_q, rtol=1e-5, atol=1e-5)
    assert q.get_codebook_entry(indices, None).shape == (18, 12)
    sane = official.SimVQ1D(200, 12, sane_index_shape=True)
    assert sane(z)[0][2].shape == (2, 9)
    with pytest.raises(ValueError, match=r"\(B, e_dim, T\)"):
        q(torch.randn(2, 12, 3, 3))


def test_get_codebook_entry_reproduces_z_q():
    torch.manual_seed(4)
    q = official.SimVQ(256, 8, legacy=False)
    z = torch.randn(2, 8, 3, 5, generator=_gen(5))
    (z_q, _, indices), _ = q(z)
    codes = q.get_codebook_entry(indices, (2, 3, 5, 8))
    assert codes.shape == z.shape and codes.is_contiguous()
    torch.testing.assert_close(codes, z_q, rtol=1e-5, atol=1e-5)
    # and not the unprojected basis rows
    assert not torch.allclose(codes, q.basis[indices].view(2, 3, 5, 8).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="`shape`"):
        q.get_codebook_entry(indices, (2, 3, 5, 7))


def test_state_dict_keys_and_official_checkpoints():
    torch.manual_seed(6)
    q = official.SimVQ(128, 8)
    sd = q.state_dict()
    assert list(sd) == OFFICIAL_KEYS
    # a checkpoint written by the official layer (its keys, made by hand here) loads
    g = _gen(7)
    ckpt = {"embedding.weight": torch.randn(128, 8, generator=g) * 8 ** -0.5,
            "embedding_proj.weight": torch.randn(8, 8, generator=g),
            "embedding_proj.bias": torch.randn(8, generator=g)}
    p = official.SimVQ(128, 8)
    p.load_state_dict(ckpt)
    torch.testing.assert_close(p.codebook, ckpt["embedding.weight"] @
                               ckpt["embedding_proj.weight"].T + ckpt["embedding_proj.bias"])
    assert all(torch.equal(p.state_dict()[k], ckpt[k]) for k in OFFICIAL_KEYS)
    # inside a model, under a prefix, and into a plain sk.SimVQ
    import simvq_kernels as sk
    plain = sk.SimVQ(8, 128, channel_first=True)
    plain.load_state_dict(p.state_dict())
    z = torch.randn(2, 8, 4, 4, generator=g)
    assert torch.equal(plain(z)[1].reshape(-1), p(z)[0][2])
    # the official parameters() hold the trainable projection (the basis is a buffer)
    assert {n for n, _ in p.named_parameters()} == {"weight", "bias"}


def test_remap(tmp_path):
    np = pytest.importorskip("numpy")
    torch.manual_seed(8)
    used = np.array([5, 17, 3, 40, 22, 9], dtype=np.int64)
    path = tmp_path / "used.npy"
    np.save(path, used)
    for unknown in ("extra", 2):
        q = official.SimVQ(64, 8, remap=str(path), unknown_index=unknown)
        assert list(q.state_dict()) == ["used"] + OFFICIAL_KEYS
        assert q.re_embed == (7 if unknown == "extra" else 6)
        z = torch.randn(2, 8, 4, 4, generator=_gen(9))
        (z_q, _, ind), _ = q(z)
        assert ind.shape == (32, 1)
        codes = q(z)[0][2]
        plain = q.encode(z).reshape(-1)
        lookup = {int(c): i for i, c in enumerate(used)}
        fallback = 6 if unknown == "extra" else 2
        want = torch.tensor([lookup.get(int(c), fallback) for c in plain])
        assert torch.equal(ind.reshape(-1), want) and torch.equal(codes, ind)
        # known codes decode back to their projected codes
        known = torch.tensor([int(c) in lookup for c in plain])
        dec = q.get_codebook_entry(ind, (2, 4, 4, 8)).movedim(1, -1).reshape(-1, 8)
        torch.testing.assert_close(dec[known], z_q.movedim(1, -1).reshape(-1, 8)[known],
                                   rtol=1e-5, atol=1e-5)
    q = official.SimVQ(64, 8, remap=str(path), unknown_index="random")
    ind = q(torch.randn(2, 8, 4, 4, generator=_gen(10)))[0][2]
    assert bool((ind >= 0).all()) and bool((ind < 6).all())


def test_interface_only_arguments_and_bad_input():
    q = official.SimVQ(32, 8)
    z = torch.randn(1, 8, 2, 2)
    q(z, temp=1.0)
    with pytest.raises(ValueError, match="`temp`"):
        q(z, temp=0.5)
    with pytest.raises(ValueError, match="`rescale_logits`"):
        q(z, rescale_logits=True)
    with pytest.raises(ValueError, match="`return_logits`"):
        q(z, return_logits=True)
    with pytest.raises(ValueError, match=r"\(B, e_dim, H, W\)"):
        q(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="`backend`"):
        official.SimVQ(32, 8, backend="cuad")
