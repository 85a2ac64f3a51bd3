"""`python -m simvq_kernels.bench`: speed, memory and correctness of every backend and peer.

One run times each *provider* (a backend of this library, or a peer tool) on the shapes
of a named preset, side by side on the same machine and the same inputs, and prints one
table (optionally a CSV, a PNG plot and a markdown summary)::

    python -m simvq_kernels.bench                       # the 'quick' preset
    python -m simvq_kernels.bench --preset core --csv out.csv --plot out.png
    python -m simvq_kernels.bench --memory-check        # fused peak memory, 16384x262144x32
    python -m simvq_kernels.bench --list-presets

Providers
    Backends: 'reference' (the official formula, builds N x K), 'chunked' (pure-PyTorch
    tiles), 'cpu' (fused C++ kernel), 'cuda' where built. Peers, where installed:
    'vq-pytorch' (vector-quantize-pytorch's SimVQ with the rotation trick off, i.e. the
    same straight-through estimator; its forward also projects the codebook, a K*r*d
    extra), 'vq-pytorch-rot' (the same with its default rotation trick; layer rows only),
    'cdist' (torch.cdist + min), 'faiss' (IndexFlatL2, k=1, index rebuilt per call as the
    codebook changes every training step), 'pykeops' (LazyTensor min_argmin).

Ops
    'fwd': the nearest-code search given the projected codebook Q (K, d)
    (``sk.nearest_code`` for the backends). 'layer fwd+bwd': a SimVQ layer forward plus
    the backward of ``loss + sum(out * g)`` for a fixed random upstream gradient g.
    GFLOP/s always counts the search, 2*N*K*d, so that rows compare.

Method
    - Each (provider, shape, op) runs in its own child process (a fork of a forkserver
      that has imported torch), so peak memory is *measured*: on CPU the child builds the
      inputs, runs the op once on a tiny input of the same width (to fault in code pages
      and start thread pools), records its resident set size, resets the kernel's
      high-water mark (``/proc/self/clear_refs``), runs the op once and reports VmHWM
      growth above the inputs. Where the reset is refused the growth is measured against
      the previous high-water mark and marked as an upper bound. On CUDA it is
      ``torch.cuda.max_memory_allocated`` above the inputs.
    - That first (warm-up) run is excluded from the timings; then ``--repeat`` runs are
      timed (default 7 on CPU, 25 on CUDA with CUDA events, the device synchronised
      inside the timed region), repeated for fast ops until ``--min-time`` seconds have
      been timed, and the median and inter-quartile range are reported. Each row also
      measures the CPU time other processes used while it was timed (/proc/stat minus
      the child's own) and says 'contended' when that exceeds 0.1 cores. Before each row
      the bench waits (``--quiet-wait``) for other processes to leave the CPUs, and a
      contended row is re-run (``--contention-retries``), keeping the quietest run.
    - Before timing, the result of the warm-up run is checked against the float64
      oracle with the criterion of design.md §3: pick k passes for token z if
      d64(z, Q_k) - min_j d64(z, Q_j) <= eps(z) = 4u*||z||*max||Q|| + 1e-6*(||z||^2 +
      max||Q||^2) (u = 0 for exact fp32 products), and a returned distance must lie
      within eps(z) of d64(z, Q_k). Rows are checked against all K codes in float64 tiles
      (all rows when N <= --check-rows, else a random subset). Layer rows also compare
      dz, dW and db with autograd through the float64 reference at the provider's own
      picks (normwise relative tolerance 1e-4 for fp32 products).
    - Ceiling: torch.mm of a cache-resident 1024 x d by d x 1024 tile into a
      preallocated output (8192 x d x 8192 on CUDA), as GFLOP/s per d, measured at the
      start and at the end of the run; the higher of the two is the limit used.
    - Providers that build the N x K matrix (reference, cdist, vq-pytorch) are skipped
      when 3*N*K*4 bytes exceed 40% of the RAM (device memory on CUDA); a provider
      whose warm-up run makes ``--repeat`` runs exceed ``--case-budget`` seconds gets
      fewer runs (noted), and a child running past ``--case-timeout`` is killed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# ------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class Shape:
    """N tokens of width d, K codes, basis width r (default d)."""

    n: int
    k: int
    d: int
    r: Optional[int] = None

    @property
    def basis_dim(self) -> int:
        return self.r or self.d

    @property
    def label(self) -> str:
        s = f"{self.n}x{self.k}x{self.d}"
        return s + (f" r={self.r}" if self.r else "")

    @property
    def search_flops(self) -> int:
        return 2 * self.n * self.k * self.d


OPS = {"fwd": "fwd", "layer": "layer fwd+bwd"}


@dataclass(frozen=True)
class Case:
    """One shape and op; ``providers`` restricts which providers run it (None = all)."""

    shape: Shape
    op: str  # a key of OPS
    providers: Optional[tuple] = None
    note: str = ""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cases: tuple
    hidden: bool = False

    def shapes(self) -> list:
        """The distinct shapes, in order."""
        out = []
        for c in self.cases:
            if c.shape not in out:
                out.append(c.shape)
        return out


def _fwd_and_layer(shapes, layer_shapes=None):
    layer_shapes = shapes if layer_shapes is None else layer_shapes
    return tuple([Case(s, "fwd") for s in shapes] + [Case(s, "layer") for s in layer_shapes])


FUSED_BACKENDS = ("cpu", "cuda")
MEMORY_SHAPE = Shape(16384, 262144, 32)
MEMORY_TARGET_MIB = 256
_MEMORY_CASE = Case(MEMORY_SHAPE, "fwd",
                    providers=("reference", "cdist", "vq-pytorch", "chunked", "cpu", "cuda",
                               "faiss"))

PRESETS = {p.name: p for p in (
    Preset("tiny", "seconds; for the smoke test",
           _fwd_and_layer([Shape(512, 256, 16)]), hidden=True),
    Preset("quick", "default; about a minute on 2 CPU cores",
           _fwd_and_layer([Shape(16384, 1024, 64), Shape(16384, 8192, 64)],
                          [Shape(16384, 1024, 64)])),
    Preset("core", "issue 2's shapes, layer rows, and the 16384x262144x32 memory check",
           _fwd_and_layer([Shape(16384, 1024, 64), Shape(16384, 8192, 64),
                           Shape(8192, 65536, 32), Shape(4096, 16384, 256)])
           + (_MEMORY_CASE,)),
    Preset("image", "image tokenizer configs: N=16384, d=128, K from 1k to 262k",
           _fwd_and_layer([Shape(16384, k, 128) for k in (1024, 8192, 65536, 262144)])),
    Preset("audio", "audio tokenizer configs: N=1500, d=512, K from 4k to 262k",
           _fwd_and_layer([Shape(1500, k, 512) for k in (4096, 65536, 262144)])),
    Preset("small-d", "d=8, where the argmin epilogue dominates",
           _fwd_and_layer([Shape(16384, k, 8) for k in (1024, 8192, 65536)],
                          [Shape(16384, 8192, 8)])),
    Preset("cpu", "a CPU-sized mix of image, audio and small-d shapes (minutes)",
           _fwd_and_layer([Shape(16384, 4096, 128), Shape(1500, 16384, 512),
                           Shape(16384, 16384, 8), Shape(8192, 32768, 32)],
                          [Shape(16384, 4096, 128), Shape(1500, 16384, 512)])),
    Preset("memory", "only the fused forward's peak memory at 16384x262144x32 "
           "(--memory-check)", (Case(MEMORY_SHAPE, "fwd", providers=FUSED_BACKENDS),)),
)}

BACKEND_NAMES = ("reference", "chunked", "cpu", "cuda")
PEER_NAMES = ("vq-pytorch", "vq-pytorch-rot", "cdist", "faiss", "pykeops")
PEER_MODULES = {"vq-pytorch": "vector_quantize_pytorch",
                "vq-pytorch-rot": "vector_quantize_pytorch", "faiss": "faiss",
                "pykeops": "pykeops"}
PROVIDER_OPS = {
    "reference": ("fwd", "layer"), "chunked": ("fwd", "layer"), "cpu": ("fwd", "layer"),
    "cuda": ("fwd", "layer"), "vq-pytorch": ("fwd", "layer"), "vq-pytorch-rot": ("layer",),
    "cdist": ("fwd",), "faiss": ("fwd",), "pykeops": ("fwd",),
}
# Providers whose forward builds the full N x K distance matrix.
MATERIALISING = ("reference", "cdist", "vq-pytorch", "vq-pytorch-rot")
MEMORY_FRACTION = 0.4
BETA = 0.25
GRAD_RTOL = 1e-4

# ------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The same inputs for every provider: z, the SimVQ parameters, Q and an upstream g."""

    shape: Shape
    z: torch.Tensor  # (N, d)
    basis: torch.Tensor  # (K, r)
    weight: torch.Tensor  # (d, r)
    bias: torch.Tensor  # (d,)
    codebook: torch.Tensor  # (K, d) = basis @ weight.T + bias, fp32
    g_out: torch.Tensor  # (N, d) upstream gradient of the layer output


