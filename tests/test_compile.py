"""torch.compile: no graph break on the fused path, opcheck of every op, compiled == eager.

- ``torch.compile(fullgraph=True, backend="aot_eager")`` of a small encoder -> SimVQ ->
  decoder model, for every backend available here and for the variants (mask,
  return_distances, rotation trick, channel-first, basis_dim != dim, usage tracking,
  ResidualSimVQ, autocast), gives the eager outputs and gradients; ``fullgraph=True``
  makes any graph break an error, and ``torch._dynamo.explain`` confirms one graph.
  aot_eager traces forward and backward through the fake kernels and the registered
  autograd but runs the real kernels, so the comparison with eager is tight.
- ``torch.library.opcheck`` passes for each op (schema, fake kernel, autograd
  registration, AOT dispatch with dynamic shapes) on every device available.
- ONE inductor compile (CPU; slow: it runs the C++ compiler) of the model, forward and
  backward, compared with eager.
- CUDA versions run only where CUDA is available (skipped otherwise).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simvq_kernels as sk

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in sk.available_backends()]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Tokenizer(nn.Module):
    """A toy tokenizer: encoder -> quantiser -> decoder, objective recon + VQ loss."""

    def __init__(self, vq, d_in=6, dim=16, channel_first=False):
        super().__init__()
        self.enc = nn.Linear(d_in, dim)
        self.vq = vq
        self.dec = nn.Linear(dim, d_in)
        self.channel_first = channel_first

    def forward(self, x, mask=None, return_distances=False):
        h = self.enc(x)
        if self.channel_first:
            h = h.movedim(-1, 1)
        res = self.vq(h, mask, return_distances=return_distances)
        out = res[0].movedim(1, -1) if self.channel_first else res[0]
        recon = self.dec(out)
        return (F.mse_loss(recon, x) + res[2], recon) + tuple(res[1:2]) + tuple(res[3:])


def _run(model, x, mask=None, return_distances=False):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    outs = model(x, mask, return_distances)
    outs[0].backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return [o.detach() for o in outs], grads


def _compare(eager, compiled, x, mask=None, return_distances=False, exact_idx=True,
             rtol=1e-6, atol=1e-7):
    e_out, e_g = _run(eager, x, mask, return_distances)
    c_out, c_g = _run(compiled, x, mask, return_distances)
    assert len(e_out) == len(c_out)
    for i, (a, b) in enumerate(zip(c_out, e_out)):
        if a.dtype == torch.long:
            if exact_idx:
                assert torch.equal(a, b), f"output {i}: indices differ from eager"
        else:
            assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype} != eager {b.dtype}"
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"output {i}")
    assert set(c_g) == set(e_g)
    for n in e_g:
        torch.testing.assert_close(c_g[n], e_g[n], rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad {n}: {m}")
    return e_out, c_out


def _assert_one_graph(model, *args):
    ex = torch._dynamo.explain(model)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


# ----------------------------------------------------------------- aot_eager, fullgraph

@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = Tokenizer(sk.SimVQ(16, 300, backend=backend))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 25, 6)
    _compare(model, compiled, x)
    assert compiled.vq.last_backend == backend == model.vq.last_backend
    _assert_one_graph(model, x)


VARIANTS = {
    "mask+distances": dict(kw={}, mask=True, dists=True),
    "rotation_trick": dict(kw=dict(rotation_trick=True)),
    "channel_first": dict(kw=dict(channel_first=True), cf=True),
    "basis_dim!=dim": dict(kw=dict(basis_dim=7, bias=False)),
    "legacy+usage": dict(kw=dict(legacy=True, track_usage=True), mask=True),
    "residual": dict(residual=True, mask=True, dists=True),
    "residual_rotation": dict(residual=True, kw=dict(rotation_trick=True)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fullgraph_variants(name):
    v = VARIANTS[name]
    torch.manual_seed(1)
    if v.get("residual"):
        vq = sk.ResidualSimVQ(16, 200, num_quantizers=3, **v.get("kw", {}))
    else:
        vq = sk.SimVQ(16, 200, **v.get("kw", {}))
    model = Tokenizer(vq, channel_first=v.get("cf", False))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 20, 6)
    mask = (torch.rand(3, 20, generator=torch.Generator().manual_seed(2)) > 0.3) \
        if v.get("mask") else None
    _compare(model, compiled, x, mask, v.get("dists", False))
    if vq.__class__ is sk.SimVQ and vq.track_usage:
        # the compiled copy counted the same codes as the eager one
        assert torch.equal(compiled.vq._usage_counts, model.vq._usage_counts)
        assert int(model.vq._usage_counts.sum()) == int(mask.sum())
    _assert_one_graph(model, x, mask, v.get("dists", False))


def test_fullgraph_under_autocast_bf16():
    torch.manual_seed(3)
    model = Tokenizer(sk.SimVQ(16, 300))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 25, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e_out, c_out = _compare(model, compiled, x, rtol=1e-5, atol=1e-6)
    assert c_out[1].dtype == torch.bfloat16  # recon from the autocast decoder


def test_dynamic_batch_sizes_one_compile():
    torch.manual_seed(4)
    model = Tokenizer(sk.SimVQ(16, 100))
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(copy.deepcopy(model), backend=cnt, fullgraph=True, dynamic=True)
    for n in (7, 19, 33):
        _compare(model, compiled, torch.randn(2, n, 6))
    assert cnt.frame_count == 1


def test_nonfinite_input_under_compile_raises():
    layer = sk.SimVQ(8, 20)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    z = torch.randn(5, 8)
    compiled(z)
    z[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="`z` contains NaN"):
        compiled(z)
    # padded tokens may hold anything: they are zeroed before the check
    mask = torch.ones(5, dtype=torch.bool)
    mask[2] = False
    out, idx, _ = compiled(z, mask)
    assert idx[2] == -1 and torch.isnan(out[2, 3])


def test_bare_ops_compile_before_extension_is_loaded():
    """In a fresh process (extension not loaded yet), a compiled function calling the
    public ops resolves the backend (and loads the extension) at trace time."""
    code = r"""
