"""The GPU kernels that set the bar, as bench providers, and the side-by-side summary.

- ``flash-kmeans`` (flash-kmeans 0.3.1, svg-project/flash-kmeans): its Triton assignment
  kernel, ``flash_kmeans.assign_euclid_triton.euclid_assign_triton(x, centroids, x_sq,
  out=None, c_sq=None)``: x (B, N, D), centroids (B, K, D) of one dtype, x_sq (B, N) and
  c_sq (B, K) fp32 squared norms, out (B, N) int32 cluster ids.
- ``flashlib`` (flashlib 0.4.0, FlashML-org): its k-means Triton assignment kernel,
  ``flashlib.primitives.kmeans.triton.assign.euclid_assign_triton(x, centroids,
  out=None, c_sq=None)`` (ranks ||c||^2 - 2 x.c: no x_sq). Its CuTe DSL kernels need
  nvidia-cutlass-dsl, whose libraries are too large to carry to the GPU machine, so
  only its Triton kernel is measured.

Both run on the same inputs as this library's backends (the preset's bf16 z and
codebook, as a batch of one), with their default fixed-rule tile heuristics (no
autotuning). Their norms are inputs in their API, so they are computed before the timed
call, as a k-means loop would hold them; both kernels take N, K and d as compile-time
constants, so each runner compiles its kernel for the row's shape when it is built
(untimed). They return indices only: their rows check the picks, not distances.

Dry run on a CPU (``SIMVQ_BENCH_PEER_STAND_INS=1``, set by ``benchmarks/gpu/run.sh``
with ``DRY_RUN=1``, which also puts benchmarks/gpu/standins first on PYTHONPATH): the
stand-in packages there have the same import paths and call signatures, validate their
arguments as the real ones do, and compute in PyTorch, so the CPU dry run goes through
these builders, the checks and the reports (whose dry-run notes say so).

The side-by-side table of their TFLOP/s next to ours and cuBLAS's is gpu_summary.py.
"""
from __future__ import annotations

import os
import sys

import torch

from .inputs import Inputs
from .providers import NotAvailable, Provider, Runner, register

STAND_INS_ENV = "SIMVQ_BENCH_PEER_STAND_INS"
# the peers whose kernels set the bar (bf16 forward rows of the GPU preset)
KERNEL_PEERS = ("flash-kmeans", "flashlib")


def stand_ins_on() -> bool:
    return os.environ.get(STAND_INS_ENV, "0") == "1"


def _is_stand_in(fn) -> bool:
    return bool(getattr(sys.modules.get(fn.__module__), "STAND_IN", False))


def _check_device(fn, inp: Inputs, name: str) -> None:
    if inp.z.device.type != "cuda" and not _is_stand_in(fn):
        raise NotAvailable(f"{name} runs on CUDA tensors only")


def _batch_of_one(inp: Inputs):
    return inp.z[None], inp.codebook[None]


def _flash_kmeans(op: str, inp: Inputs) -> Runner:
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except ImportError as e:
        raise NotAvailable(f"flash-kmeans has no Triton assignment kernel here ({e})")
    _check_device(euclid_assign_triton, inp, "flash-kmeans")
    x, c = _batch_of_one(inp)
    x_sq = x.float().pow(2).sum(-1)
    c_sq = c.float().pow(2).sum(-1)
    out = torch.empty(x.shape[:2], dtype=torch.int32, device=x.device)

    def run_fk():
        return euclid_assign_triton(x, c, x_sq, out, c_sq)
    run_fk()  # compiles for this N, K, d (constexpr in its kernel): not part of the timing
    return Runner(run_fk, lambda o: {"idx": o[0].long(), "dist": None})


def _flashlib(op: str, inp: Inputs) -> Runner:
    try:
        from flashlib.primitives.kmeans.triton.assign import euclid_assign_triton
    except ImportError as e:
        raise NotAvailable(f"flashlib has no Triton k-means assignment kernel here ({e})")
    _check_device(euclid_assign_triton, inp, "flashlib")
    x, c = _batch_of_one(inp)
    c_sq = c.float().pow(2).sum(-1)
    out = torch.empty(x.shape[:2], dtype=torch.int32, device=x.device)

    def run_fl():
        return euclid_assign_triton(x, c, out, c_sq)
    run_fl()  # compiles for this N, K, d (constexpr in its kernel): not part of the timing
    return Runner(run_fl, lambda o: {"idx": o[0].long(), "dist": None})


def _register() -> None:
    # CUDA only, except in a dry run with the stand-ins on the path
    devices = ("cuda", "cpu") if stand_ins_on() else ("cuda",)
    note = ("runs on CUDA only (a CPU dry run uses the stand-ins of benchmarks/gpu/standins)")
    # fp32 inputs: their tl.dot multiplies in tf32 (truncated operands), so no "fp32" mode
    modes = ("tf32", "bf16", "fp16")
    register(Provider("flash-kmeans", "peer", ("fwd",), _flash_kmeans, module="flash_kmeans",
                      pip="flash-kmeans", devices=devices, modes=modes,
                      device_note="flash-kmeans " + note))
    register(Provider("flashlib", "peer", ("fwd",), _flashlib, module="flashlib",
                      pip="flashlib", devices=devices, modes=modes,
                      device_note="flashlib " + note))


_register()