def make_inputs(shape: Shape, device="cpu", seed: int = 0) -> Inputs:
    """Deterministic inputs for ``shape``: the official initialisation (basis N(0, 1/r),
    weight/bias like nn.Linear(r, d)) and tokens drawn at the codebook's scale so that
    they fall among the codes, not far outside them."""
    n, k, d, r = shape.n, shape.k, shape.d, shape.basis_dim
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + k * 31 + d)
    basis = torch.randn(k, r, generator=g) * r**-0.5
    bound = 1 / math.sqrt(r)
    weight = (torch.rand(d, r, generator=g) * 2 - 1) * bound
    bias = (torch.rand(d, generator=g) * 2 - 1) * bound
    codebook = torch.addmm(bias, basis, weight.t())
    scale = float(codebook.std())
    z = torch.randn(n, d, generator=g) * scale + codebook.mean(0)
    g_out = torch.randn(n, d, generator=g) / (n * d) ** 0.5
    dev = torch.device(device)
    return Inputs(shape, z.to(dev), basis.to(dev), weight.to(dev), bias.to(dev),
                  codebook.to(dev), g_out.to(dev))


# -------------------------------------------------------------------- correctness


@dataclass
class CheckResult:
    ok: bool
    detail: str

    @property
    def label(self) -> str:
        return "pass" if self.ok else "FAIL"


def unit_roundoff(device, dtype=torch.float32) -> float:
    """u of the products actually used (design.md §3)."""
    if dtype == torch.bfloat16:
        return 2.0**-8
    if dtype == torch.float16:
        return 2.0**-11
    if dtype == torch.float64:
        return 0.0
    if torch.device(device).type == "cpu":
        return 0.0
    prec = torch.get_float32_matmul_precision()
    return {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}.get(prec, 2.0**-11)


def _codes64_from_codebook(codebook):
    def tile(k0, k1):
        return codebook[k0:k1].double()
    return tile


def _codes64_from_params(basis, weight, bias):
    w64, b64 = weight.double(), bias.double()

    def tile(k0, k1):
        return torch.addmm(b64, basis[k0:k1].double(), w64.t())
    return tile


