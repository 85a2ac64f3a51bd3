"""Determinism: the same inputs give bit-identical results across runs and processes on
every backend, and across thread counts and instruction sets on the `cpu` backend.

What is promised and tested here:
- nearest_code / simvq_quantize: indices, distances and zq are bit-identical across
  repeated calls on every backend. On a thread-invariant backend (`Backend.thread_invariant`:
  the `cpu` one) also across torch.set_num_threads(1, 2, 3, 4) (3 and 4 oversubscribe a
  2-core box, which changes how the CPU kernel splits the code range) and across
  processes started with OMP_NUM_THREADS=1 and =2. Its threads take token tiles from a
  shared counter, so which thread computes which tile changes from call to call: the
  repeated calls check that it does not change the bits. The pure-PyTorch backends are checked
  across runs and processes at each thread count only: their products are torch.mm,
  whose BLAS may split a reduction by thread count (MKL's AVX2 code does, so their bits
  change with the thread count on an AMD CPU or under MKL_ENABLE_INSTRUCTIONS=AVX2).
- The `cpu` backend, every dtype (float32, float64, and bf16/fp16 searched in float32):
  indices, distances, zq, dW and db are also bit-identical across the instruction sets
  it runs (scalar, AVX2, AVX-512: forced in-process here, and in a child process with
  SIMVQ_CPU_ISA=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2, so a path that leaned on a BLAS
  whose kernel depends on the CPU could not hide). No path of the CPU kernel calls a
  BLAS: every value is a fixed chain of FMAs (csrc/cpu/fma_rows.h). Shapes cover the CPU kernel's paths: one token
  (code range split across threads), fewer token tiles than threads (split + merge),
  many token tiles, tile edges (N = 257, K = 1025).
- Gradients (dW, db, dz) are bit-identical across runs at a given thread count, on every
  backend, for simvq_quantize and the SimVQ layer (no atomics anywhere on CPU). The CPU
  kernel's backward (dW, db) is also bit-identical across thread counts and ISAs: fixed
  token chunks, one fixed FMA chain per element and chunk, partials added in chunk order
  (it once was a multithreaded BLAS call whose split of the token reduction followed the
  thread count, and then single-threaded BLAS calls whose bits changed with the thread
  count on an AMD CPU; now regression tests). The pure-PyTorch backends' autograd gradients are not
  documented thread-count independent (and are not: F.linear's backward is the same
  kind of BLAS call), so they are tested across runs only.

Not promised (and not tested): batch invariance, i.e. that a token gets bit-identical
distances whatever else is in its batch. The BLAS may round a token's products
differently in a full and in a partial tile, which can move a pick among codes within
eps(z) of each other (design.md §3 accepts either).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import backends as _backends

BACKENDS = [b for b in sk.available_backends()
            if _backends.BACKENDS[b].why_not(torch.device("cpu"), torch.float32) is None]
# the backends whose bits do not depend on the thread count (no BLAS on their paths)
INVARIANT = [b for b in BACKENDS if _backends.BACKENDS[b].thread_invariant]


def test_cpu_backend_is_here_and_thread_invariant():
    """The thread-count checks below run for INVARIANT backends only: they must not
    vanish because the compiled backend failed to load or lost its flag."""
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    assert "cpu" in INVARIANT, "the cpu backend no longer declares thread_invariant"


def _thread_orders(backend):
    """Thread counts to run in turn: all of them in one group for a thread-invariant
    backend (every result must agree), else one group per count (runs must agree)."""
    seq = THREADS + THREADS[::-1]
    if backend in INVARIANT:
        return [seq]
    return [[t, t] for t in THREADS]

SHAPES = [(1, 5000, 32), (100, 3000, 16), (700, 2100, 24), (257, 1025, 8), (3, 70, 5)]
THREADS = [1, 2, 3, 4]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _problem(n, k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # clustered tokens with near-duplicate codes: many near-ties, where any
    # nondeterminism in the summation order would show up as a different pick
    q = torch.randn(k, d, generator=g)
    q[k // 2:] = q[: k - k // 2] + 1e-6 * torch.randn(k - k // 2, d, generator=g)
    z = q[torch.randint(0, k, (n,), generator=g)] + 1e-3 * torch.randn(n, d, generator=g)
    return z.to(dtype), q.to(dtype)


def _bits(*ts):
    h = hashlib.sha256()
    for t in ts:
        t = t.detach().cpu().reshape(-1).contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nearest_code_bit_identical_across_runs_and_threads(backend, dtype, restore_threads):
    for n, k, d in SHAPES:
        z, q = _problem(n, k, d, dtype)
        for group in _thread_orders(backend):
            seen = {}
            for threads in group:
                torch.set_num_threads(threads)
                idx, dist = sk.nearest_code(z, q, backend=backend)
                seen.setdefault(_bits(idx, dist), []).append(threads)
            assert len(seen) == 1, \
                f"N={n} K={k} d={d}: results differ by run or thread count: {seen}"


def _quantize_problem(n, k, d, dtype):
    g = torch.Generator().manual_seed(1)
    r = d + 3
    basis = (torch.randn(k, r, generator=g) * r ** -0.5).to(dtype)
    weight = torch.randn(d, r, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    z = torch.randn(n, d, generator=g).to(dtype)
    grad = torch.randn(n, d, generator=g).to(dtype)
    return z, basis, weight, bias, grad


def _quantize_run(backend, z, basis, weight, bias, grad):
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    out = sk.quantize(z, basis, w, b, backend=backend)
    out.zq.backward(grad)
    return _bits(out.zq, out.indices, out.distances), _bits(w.grad, b.grad)


QUANTIZE_SHAPES = [(1, 3000, 12), (300, 2100, 16), (9000, 700, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_forward_bit_identical_across_runs_and_threads(backend, dtype,
                                                                restore_threads):
    for n, k, d in QUANTIZE_SHAPES:
        prob = _quantize_problem(n, k, d, dtype)
        for group in _thread_orders(backend):
            seen = {}
            for threads in group:
                torch.set_num_threads(threads)
                seen.setdefault(_quantize_run(backend, *prob)[0], []).append(threads)
            assert len(seen) == 1, \
                f"N={n} K={k}: zq/indices/distances differ by run or thread count: {seen}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", THREADS)
def test_grads_bit_identical_across_runs(backend, dtype, threads, restore_threads):
    torch.set_num_threads(threads)
    for n, k, d in QUANTIZE_SHAPES:
        prob = _quantize_problem(n, k, d, dtype)
        runs = {_quantize_run(backend, *prob) for _ in range(3)}
        assert len(runs) == 1, f"N={n} K={k}: results differ between runs at {threads} threads"


# the CPU backward's paths: one chunk of <= 1024 tokens (a lone gemm outside any parallel
# region), a group of chunks, several groups of 8 chunks, wide d and r
BACKWARD_SHAPES = QUANTIZE_SHAPES + [(1024, 50, 96), (8193, 40, 5), (17000, 300, 33)]


def test_cpu_backward_independent_of_thread_count(restore_threads):
    """dW/db once depended on the thread count (a multithreaded BLAS call, then
    single-threaded BLAS calls on an AMD CPU): regression test at 1-4 threads."""
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    for n, k, d in BACKWARD_SHAPES:
        prob = _quantize_problem(n, k, d, torch.float32)
        seen = {}
        for threads in THREADS:
            torch.set_num_threads(threads)
            seen.setdefault(_quantize_run("cpu", *prob)[1], []).append(threads)
        assert len(seen) == 1, f"N={n} K={k}: dW/db differ by thread count: {seen}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_bit_identical_across_runs_and_threads(backend,
                                                      restore_threads):
    def step():
        torch.manual_seed(0)
        layer = sk.SimVQ(16, 1500, backend=backend)
        z = torch.randn(4, 300, 16, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        out, idx, loss = layer(z)
        (loss + out.square().mean()).backward()
        return _bits(out, idx, loss), _bits(z.grad, layer.weight.grad, layer.bias.grad)

    forward = {}
    for threads in (1, 2, 3, 2):
        torch.set_num_threads(threads)
        fwd, bwd = step()
        forward.setdefault(fwd, []).append(threads)
        runs = [step() for _ in range(2)]
        assert {r[1] for r in runs} == {bwd}, \
            f"layer gradients differ between runs at {threads} threads"
        assert {r[0] for r in runs} == {fwd}, \
            f"layer forward differs between runs at {threads} threads"
    if backend in INVARIANT:
        assert len(forward) == 1, f"layer forward differs by thread count: {forward}"


_CHILD = textwrap.dedent("""
    import hashlib, sys, torch
    import simvq_kernels as sk
    sys.path.insert(0, sys.argv[1])
    from test_determinism import _bits, _problem
    out = []
    for backend in sys.argv[2:]:
        for n, k, d in [(1, 5000, 32), (700, 2100, 24)]:
            z, q = _problem(n, k, d, torch.float32)
            out.append(_bits(*sk.nearest_code(z, q, backend=backend)))
    print(torch.get_num_threads(), hashlib.sha256("".join(out).encode()).hexdigest())