import sys, torch, simvq_kernels as sk
assert "simvq_kernels._C" not in sys.modules
def f(z, basis, w, b, cb):
    zq, idx = sk.simvq_quantize(z, basis, w, b)
    i2, d2 = sk.nearest_code(z, cb)
    return zq, idx, i2, d2
g = torch.Generator().manual_seed(0)
z, basis, cb = torch.randn(50, 8, generator=g), torch.randn(90, 5, generator=g), torch.randn(40, 8, generator=g)
w = torch.randn(8, 5, generator=g, requires_grad=True); b = torch.randn(8, generator=g, requires_grad=True)
c = torch.compile(f, backend="aot_eager", fullgraph=True)(z, basis, w, b, cb)
e = f(z, basis, w, b, cb)
for x, y in zip(c, e):
    assert torch.equal(x, y)
c[0].sum().backward()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---------------------------------------------------------------------------- opcheck

def _opcheck_all(device):
    from torch.library import opcheck

    g = torch.Generator().manual_seed(21)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for n in (0, 37):
            z = torch.randn(n, 12, generator=g).to(device=device, dtype=dtype)
            cb = torch.randn(300, 12, generator=g).to(device=device, dtype=dtype)
            opcheck(torch.ops.simvq.nearest_code.default, (z, cb))
            # the pure-PyTorch searches, registered as custom ops for tracing
            opcheck(torch.ops.simvq_py.reference_nearest_code.default, (z, cb))
            opcheck(torch.ops.simvq_py.chunked_nearest_code.default, (z, cb))
            basis = torch.randn(300, 6, generator=g).to(device=device, dtype=dtype)
            # ties among identical basis rows (with some duplicated rows)
            opcheck(torch.ops.simvq_py.first_of_duplicates.default, (basis,))
            opcheck(torch.ops.simvq_py.first_of_duplicates.default, (basis[torch.arange(300) % 7],))
            w = torch.randn(12, 6, generator=g).to(device=device, dtype=dtype)
            b = torch.randn(12, generator=g).to(device=device, dtype=dtype)
            w.requires_grad_(True)
            b.requires_grad_(True)
            opcheck(torch.ops.simvq.quantize.default, (z, basis, w, b))
            opcheck(torch.ops.simvq.quantize.default, (z, basis, w, None))
            idx = torch.randint(0, 300, (n,), generator=g).to(device)
            gz = torch.randn(n, 12, generator=g).to(device=device, dtype=dtype)
            opcheck(torch.ops.simvq.quantize_backward.default, (gz, basis, idx, w.detach()))


def test_opcheck_every_op_cpu():
    assert "cpu" in sk.available_backends(), sk.backend_status()
    _opcheck_all("cpu")


@cuda_only
def test_opcheck_every_op_cuda():
    if "cuda" in sk.available_backends():
        _opcheck_all("cuda")
    else:  # only the pure-PyTorch searches serve CUDA tensors in this build
        from torch.library import opcheck

        z = torch.randn(37, 12, device="cuda")
        cb = torch.randn(300, 12, device="cuda")
        opcheck(torch.ops.simvq_py.reference_nearest_code.default, (z, cb))
        opcheck(torch.ops.simvq_py.chunked_nearest_code.default, (z, cb))


# ------------------------------------------------------------------------- inductor

def test_inductor_matches_eager():
    """The one inductor test (CPU inductor runs the C++ compiler: slow)."""
    torch.manual_seed(5)
    model = Tokenizer(sk.SimVQ(16, 300, track_usage=True))
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(4, 25, 6)
    mask = torch.rand(4, 25, generator=torch.Generator().manual_seed(6)) > 0.2
    # inductor fuses the surrounding ops, so allow fp32 reassociation
    _compare(model, compiled, x, mask, True, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- CUDA

@cuda_only
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_cuda_fullgraph_matches_eager(compile_backend):
    torch.manual_seed(7)
    model = Tokenizer(sk.SimVQ(16, 300)).cuda()
    compiled = torch.compile(copy.deepcopy(model), backend=compile_backend, fullgraph=True)
    x = torch.randn(4, 25, 6, device="cuda")
    mask = torch.rand(4, 25, device="cuda") > 0.2
    _compare(model, compiled, x, mask, True, rtol=1e-4, atol=1e-5)
    _assert_one_graph(model, x, mask, True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fullgraph_under_autocast(dtype):
    torch.manual_seed(8)
    model = Tokenizer(sk.SimVQ(16, 300)).cuda()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 25, 6, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        _compare(model, compiled, x, rtol=1e-3, atol=1e-5)


def test_unavailable_backend_error_under_compile():
    # 'cuda' cannot serve CPU tensors, whether or not the extension has CUDA kernels
    layer = sk.SimVQ(8, 20, backend="cuda")
    # without fullgraph the failed trace falls back to eager, which raises the usual error
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        torch.compile(layer, backend="aot_eager")(torch.randn(3, 8))
    # with fullgraph the compile error carries the same message
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot serve float32 tensors on cpu"):
        torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(3, 8))
