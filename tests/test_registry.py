"""The backend registry: one object per backend, what "auto" picks, and why not."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import _ext, ops
from simvq_kernels import backends as B
from simvq_kernels.backends import validation


def test_every_backend_is_one_object_with_its_calls():
    for name, b in B.BACKENDS.items():
        assert b.name == name
        for call in ("nearest_code", "quantize", "quantize_backward", "why_not",
                     "install_problem"):
            assert callable(getattr(b, call)), (name, call)
        # the calls are the backend's own, not the base class's placeholders
        for call in ("nearest_code", "quantize", "quantize_backward"):
            assert getattr(type(b), call) is not getattr(B.Backend, call), (name, call)


def test_dispatch_does_not_branch_on_backend_names():
    src = inspect.getsource(ops)
    for name in B.BACKENDS:
        assert not re.search(rf"==\s*['\"]{name}['\"]", src), name
        assert not re.search(rf"in\s*\([^)]*['\"]{name}['\"]", src), name


def test_extension_loader_imports_no_dispatch_module():
    src = inspect.getsource(_ext)
    assert "import ops" not in src and "from .ops" not in src


def test_auto_on_cuda_runs_chunked_until_a_gpu_backend_is_validated(monkeypatch):
    dev = torch.device("cuda", 0)
    assert sk.select_backend("auto", dev, torch.bfloat16) == "chunked"
    # pretend triton can serve CUDA tensors here: still not picked until validated
    monkeypatch.setattr(type(B.BACKENDS["triton"]), "install_problem", lambda self: None)
    monkeypatch.setattr(validation, "arch_of", lambda device: "sm_90")
    assert B.auto_skip_reason("triton", dev, torch.bfloat16).startswith(
        "not yet validated on a GPU")
    assert sk.select_backend("auto", dev, torch.bfloat16) == "chunked"
    # explicit request works at once
    assert sk.select_backend("triton", dev, torch.bfloat16) == "triton"
    monkeypatch.setitem(validation.GPU_VALIDATED, "triton", ("sm_90",))
    assert sk.select_backend("auto", dev, torch.bfloat16) == "triton"
    # validated elsewhere only: not picked on this architecture
    monkeypatch.setitem(validation.GPU_VALIDATED, "triton", ("sm_80",))
    assert sk.select_backend("auto", dev, torch.bfloat16) == "chunked"


def test_auto_on_cpu_never_picks_a_gpu_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton can serve CPU tensors now
    assert B.auto_skip_reason("triton", torch.device("cpu"), torch.float32) is not None
    assert sk.select_backend("auto", "cpu", torch.float32) in ("cpu", "chunked")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = B.BACKENDS["triton"].why_not(torch.device("cpu"), torch.float32)
    assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
    with pytest.raises(sk.BackendUnavailableError, match="triton"):
        sk.nearest_code(torch.randn(3, 4), torch.randn(5, 4), backend="triton")


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown `backend` 'cuad'"):
        sk.select_backend("cuad", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown `backend`"):
        B.check_name("cuad")
    B.check_name("auto")


def test_gpu_validation_record_is_consistent():
    for name, archs in validation.GPU_VALIDATED.items():
        assert B.BACKENDS[name].gpu
        for a in archs:
            assert re.fullmatch(r"sm_\d+a?", a), a
            assert name in validation.RESULTS, f"{name} validated without a results file"


def test_duplicate_map_is_checked_and_used():
    torch.manual_seed(0)
    basis = torch.randn(40, 6)
    basis[30] = basis[3]  # an exact duplicate
    w, b = torch.randn(8, 6), torch.randn(8)
    z = (basis[3] @ w.t() + b)[None].repeat(5, 1) + 1e-3 * torch.randn(5, 8)
    dm = ops.basis_duplicate_map(basis)
    assert dm[30] == 3 and dm[3] == 3
    for backend in ("reference", "chunked"):
        zq, idx = sk.simvq_quantize(z, basis, w, b, backend=backend, duplicate_map=dm)
        assert (idx == 3).all()
    with pytest.raises(ValueError, match="duplicate_map"):
        sk.simvq_quantize(z, basis, w, b, duplicate_map=dm[:-1])
    with pytest.raises(ValueError, match="duplicate_map"):
        sk.simvq_quantize(z, basis, w, b, duplicate_map=dm.int())


def test_nearest_code_takes_a_cached_duplicate_map():
    torch.manual_seed(1)
    cb = torch.randn(300, 8)
    cb[200] = cb[3]
    z = cb[3][None].repeat(4, 1) + 1e-4 * torch.randn(4, 8)
    dm = ops.codebook_duplicate_map(cb)
    assert dm[200] == 3
    for backend in ("reference", "chunked", "cpu"):
        if backend in sk.available_backends():
            assert (sk.nearest_code(z, cb, backend=backend, duplicate_map=dm)[0] == 3).all()
    with pytest.raises(ValueError, match="`duplicate_map`.*`codebook`"):
        sk.nearest_code(z, cb, duplicate_map=dm[:10])


def test_layer_caches_the_codebook_duplicate_map(monkeypatch):
    torch.manual_seed(2)
    layer = sk.SimVQ(8, 64, backend="chunked")
    calls = []
    real = ops.codebook_duplicate_map
    monkeypatch.setattr(ops, "codebook_duplicate_map",
                        lambda q: calls.append(1) or real(q))
    z = torch.randn(10, 8)
    with torch.no_grad():
        a = layer.encode(z)
        b = layer.encode(z)
    assert torch.equal(a, b) and len(calls) == 1
    with torch.no_grad():
        layer.weight.add_(0.5)  # a parameter change drops both caches
        c = layer.encode(z)
    assert len(calls) == 2
    ref = sk.nearest_code(z, layer.codebook.detach(), backend="reference")[0]
    assert torch.equal(c, ref)