""")


def _child_digest(omp, backends):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp)
    res = subprocess.run([sys.executable, "-c", _CHILD, here, *backends],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    threads, digest = res.stdout.split()[-2:]
    assert threads == omp, f"the child ran with {threads} threads, not {omp}"
    return digest


def test_bit_identical_across_processes_and_omp_threads(restore_threads):
    """Thread-invariant backends: one digest for OMP_NUM_THREADS=1, =2 and this process
    (set to 3 threads). The others: two processes at the same thread count agree."""
    if INVARIANT:
        digests = {omp: _child_digest(omp, INVARIANT) for omp in ("1", "2")}
        torch.set_num_threads(3)
        local = []
        for backend in INVARIANT:
            for n, k, d in [(1, 5000, 32), (700, 2100, 24)]:
                z, q = _problem(n, k, d, torch.float32)
                local.append(_bits(*sk.nearest_code(z, q, backend=backend)))
        digests["this process, 3 threads"] = hashlib.sha256("".join(local).encode()).hexdigest()
        assert len(set(digests.values())) == 1, digests
    others = [b for b in BACKENDS if b not in INVARIANT]
    for omp in ("1", "2"):
        if others:
            pair = {_child_digest(omp, others) for _ in range(2)}
            assert len(pair) == 1, f"{others} differ between processes at {omp} threads"


ISAS = ["scalar", "avx2", "avx512"]


def _cpu_isas():
    """The instruction sets this CPU runs (forcible in-process)."""
    cfg = json.loads(torch.ops.simvq.cpu_kernel_config())
    return ISAS[:ISAS.index(cfg["native_isa"]) + 1]


def _cpu_digest(shapes, dtypes):
    """One digest of the cpu backend's nearest_code, quantize and backward results."""
    out = []
    for dtype in dtypes:
        for n, k, d in shapes:
            z, q = _problem(n, k, d, dtype)
            out.append(_bits(*sk.nearest_code(z, q, backend="cpu")))
            out.extend(_quantize_run("cpu", *_quantize_problem(n, k, d, dtype)))
    return hashlib.sha256("".join(out).encode()).hexdigest()