def check_nearest(z, codes64: Callable, k: int, idx, dist=None, *, u: float = 0.0,
                  rows=None, tile_k: int = 8192) -> CheckResult:
    """design.md §3 criterion for picks ``idx`` (and distances ``dist``) of tokens ``z``.

    ``codes64(k0, k1)`` returns codes k0..k1-1 in float64 (so the full float64 codebook is
    never held at once); ``rows`` selects the tokens checked against all K codes (None =
    all). No N x K float64 matrix is built: memory is O(len(rows) * tile_k).
    """
    n = z.shape[0]
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or \
            tuple(idx.shape) != (n,):
        return CheckResult(False, f"indices must be int64 of shape ({n},), got "
                           f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
    if n == 0:
        return CheckResult(True, "empty")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= k:
        return CheckResult(False, f"indices out of range [{lo}, {hi}] for K={k}")
    rows = torch.arange(n) if rows is None else rows.cpu()
    z64 = z.detach().cpu()[rows].double()
    pick = idx.detach().cpu()[rows]
    best = torch.full((len(rows),), math.inf, dtype=torch.float64)
    best_idx = torch.zeros(len(rows), dtype=torch.long)
    zn = (z64 * z64).sum(1)
    qmax2 = 0.0
    for k0 in range(0, k, tile_k):
        q = codes64(k0, min(k, k0 + tile_k)).cpu()
        qn = (q * q).sum(1)
        qmax2 = max(qmax2, float(qn.max()))
        dmat = (zn[:, None] + qn[None, :]).addmm_(z64, q.t(), alpha=-2)
        v, i = dmat.min(1)
        better = v < best
        best = torch.where(better, v, best)
        best_idx = torch.where(better, i + k0, best_idx)
    picked = _gather_codes64(codes64, pick, k, tile_k)
    d_pick = ((z64 - picked) ** 2).sum(1)
    eps = 4 * u * zn.sqrt() * math.sqrt(qmax2) + 1e-6 * (zn + qmax2)
    excess = d_pick - best - eps
    bad = int((excess > 0).sum())
    agree = float((best_idx == pick).double().mean())
    detail = f"{len(rows)} rows vs all {k} codes; index agreement {agree:.4f}"
    if bad:
        j = int(excess.argmax())
        return CheckResult(False, f"{bad}/{len(rows)} picks outside eps (worst excess "
                           f"{float(excess[j]):.3g}, eps {float(eps[j]):.3g}); {detail}")
    if dist is not None:
        dd = dist.detach().cpu()[rows].double()
        derr = (dd - d_pick).abs() - eps
        nbad = int((derr > 0).sum())
        if nbad:
            return CheckResult(False, f"{nbad}/{len(rows)} distances off by more than eps "
                               f"(worst {float(derr.max()):.3g} over); {detail}")
        detail += "; distances within eps"
    return CheckResult(True, detail)


def _gather_codes64(codes64, pick, k, tile_k):
    """Float64 codes for the indices ``pick``, built tile by tile."""
    out = torch.empty(len(pick), codes64(0, 1).shape[1], dtype=torch.float64)
    for k0 in range(0, k, tile_k):
        sel = (pick >= k0) & (pick < k0 + tile_k)
        if bool(sel.any()):
            q = codes64(k0, min(k, k0 + tile_k)).cpu()
            out[sel] = q[pick[sel] - k0]
    return out


def oracle_layer_grads(inp: Inputs, idx, beta: float = BETA) -> dict:
    """dz, dW, db of ``loss + sum(out * g)`` by autograd through the float64 reference,
    at the picks ``idx`` (so near-ties cannot make the comparison fail)."""
    z = inp.z.detach().cpu().double().requires_grad_(True)
    w = inp.weight.detach().cpu().double().requires_grad_(True)
    b = inp.bias.detach().cpu().double().requires_grad_(True)
    rows = inp.basis.detach().cpu().index_select(0, idx.detach().cpu()).double()
    zq = torch.nn.functional.linear(rows, w, b)
    # the official loss and estimator, written out (independent of the layer's code)
    loss = beta * torch.mean((zq.detach() - z) ** 2) + torch.mean((zq - z.detach()) ** 2)
    out = z + (zq - z).detach()
    (loss + (out * inp.g_out.detach().cpu().double()).sum()).backward()
    return {"z": z.grad, "weight": w.grad, "bias": b.grad}


def check_grads(grads: dict, ref: dict, rtol: float = GRAD_RTOL) -> CheckResult:
    """Normwise relative error ||g - g64|| / ||g64|| <= rtol for each gradient."""
    worst = []
    for name, r in ref.items():
        g = grads.get(name)
        if g is None:
            return CheckResult(False, f"no gradient for {name}")
        g = g.detach().cpu().double().reshape(r.shape)
        err = float((g - r).norm() / r.norm().clamp_min(1e-300))
        worst.append(f"d{name} {err:.1e}")
        if not err <= rtol:
            return CheckResult(False, f"d{name} relative error {err:.3g} > {rtol:g}")
    return CheckResult(True, "grads vs float64 autograd: " + ", ".join(worst))


def check_rows_for(n: int, check_rows: int, seed: int = 0):
    """All rows when N <= check_rows, else a fixed random subset of check_rows."""
    if n <= check_rows:
        return None
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randperm(n, generator=g)[:check_rows].sort().values


def check_output(op: str, inp: Inputs, out: dict, *, u: float, check_rows: int,
                 seed: int = 0) -> CheckResult:
    """Checks one provider's output dict (idx, dist, grads) for ``op`` on ``inp``."""
    s = inp.shape
    rows = check_rows_for(s.n, check_rows, seed)
    if op == "fwd":
        return check_nearest(inp.z, _codes64_from_codebook(inp.codebook), s.k, out["idx"],
                             out.get("dist"), u=u, rows=rows)
    res = check_nearest(inp.z, _codes64_from_params(inp.basis, inp.weight, inp.bias), s.k,
                        out["idx"], None, u=u, rows=rows)
    if not res.ok:
        return res
    if out.get("grads") is None:
        return CheckResult(True, res.detail + "; " + out.get("grad_note", "grads not compared"))
    g = check_grads(out["grads"], oracle_layer_grads(inp, out["idx"]))
    return CheckResult(g.ok, res.detail + "; " + g.detail)


# ---------------------------------------------------------------------- providers


class Runner:
    """One provider on one op and input: ``run()`` is the timed callable (device work
    only; no host sync on CUDA, the timer synchronises), ``output(result)`` converts its
    result to a dict of idx / dist / grads for the check."""

    def __init__(self, run: Callable, output: Callable):
        self.run = run
        self.output = output


def _peer_available(name: str) -> Optional[str]:
    """None if the peer can run here, else why not."""
    mod = PEER_MODULES.get(name)
    if mod is not None and importlib.util.find_spec(mod) is None:
        pip = {"vector_quantize_pytorch": "vector-quantize-pytorch",
               "faiss": "faiss-cpu"}.get(mod, mod)
        return f"{mod} not installed (pip install {pip})"
    return None


def _vq_pytorch_layer(inp: Inputs, rotation_trick: bool):
    from torch import nn
    from vector_quantize_pytorch import SimVQ as VQSimVQ

    s = inp.shape
    lin = nn.Linear(s.basis_dim, s.d, bias=True)
    layer = VQSimVQ(dim=s.d, codebook_size=s.k, codebook_transform=lin,
                    rotation_trick=rotation_trick, input_to_quantize_commit_loss_weight=BETA,
                    commitment_weight=1.0, frozen_codebook_dim=s.basis_dim)
    layer = layer.to(inp.z.device)
    with torch.no_grad():
        layer.frozen_codebook.copy_(inp.basis)
        lin.weight.copy_(inp.weight)
        lin.bias.copy_(inp.bias)
    return layer, lin


def build_runner(provider: str, op: str, inp: Inputs) -> Runner:
    """The timed callable of ``provider`` for ``op`` on ``inp``."""
    import simvq_kernels as sk

    z, q, s = inp.z, inp.codebook, inp.shape
    if op == "fwd":
        if provider in BACKEND_NAMES:
            return Runner(lambda: sk.nearest_code(z, q, backend=provider),
                          lambda o: {"idx": o[0], "dist": o[1]})
        if provider == "cdist":
            def run_cdist():
                v, i = torch.cdist(z, q).min(dim=1)
                return i, v * v
            return Runner(run_cdist, lambda o: {"idx": o[0], "dist": o[1]})
        if provider == "faiss":
            import faiss
            import numpy as np

            if z.device.type != "cpu":
                raise RuntimeError("faiss-cpu serves CPU arrays only")
            faiss.omp_set_num_threads(torch.get_num_threads())
            zn = np.ascontiguousarray(z.numpy())
            qn = np.ascontiguousarray(q.numpy())

            def run_faiss():
                index = faiss.IndexFlatL2(s.d)
                index.add(qn)
                return index.search(zn, 1)
            return Runner(run_faiss, lambda o: {"idx": torch.from_numpy(o[1][:, 0]).long(),
                                                "dist": torch.from_numpy(o[0][:, 0])})
        if provider == "pykeops":
            import pykeops
            from pykeops.torch import LazyTensor

            pykeops.set_verbose(False)

            def run_keops():
                dmat = ((LazyTensor(z[:, None, :]) - LazyTensor(q[None, :, :])) ** 2).sum(-1)
                return dmat.min_argmin(dim=1)
            return Runner(run_keops, lambda o: {"idx": o[1].reshape(-1).long(),
                                                "dist": o[0].reshape(-1)})
        if provider == "vq-pytorch":
            layer, _ = _vq_pytorch_layer(inp, rotation_trick=False)
            x = z[None]

            def run_vq():
                with torch.no_grad():
                    return layer(x)
            return Runner(run_vq, lambda o: {"idx": o[1].reshape(-1).long(), "dist": None})
        raise ValueError(f"provider {provider!r} has no 'fwd' op")

    if op != "layer":
        raise ValueError(f"unknown op {op!r}")
    g = inp.g_out
    if provider in BACKEND_NAMES:
        layer = sk.SimVQ(s.d, s.k, basis_dim=s.basis_dim, backend=provider).to(z.device)
        with torch.no_grad():
            layer.basis.copy_(inp.basis)
            layer.weight.copy_(inp.weight)
            layer.bias.copy_(inp.bias)
        x = z.clone().requires_grad_(True)
        params = (x, layer.weight, layer.bias)

        def run_layer():
            for p in params:
                p.grad = None
            out, idx, loss = layer(x)
            (loss + (out * g).sum()).backward()
            return idx
        return Runner(run_layer, lambda idx: {
            "idx": idx.reshape(-1), "grads": {"z": x.grad, "weight": layer.weight.grad,
                                              "bias": layer.bias.grad}})
    if provider in ("vq-pytorch", "vq-pytorch-rot"):
        rot = provider == "vq-pytorch-rot"
        layer, lin = _vq_pytorch_layer(inp, rotation_trick=rot)
        x = z[None].clone().requires_grad_(True)
        g3 = g[None]
        params = (x, lin.weight, lin.bias)

        def run_vq_layer():
            for p in params:
                p.grad = None
            out, idx, loss = layer(x)
            (loss + (out * g3).sum()).backward()
            return idx
        if rot:
            return Runner(run_vq_layer, lambda idx: {
                "idx": idx.reshape(-1).long(), "grads": None,
                "grad_note": "grads not compared (the rotation trick changes them by design)"})
        return Runner(run_vq_layer, lambda idx: {
            "idx": idx.reshape(-1).long(),
            "grads": {"z": x.grad, "weight": lin.weight.grad, "bias": lin.bias.grad}})
    raise ValueError(f"provider {provider!r} has no 'layer' op")


# ------------------------------------------------------------------ measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable, n: int, device) -> list:
    """Seconds of ``n`` calls of ``fn``, the device synchronised inside the timed region
    (CUDA events on CUDA, perf_counter elsewhere)."""
    device = torch.device(device)
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory of a region above its start: CUDA allocator peak on CUDA, the
    resident set's high-water mark (reset through /proc/self/clear_refs) on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self.base = _proc_status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM growth (reset)"
        except OSError as e:
            self.method = f"ru_maxrss growth (upper bound: clear_refs refused: {e.strerror})"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = max(_proc_status_kib("VmHWM"),
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            self.peak = max(0, hwm - self.base)
        return False


CONTENTION_CORES = 0.1
# forward rows whose % of the ceiling is measured side by side with the ceiling tile
PAIRED_PROVIDERS = ("cpu", "cuda", "faiss")
MAX_RUNS = 500


class ForeignCPU:
    """CPU time that *other* processes used during a region, in cores: the machine's
    busy time (/proc/stat) minus this process's own (all threads). Timings taken while
    it is well above zero were shared with someone else; the row says so."""

    @staticmethod
    def _machine_busy_s():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def __enter__(self):
        self.cores = None
        try:
            self.t0, self.m0, self.o0 = time.perf_counter(), self._machine_busy_s(), self._own_s()
        except (OSError, ValueError, IndexError):
            self.t0 = None
        return self

    def __exit__(self, *exc):
        if self.t0 is not None:
            wall = time.perf_counter() - self.t0
            foreign = (self._machine_busy_s() - self.m0) - (self._own_s() - self.o0)
            # /proc/stat ticks are 10 ms: below ~0.5 s of wall time the figure is noise
            self.cores = max(0.0, foreign / wall) if wall >= 0.5 else None
        return False


def ceiling_tile(d: int, device):
    """The ceiling's unit of work, warmed up: torch.mm of a cache-resident (T x d) @
    (d x T) tile into a preallocated output, T = 1024 on CPU, 8192 on CUDA (design.md
    §5). Returns (callable, flops per call)."""
    device = torch.device(device)
    t = 8192 if device.type == "cuda" else 1024
    a = torch.randn(t, d, device=device)
    bt = torch.randn(t, d, device=device).t()
    c = torch.empty(t, t, device=device)

    def tile():
        torch.mm(a, bt, out=c)

    for _ in range(5):
        tile()
    return tile, 2 * t * t * d


def ceiling_gflops(d: int, device, min_runs: int = 50, min_seconds: float = 0.3) -> float:
    """GFLOP/s of the ceiling tile (see :func:`ceiling_tile`)."""
    tile, flops = ceiling_tile(d, device)
    times, t_start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t_start < min_seconds:
        times += time_runs(tile, 1, device)
        if len(times) > 100_000:
            break
    return flops / statistics.median(times) / 1e9


PAIRS = 15


def paired_ceiling_fraction(run, shape, device, op_s: float, budget: float,
                            pairs: int = PAIRS) -> Optional[float]:
    """The op's fraction of the matrix-product ceiling, measured side by side: the op and
    a batch of ceiling tiles of about the same duration are timed alternately in this
    process, and the median of the per-pair ratios is returned. Slow drifts of the
    machine's speed (other tenants, clocks) then cancel, which a ceiling measured at the
    start and end of the run cannot do."""
    tile, flops = ceiling_tile(shape.d, device)
    tile_s = statistics.median(time_runs(tile, 20, device))
    reps = max(1, round(op_s / tile_s))

    def tiles():
        for _ in range(reps):
            tile()

    pairs = max(3, min(pairs, int(budget // max(2 * op_s, 1e-9))))
    ratios = []
    for _ in range(pairs):
        t_op = time_runs(run, 1, device)[0]
        t_tiles = time_runs(tiles, 1, device)[0]
        ratios.append((shape.search_flops / t_op) / (flops * reps / t_tiles))
    return statistics.median(ratios)


def _run_case_in_child(spec: dict) -> dict:
    """Body of one child process: inputs, pre-warm, measured warm-up, check, timings."""
    os.dup2(2, 1)  # peers' chatter goes to stderr; the parent's stdout stays the table
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["op"] == "ceiling":
        with ForeignCPU() as foreign:
            gflops = ceiling_gflops(spec["d"], device)
        return {"status": "ok", "gflops": gflops, "foreign_cores": foreign.cores}
    shape = Shape(**spec["shape"])
    provider, op = spec["provider"], spec["op"]
    inp = make_inputs(shape, device, spec["seed"])
    tiny_shape = Shape(min(shape.n, 64), min(shape.k, 64), shape.d, shape.r)
    tiny = build_runner(provider, op, make_inputs(tiny_shape, device, spec["seed"] + 1))
    tiny.run()  # code pages, thread pools, JIT caches: not part of the op's memory
    _sync(device)
    del tiny
    runner = build_runner(provider, op, inp)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        result = runner.run()
        _sync(device)
        first = time.perf_counter() - t0
    check = check_output(op, inp, runner.output(result), u=spec["u"],
                         check_rows=spec["check_rows"], seed=spec["seed"])
    del result
    n = spec["repeat"]
    note = ""
    if first * n > spec["case_budget"]:
        n = max(1, int(spec["case_budget"] // max(first, 1e-9)))
        note = (f"{n} timed run(s), not {spec['repeat']}: one run took {first:.1f} s "
                f"(--case-budget {spec['case_budget']:g} s)")
    with ForeignCPU() as foreign:
        times = time_runs(runner.run, n, device)
        # fast ops: keep going until --min-time has been timed (a steadier median)
        while sum(times) < spec["min_time"] and len(times) < MAX_RUNS:
            times += time_runs(runner.run, n, device)
    if foreign.cores is not None and foreign.cores > CONTENTION_CORES:
        note = "; ".join(x for x in (note, f"contended: other processes used "
                                     f"{foreign.cores:.2f} cores while timing") if x)
    paired = None
    if spec.get("paired_ceiling"):
        paired = paired_ceiling_fraction(runner.run, shape, device, statistics.median(times),
                                         budget=spec["case_budget"] / 4)
    return {"status": "ok", "times": times, "first_s": first, "peak_bytes": mem.peak,
            "mem_method": mem.method, "check": check.label, "check_detail": check.detail,
            "note": note, "foreign_cores": foreign.cores, "paired_frac": paired}


def _child_entry(spec: dict, conn) -> None:
    try:
        out = _run_case_in_child(spec)
    except Exception as e:  # reported to the parent as this row's result
        out = {"status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)}
    conn.send(out)
    conn.close()


_MP_CONTEXT = None


def _mp_context():
    """A forkserver that has imported torch: children start in milliseconds, with fresh
    resource usage and no thread pools inherited from the parent."""
    global _MP_CONTEXT
    if _MP_CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "simvq_kernels"])
        else:
            ctx = multiprocessing.get_context("spawn")
        _MP_CONTEXT = ctx
    return _MP_CONTEXT


def run_in_child(spec: dict, timeout: float) -> dict:
    """Runs one case in a fresh child process; kills it after ``timeout`` seconds."""
    ctx = _mp_context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_entry, args=(spec, child_conn), daemon=True)
    p.start()
    child_conn.close()
    out = None
    try:
        if parent_conn.poll(timeout):
            out = parent_conn.recv()
    except EOFError:
        out = None
    finally:
        parent_conn.close()
    if out is None:
        if p.is_alive():
            p.kill()
            p.join()
            return {"status": "skipped", "reason": f"killed after --case-timeout {timeout:g} s"}
        p.join()
        code = p.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "error", "error": f"child process died ({why}; out of memory?)"}
    p.join()
    return out


def other_cpu_load(window: float = 0.5) -> Optional[float]:
    """Cores kept busy by other processes over ``window`` seconds (this process idles)."""
    with ForeignCPU() as f:
        time.sleep(window)
    return f.cores


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Waits (up to ``max_wait`` s) until other processes use less than ``threshold``
    cores; returns the seconds waited. Timings shared with another job are worthless."""
    t0 = time.perf_counter()
    while max_wait > 0:
        load = other_cpu_load()
        if load is None or load < threshold or time.perf_counter() - t0 >= max_wait:
            break
        time.sleep(2.0)
    return time.perf_counter() - t0


class QuietGate:
    """Waits for a quiet machine before each row: at most ``per_row`` seconds each and
    ``total`` seconds over the whole run (then it stops waiting, and rows that were
    contended say so), so a machine that is never quiet still finishes."""

    def __init__(self, per_row: float, total: float):
        self.per_row, self.left, self.waited = per_row, total, 0.0

    def wait(self):
        if self.per_row > 0 and self.left > 0:
            w = wait_for_quiet(min(self.per_row, self.left))
            self.left -= w
            self.waited += w


def run_measured(spec: dict, timeout: float, gate: QuietGate, retries: int) -> dict:
    """``run_in_child`` after waiting for a quiet machine; a run that was contended
    anyway is retried up to ``retries`` times and the least contended result is kept."""
    best = None
    for attempt in range(retries + 1):
        gate.wait()
        out = run_in_child(spec, timeout)
        out["attempts"] = attempt + 1
        if out["status"] != "ok":
            return out
        foreign = out.get("foreign_cores") or 0.0
        if best is None or foreign < (best.get("foreign_cores") or 0.0):
            best = out
        if foreign <= CONTENTION_CORES:
            break
    return best


# ------------------------------------------------------------------- the benchmark


@dataclass
class Row:
    """One line of the table."""

    provider: str
    shape: Shape
    op: str
    status: str = "ok"  # ok | skipped | error
    times: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    mem_method: str = ""
    check: str = ""
    check_detail: str = ""
    note: str = ""
    vs_reference: Optional[float] = None
    vs_faiss: Optional[float] = None
    ceiling: Optional[float] = None
    foreign_cores: Optional[float] = None
    paired_frac: Optional[float] = None  # % of ceiling measured side by side (fwd rows)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def quartiles(self):
        if len(self.times) < 2:
            return (self.median, self.median)
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def gflops(self) -> Optional[float]:
        m = self.median
        return self.shape.search_flops / m / 1e9 if m else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        m = self.median
        return self.shape.n / m if m else None

    @property
    def frac_ceiling(self) -> Optional[float]:
        """Paired measurement where there is one (see paired_ceiling_fraction), else
        this row's GFLOP/s over the run's ceiling for its d."""
        if self.paired_frac is not None:
            return self.paired_frac
        g = self.gflops
        return g / self.ceiling if g and self.ceiling else None


@dataclass
class BenchResult:
    preset: Preset
    device: str
    rows: list
    ceilings: dict  # d -> GFLOP/s
    machine: dict
    notes: list
    fused: str


def total_memory_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemTotal from /proc/meminfo")


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def skip_reason(provider: str, case: Case, device, total_mem: int) -> Optional[str]:
    """Why ``provider`` does not run ``case`` here (None = it runs)."""
    s = case.shape
    if case.op not in PROVIDER_OPS[provider]:
        return "n/a"
    inputs = 4 * (3 * s.n * s.d + s.k * (s.basis_dim + s.d))
    if inputs > 0.5 * total_mem:
        return f"skipped: inputs need {_gib(inputs)} of {_gib(total_mem)}"
    if provider in MATERIALISING:
        need = 3 * s.n * s.k * 4
        if need > MEMORY_FRACTION * total_mem:
            return (f"skipped: needs {_gib(need)} (> {MEMORY_FRACTION:.0%} of "
                    f"{_gib(total_mem)})")
    return None


def select_providers(backends, peers, device) -> tuple:
    """(providers to run, notes about the ones that cannot)."""
    import simvq_kernels as sk

    notes = []
    avail = sk.available_backends()
    chosen = []
    for b in backends:
        if b not in BACKEND_NAMES:
            raise SystemExit(f"unknown backend {b!r}; choose from {list(BACKEND_NAMES)}")
        if b not in avail:
            notes.append(f"backend {b}: not available ({sk.backend_status()[b]})")
            continue
        try:
            sk.select_backend(b, device, torch.float32)
        except sk.BackendUnavailableError as e:
            notes.append(f"backend {b}: {e}")
            continue
        chosen.append(b)
    for p in peers:
        if p not in PEER_NAMES:
            raise SystemExit(f"unknown peer {p!r}; choose from {list(PEER_NAMES)}")
        why = _peer_available(p)
        if why is None and p == "faiss" and torch.device(device).type != "cpu":
            why = "faiss-cpu serves CPU arrays only (faiss-gpu is not wired in)"
        if why:
            notes.append(f"peer {p}: skipped, {why}")
            continue
        chosen.append(p)
    return chosen, notes


def machine_info(device) -> dict:
    """Machine, date, commit and versions for the summary."""
    device = torch.device(device)
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "ram": _gib(total_memory_bytes("cpu"))}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout
        changed = [line[3:] for line in dirty.splitlines() if line.strip()]
        info["git commit"] = commit + (
            f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        info["git commit"] = "unknown (not a git checkout)"
    info["python"] = platform.python_version()
    for dist in ("torch", "numpy", "faiss-cpu", "vector-quantize-pytorch", "pykeops",
                 "simvq-kernels"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info


class _NoProgress:
    """Stands in for tqdm when it is not installed."""

    def __init__(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def run_benchmark(preset: Preset, *, backends=None, peers=None, device=None, repeat=None,
                  check_rows: int = 1024, case_budget: float = 60.0, min_time: float = 1.0,
                  case_timeout: float = 900.0, quiet_wait: float = 60.0,
                  quiet_wait_total: float = 600.0,
                  contention_retries: int = 2, threads: Optional[int] = None, seed: int = 0,
                  progress: bool = True) -> BenchResult:
    """Runs ``preset`` and returns its rows (no printing)."""
    import simvq_kernels as sk

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional (pip install tqdm)
        tqdm = _NoProgress

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if repeat is None:
        repeat = 25 if device.type == "cuda" else 7
    backends = list(BACKEND_NAMES) if backends is None else backends
    peers = list(PEER_NAMES) if peers is None else peers
    providers, notes = select_providers(backends, peers, device)
    fused = "cuda" if device.type == "cuda" else "cpu"
    total_mem = total_memory_bytes(device)
    u = unit_roundoff(device)
    base = {"device": str(device), "threads": threads, "seed": seed, "u": u,
            "check_rows": check_rows, "repeat": repeat, "case_budget": case_budget,
            "min_time": min_time}

    load_start = os.getloadavg()
    plan = []
    for case in preset.cases:
        for p in providers:
            if case.providers is not None and p not in case.providers:
                continue
            plan.append((p, case))
    ds = sorted({c.shape.d for c in preset.cases})
    bar = tqdm(total=len(plan) + 2 * len(ds), desc=f"bench {preset.name}", unit="case",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    gate = QuietGate(quiet_wait, quiet_wait_total)

    def measure_ceilings(when):
        got = {}
        for d in ds:
            bar.set_postfix_str(f"ceiling d={d} ({when})")
            out = run_measured(dict(base, op="ceiling", d=d), case_timeout, gate,
                               contention_retries)
            if out["status"] == "ok":
                got[d] = out["gflops"]
                if (out.get("foreign_cores") or 0.0) > CONTENTION_CORES:
                    notes.append(f"ceiling d={d} ({when}): contended: other processes used "
                                 f"{out['foreign_cores']:.2f} cores while timing")
            else:
                notes.append(f"ceiling d={d} ({when}): {out.get('error') or out.get('reason')}")
            bar.update(1)
        return got

    ceil_start = measure_ceilings("start")
    rows = []
    for p, case in plan:
        s = case.shape
        bar.set_postfix_str(f"{p} {OPS[case.op]} {s.label}")
        row = Row(p, s, case.op, note=case.note)
        why = skip_reason(p, case, device, total_mem)
        if why == "n/a":
            bar.update(1)
            continue
        if why:
            row.status, row.check = "skipped", why
        else:
            spec = dict(base, provider=p, op=case.op,
                        shape={"n": s.n, "k": s.k, "d": s.d, "r": s.r},
                        paired_ceiling=case.op == "fwd" and p in PAIRED_PROVIDERS)
            out = run_measured(spec, case_timeout, gate, contention_retries)
            if out["status"] == "ok":
                row.times = out["times"]
                row.peak_bytes = out["peak_bytes"]
                row.mem_method = out["mem_method"]
                row.check, row.check_detail = out["check"], out["check_detail"]
                row.note = "; ".join(x for x in (row.note, out["note"]) if x)
                row.foreign_cores = out.get("foreign_cores")
                row.paired_frac = out.get("paired_frac")
                if out.get("attempts", 1) > 1:
                    row.note = "; ".join(x for x in (row.note, f"quietest of {out['attempts']} "
                                                     "runs (others used the CPUs)") if x)
            elif out["status"] == "skipped":
                row.status, row.check = "skipped", "skipped: " + out["reason"]
            else:
                row.status, row.check = "error", "ERROR"
                row.check_detail = out["error"]
                if out.get("traceback"):
                    print(f"[bench] {p} {OPS[case.op]} {s.label} failed:\n{out['traceback']}",
                          file=sys.stderr)
        rows.append(row)
        bar.update(1)
    ceil_end = measure_ceilings("end")
    bar.close()
    # The ceiling is a limit: the better of the two measurements (start and end of the run)
    ceilings = {d: max(x for x in (ceil_start.get(d), ceil_end.get(d)) if x is not None)
                for d in ds if d in ceil_start or d in ceil_end}
    for d in ds:
        if d in ceil_start and d in ceil_end:
            notes.append(f"ceiling d={d}: {ceil_start[d]:.1f} GFLOP/s at the start, "
                         f"{ceil_end[d]:.1f} at the end; the higher is used")
    for r in rows:
        r.ceiling = ceilings.get(r.shape.d)
    if gate.waited >= 1:
        notes.append(f"waited {gate.waited:.0f} s in all for other processes to leave the CPUs")
    _fill_ratios(rows)
    ext = sk.backend_status()
    if ext.get("cpu"):
        notes.append(f"backend cpu: {ext['cpu']}")
    machine = machine_info(device)
    machine["load average 1/5/15 min (start, end)"] = (
        " / ".join(f"{x:.2f}" for x in load_start) + ", "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return BenchResult(preset, str(device), rows, ceilings, machine, notes, fused)


def _fill_ratios(rows):
    """Speed-up vs the reference and vs faiss on the same shape and op."""
    by = {(r.provider, r.shape, r.op): r for r in rows}
    for r in rows:
        if r.median is None:
            continue
        ref = by.get(("reference", r.shape, r.op))
        if ref is not None and ref.median:
            r.vs_reference = ref.median / r.median
        fa = by.get(("faiss", r.shape, r.op))
        if fa is not None and fa.median:
            r.vs_faiss = fa.median / r.median


# --------------------------------------------------------------------- reporting

COLUMNS = ("provider", "shape NxKxd", "op", "median ms", "IQR ms", "runs", "Mtok/s", "GFLOP/s",
           "peak MiB", "x ref", "x faiss", "% ceil", "check")


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def row_cells(r: Row) -> list:
    if r.status != "ok":
        return [r.provider, r.shape.label, OPS[r.op]] + ["-"] * 9 + [r.check]
    q1, q3 = r.quartiles
    return [r.provider, r.shape.label, OPS[r.op], f"{r.median * 1e3:.2f}",
            f"{(q3 - q1) * 1e3:.2f}", str(len(r.times)), f"{r.tokens_per_s / 1e6:.3g}",
            f"{r.gflops:.1f}", _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20,
                                    ".1f"),
            _fmt(r.vs_reference, ".2f"), _fmt(r.vs_faiss, ".2f"),
            _fmt(None if r.frac_ceiling is None else 100 * r.frac_ceiling, ".0f"), r.check]


def format_table(rows) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i < 3 or i == len(c) - 1 else x.rjust(w)
                               for i, (x, w) in enumerate(zip(c, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if i < 3 or i == len(COLUMNS) - 1 else "---:"
                          for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(out)


def footnotes(result: BenchResult) -> list:
    """Row notes, check failures and errors, numbered by row."""
    lines = []
    for r in result.rows:
        extra = [x for x in (r.note,) if x]
        if r.status == "error" or r.check == "FAIL":
            extra.append(r.check_detail)
        if r.mem_method and not r.mem_method.startswith(("VmHWM growth (reset)",
                                                         "cuda max_memory")):
            extra.append("memory: " + r.mem_method)
        if extra:
            lines.append(f"{r.provider} {OPS[r.op]} {r.shape.label}: " + "; ".join(extra))
    return lines


def evaluate_targets(result: BenchResult) -> list:
    """Issue 2's targets for the fused backend: (target, measured, 'met' | 'MISSED')."""
    f = result.fused
    out = []
    fwd = [r for r in result.rows if r.provider == f and r.op == "fwd" and r.median]
    for r in fwd:
        if r.vs_reference is not None:
            want = 4.0 if r.shape.d <= 64 else 2.0
            out.append((f"fused fwd >= {want:g}x reference at {r.shape.label}",
                        f"{r.vs_reference:.2f}x", "met" if r.vs_reference >= want else "MISSED"))
    for r in fwd:
        if r.vs_faiss is not None:
            out.append((f"fused fwd >= 1.0x faiss at {r.shape.label}", f"{r.vs_faiss:.2f}x",
                        "met" if r.vs_faiss >= 1.0 else "MISSED"))
    for r in fwd:  # issue 2 sets the ceiling target on its four timing shapes
        if r.frac_ceiling is not None and r.shape != MEMORY_SHAPE:
            how = ("paired" if r.paired_frac is not None
                   else f"of {r.ceiling:.0f} GFLOP/s")
            out.append((f"fused fwd >= 75% of the ceiling at {r.shape.label}",
                        f"{100 * r.frac_ceiling:.1f}% ({how})",
                        "met" if r.frac_ceiling >= 0.75 else "MISSED"))
    for r in result.rows:
        if r.provider == f and r.op == "layer" and r.vs_reference is not None:
            out.append((f"layer fwd+bwd >= 2x reference layer at {r.shape.label}",
                        f"{r.vs_reference:.2f}x", "met" if r.vs_reference >= 2 else "MISSED"))
    for r in fwd:
        if r.shape == MEMORY_SHAPE and r.peak_bytes is not None:
            mib = r.peak_bytes / 2**20
            out.append((f"fused fwd peak memory < {MEMORY_TARGET_MIB} MiB above inputs at "
                        f"{r.shape.label}", f"{mib:.1f} MiB",
                        "met" if mib < MEMORY_TARGET_MIB else "MISSED"))
    for r in result.rows:
        if r.check == "FAIL" or r.status == "error":
            out.append((f"{r.provider} {OPS[r.op]} {r.shape.label} correct", r.check,
                        "MISSED"))
    return out


def format_report(result: BenchResult) -> str:
    """The plain-text report: header, table, ceilings, notes, targets."""
    m = result.machine
    lines = [f"simvq-kernels bench: preset {result.preset.name!r} on {result.device} "
             f"({m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch threads']} threads), "
             f"{m['date']}, commit {m['git commit']}", "", format_table(result.rows), ""]
    if result.ceilings:
        lines.append("matmul ceiling (GFLOP/s): " + ", ".join(
            f"d={d}: {g:.1f}" for d, g in sorted(result.ceilings.items())))
    lines.append("% ceil: forward rows of " + ", ".join(PAIRED_PROVIDERS) + " measured side "
                 "by side with the ceiling tile in the same process (see the markdown)")
    lines.append("GFLOP/s counts 2*N*K*d per call for every op; x ref / x faiss = their "
                 "time / this row's time; peak MiB = measured growth above the inputs.")
    for n in result.notes + footnotes(result):
        lines.append("note: " + n)
    targets = evaluate_targets(result)
    if targets:
        lines += ["", f"issue 2 targets (fused backend '{result.fused}'):"]
        for t, v, s in targets:
            lines.append(f"  [{s:>6}] {t}: {v}")
    return "\n".join(lines)


def format_markdown(result: BenchResult, plot_path: Optional[str] = None,
                    command: str = "") -> str:
    m = result.machine
    md = [f"# simvq-kernels benchmark: preset `{result.preset.name}` on {result.device}", ""]
    for k, v in m.items():
        md.append(f"- **{k}**: {v}")
    if command:
        md += ["", "Command:", "", "```", command, "```"]
    md += ["", format_markdown_table(result.rows), ""]
    if result.ceilings:
        t = 8192 if result.device.startswith("cuda") else 1024
        md.append(f"Matmul ceiling (torch.mm of a cache-resident {t} x d x {t} tile into a "
                  "preallocated output, the better of the start and end of the run): "
                  + ", ".join(
                      f"d={d}: {g:.1f} GFLOP/s" for d, g in sorted(result.ceilings.items())))
        md.append("")
    md.append("GFLOP/s counts 2·N·K·d per call for every op. `x ref` / `x faiss` = their "
              "median time / this row's. Peak MiB = measured growth of the resident set "
              "(VmHWM) above the inputs, in a fresh child process per row. `% ceil`: for "
              f"the forward rows of {', '.join(PAIRED_PROVIDERS)}, measured side by side "
              f"(the op and an equally long batch of ceiling tiles timed alternately in "
              f"the same process, median of {PAIRS} per-pair ratios, so that the machine's "
              "drifts cancel); for other rows, this row's GFLOP/s over the run's ceiling.")
    notes = result.notes + footnotes(result)
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    targets = evaluate_targets(result)
    if targets:
        md += ["", f"## Issue 2 targets (fused backend `{result.fused}`)", "",
               "| target | measured | |", "|---|---:|---|"]
        md += [f"| {t} | {v} | {s} |" for t, v, s in targets]
    if plot_path:
        md += ["", f"![throughput vs K]({plot_path})"]
    return "\n".join(md) + "\n"


CSV_FIELDS = ("provider", "n", "k", "d", "r", "op", "status", "runs", "median_s", "q1_s",
              "q3_s", "min_s", "max_s", "tokens_per_s", "gflops", "peak_mib", "mem_method",
              "vs_reference", "vs_faiss", "ceiling_gflops", "frac_ceiling",
              "frac_ceiling_method", "check",
              "check_detail", "foreign_cores", "note", "device")


def write_csv(result: BenchResult, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result.rows:
            q1, q3 = r.quartiles if r.times else (None, None)
            w.writerow({
                "provider": r.provider, "n": r.shape.n, "k": r.shape.k, "d": r.shape.d,
                "r": r.shape.basis_dim, "op": OPS[r.op], "status": r.status,
                "runs": len(r.times), "median_s": r.median, "q1_s": q1, "q3_s": q3,
                "min_s": min(r.times) if r.times else None,
                "max_s": max(r.times) if r.times else None,
                "tokens_per_s": r.tokens_per_s, "gflops": r.gflops,
                "peak_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20,
                "mem_method": r.mem_method, "vs_reference": r.vs_reference,
                "vs_faiss": r.vs_faiss, "ceiling_gflops": r.ceiling,
                "frac_ceiling": r.frac_ceiling,
                "frac_ceiling_method": ("paired" if r.paired_frac is not None else
                                        "run ceiling" if r.frac_ceiling is not None else ""),
                "check": r.check,
                "check_detail": r.check_detail, "foreign_cores": r.foreign_cores,
                "note": r.note, "device": result.device})


def write_plot(result: BenchResult, path: str) -> None:
    """Throughput (GFLOP/s = 2NKd / time) vs K per provider: one row of panels per op,
    one column per d, with the matmul ceiling for that d as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in result.rows if r.median]
    ops = [op for op in OPS if any(r.op == op for r in timed)]
    ds = sorted({r.shape.d for r in timed})
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), len(ds), figsize=(5.2 * len(ds), 4.0 * len(ops)),
                             squeeze=False)
    providers = list(dict.fromkeys(r.provider for r in result.rows))
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    for i, op in enumerate(ops):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            cell = [r for r in timed if r.op == op and r.shape.d == d]
            if not cell:
                ax.axis("off")
                continue
            for p in providers:
                pts = sorted((r.shape.k, r.gflops) for r in cell if r.provider == p)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=p,
                            color=colours[p])
            if d in result.ceilings:
                ax.axhline(result.ceilings[d], ls="--", color="k", lw=1,
                           label=f"matmul ceiling ({result.ceilings[d]:.0f})")
            ns = sorted({r.shape.n for r in cell})
            ks = sorted({r.shape.k for r in cell})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ks)
            ax.set_xticklabels([f"{k // 1024}k" if k >= 1024 else str(k) for k in ks])
            ax.set_xlim(ks[0] / 1.6, ks[-1] * 1.6)
            ax.set_xlabel("K (codes)")
            ax.set_ylabel("GFLOP/s (2NKd / time)")
            ax.set_title(f"{OPS[op]}, d={d}, N={'/'.join(map(str, ns))}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    m = result.machine
    fig.suptitle(f"simvq-kernels '{result.preset.name}' on {m.get('gpu', m['cpu'])} "
                 f"({m['torch threads']} threads), {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


def list_presets(show_hidden: bool = False) -> str:
    lines = []
    for p in PRESETS.values():
        if p.hidden and not show_hidden:
            continue
        lines.append(f"{p.name:<8} {p.description}")
        for c in p.cases:
            only = f" [{', '.join(c.providers)} only]" if c.providers else ""
            lines.append(f"{'':<10}{OPS[c.op]:<14} {c.shape.label}{only}")
    return "\n".join(lines)


def _split(s: Optional[str]):
    if s is None:
        return None
    s = s.strip()
    if s in ("", "none"):
        return []
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m simvq_kernels.bench",
        description="Benchmark simvq-kernels' backends against the reference and peer tools, "
                    "with correctness checks and measured peak memory.")
    ap.add_argument("--preset", default="quick",
                    help="preset name (see --list-presets); default: quick")
    ap.add_argument("--memory-check", action="store_true",
                    help="only measure the fused forward's peak memory at 16384x262144x32 "
                         "(same as --preset memory)")
    ap.add_argument("--list-presets", action="store_true", help="list presets and exit")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of backends (default: all of {','.join(BACKEND_NAMES)} "
                         "that serve the device)")
    ap.add_argument("--peers", default=None,
                    help=f"comma list of peers, 'all' or 'none' (default: all of "
                         f"{','.join(PEER_NAMES)} that are installed)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per row after the warm-up (default 7 on CPU, 25 on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each child (default: torch's default)")
    ap.add_argument("--check-rows", type=int, default=1024,
                    help="tokens checked against all codes in float64 (default 1024; all "
                         "tokens when N is at most this)")
    ap.add_argument("--case-budget", type=float, default=60.0,
                    help="seconds of timed runs per row before --repeat is reduced (default 60)")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="repeat the --repeat timed runs until at least this many seconds "
                         "have been timed (default 1; 0 = exactly --repeat runs)")
    ap.add_argument("--case-timeout", type=float, default=900.0,
                    help="kill a row's child process after this many seconds (default 900)")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each row, wait up to this many seconds for other processes "
                         "to leave the CPUs (default 60; 0 = don't wait)")
    ap.add_argument("--quiet-wait-total", type=float, default=600.0,
                    help="stop waiting for quiet after this many seconds in all (default 600)")
    ap.add_argument("--contention-retries", type=int, default=2,
                    help="re-run a row this many times if others used the CPUs while it was "
                         "timed, keeping the least contended run (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV file")
    ap.add_argument("--plot", default=None, help="write a PNG plot of throughput vs K")
    ap.add_argument("--markdown", default=None,
                    help="write a markdown summary (machine, versions, table, targets)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.memory_check:
        args.preset = "memory"
    if args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; choose from "
                 f"{[n for n, p in PRESETS.items() if not p.hidden]}")
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    peers = _split(args.peers)
    if peers == ["all"]:
        peers = None
    result = run_benchmark(PRESETS[args.preset], backends=_split(args.backends), peers=peers,
                           device=args.device, repeat=args.repeat, check_rows=args.check_rows,
                           case_budget=args.case_budget, min_time=args.min_time,
                           case_timeout=args.case_timeout, quiet_wait=args.quiet_wait,
                           quiet_wait_total=args.quiet_wait_total,
                           contention_retries=args.contention_retries,
                           threads=args.threads, seed=args.seed,
                           progress=not args.no_progress)
    print(format_report(result))
    if args.csv:
        write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        plot_rel = (os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
                    if args.plot else None)
        cmd = "python -m simvq_kernels.bench " + " ".join(
            sys.argv[1:] if argv is None else argv)
        with open(args.markdown, "w") as f:
            f.write(format_markdown(result, plot_rel, cmd))
        print(f"wrote {args.markdown}")
    bad = [r for r in result.rows if r.check == "FAIL" or r.status == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