ISA_SHAPES = [(1, 3000, 12), (300, 2100, 16), (2100, 300, 33), (1030, 70, 5)]
ISA_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture
def restore_cpu_config():
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    n = torch.get_num_threads()
    before = json.loads(torch.ops.simvq.cpu_kernel_config())
    yield
    torch.set_num_threads(n)
    torch.ops.simvq.set_cpu_kernel_config(
        before["isa"] if before["isa_from"] != "native" else "auto", None, None)


def test_cpu_bit_identical_across_isas_and_threads(restore_cpu_config):
    """Forward and backward of the cpu backend, float32 / float64 / bf16: the same bits
    on every instruction set the CPU runs and at 1-4 threads."""
    seen = {}
    for isa in _cpu_isas():
        torch.ops.simvq.set_cpu_kernel_config(isa, None, None)
        for threads in THREADS:
            torch.set_num_threads(threads)
            seen.setdefault(_cpu_digest(ISA_SHAPES, ISA_DTYPES), []).append((isa, threads))
    assert len(seen) == 1, f"cpu results differ by ISA / thread count: {seen}"


_CPU_CHILD = textwrap.dedent("""
    import sys, torch
    import simvq_kernels as sk
    sys.path.insert(0, sys.argv[1])
    from test_determinism import ISA_DTYPES, ISA_SHAPES, _cpu_digest
    torch.set_num_threads(int(sys.argv[2]))
    print(torch.get_num_threads(), _cpu_digest(ISA_SHAPES, ISA_DTYPES))
""")


def test_cpu_bit_identical_with_avx2_and_mkl_avx2_forced(restore_cpu_config):
    """A child process with the CPU kernel forced to AVX2 (SIMVQ_CPU_ISA) and torch's
    MKL capped at its AVX2 code (MKL_ENABLE_INSTRUCTIONS, what MKL runs on AMD CPUs),
    at 1 and 3 threads, gives the bits of this process's native run."""
    torch.ops.simvq.set_cpu_kernel_config("auto", None, None)
    local = _cpu_digest(ISA_SHAPES, ISA_DTYPES)
    here = os.path.dirname(os.path.abspath(__file__))
    isa = "avx2" if "avx2" in _cpu_isas() else "scalar"
    for omp in ("1", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp, SIMVQ_CPU_ISA=isa,
                   MKL_ENABLE_INSTRUCTIONS="AVX2")
        res = subprocess.run([sys.executable, "-c", _CPU_CHILD, here, omp], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        threads, digest = res.stdout.split()[-2:]
        assert threads == omp, f"the child ran with {threads} threads, not {omp}"
        assert digest == local, f"SIMVQ_CPU_ISA={isa} MKL_ENABLE_INSTRUCTIONS=AVX2 at {omp} " \
            "threads changed the cpu backend's results"
