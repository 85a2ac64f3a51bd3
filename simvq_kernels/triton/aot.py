"""Compile every Triton configuration the launchers can choose, for a GPU that is not here.

``builds()`` lists each kernel x dtype x tile configuration that a launcher can pick
(the fixed rules in nearest_code.py, prologue.py, quantize_backward.py) for sm_90a
(Hopper) and sm_80 (Ampere) -- for the search, every row of that architecture's tile
tables (nearest_code.TABLES); ``compile_build()`` compiles one with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and reads the
cubin with ``simvq_kernels.sass``: registers, local memory (spills), shared memory and
the tensor-core instructions in the SASS. ``python -m simvq_kernels.info --kernels``
prints the table and fails if a build fails to compile, spills, needs more shared
memory than the architecture has, or lacks a tensor-core instruction where its products
are bf16, fp16 or tf32.

The builds mirror the launchers' runtime specialisation for contiguous inputs: unit
inner strides are constants and pointers are 16-byte aligned (what torch allocates).
Same API in Triton 3.6 and 3.8 (``ASTSource(fn, signature, constexprs, attrs)``,
``GPUTarget(backend, arch, warp_size)``, ``attrs`` as ``{(i,): [["tt.divisibility", 16]]}``).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import sass
from .nearest_code import TABLES, nearest_code_kernel, table_configs
from .prologue import project_config, project_kernel, row_sqnorm_kernel, sqnorm_config
from .quantize_backward import backward_config, gather_gemm_kernel

# (compute capability, SASS arch name, max dynamic shared memory per block in bytes,
#  the search's tile tables for it: nearest_code.TABLES)
ARCHS = ((90, "sm_90a", 232448), (80, "sm_80", 166912))
_TABLE_ARCH = {90: "sm_90", 80: "sm_80"}

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Build:
    kernel: str  # the TritonKernel's attribute name in KERNELS
    dtype: str  # bf16 / fp16 / fp32-tf32 / fp32-ieee / fp32
    config: str
    tensor_core: bool  # its products are bf16, fp16 or tf32: a tensor-core op is required
    signature: dict
    constexprs: dict
    aligned: tuple  # pointer arguments known to be 16-byte aligned
    options: dict
    cc: int = 90
    arch: str = "sm_90a"
    shared_limit: int = 232448


@dataclass
class BuildResult:
    build: Build
    ok: bool = False
    error: str = ""
    seconds: float = 0.0
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread
    shared: int = 0  # dynamic + static shared memory per block
    tensor_core_ops: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


KERNELS = {
    "nearest_code": nearest_code_kernel,
    "project": project_kernel,
    "row_sqnorm": row_sqnorm_kernel,
    "gather_gemm_tn": gather_gemm_kernel,
}


def _aligned(names, sig):
    assert all(n in sig for n in names)
    return tuple(names)


def _search_builds(cc: int):
    """Every distinct configuration of the search's tile tables for ``cc``, per dtype."""
    arch = _TABLE_ARCH[cc]
    rows = []
    plans = [(torch.bfloat16, "bf16", "ieee", "tc", True),
             (torch.float16, "fp16", "ieee", "tc", True),
             (torch.float32, "fp32-tf32", "tf32", "tf32", True),
             (torch.float32, "fp32-ieee", "ieee", "ieee", False)]
    for dtype, label, prec, kind, tc in plans:
        for c in table_configs(TABLES[(arch, kind)]):
            p = _PTR[dtype]
            sig = {"Z": p, "Q": p, "QN": "*fp32", "OUT_VAL": "*fp32", "OUT_IDX": "*i32",
                   "N": "i32", "K": "i32", "D": "i32", "k_per_split": "i32",
                   "stride_zn": "i32", "stride_zd": "constexpr", "stride_qk": "i32",
                   "stride_qd": "constexpr"}
            ce = dict(stride_zd=1, stride_qd=1, INPUT_PRECISION=prec, UPCAST=False,
                      USE_DOT=True, **c.constexprs())
            sig.update({k: "constexpr" for k in ce if k not in sig})
            rows.append(Build("nearest_code", label, c.label(), tc, sig, ce,
                              _aligned(["Z", "Q", "QN", "OUT_VAL", "OUT_IDX"], sig),
                              {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return rows


def _project_builds():
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        c = project_config(False, dtype)
        p = _PTR[dtype]
        sig = {"B": p, "W": p, "BIAS": p, "Q": p, "QN_PART": "*fp32", "K": "i32", "R": "i32",
               "D": "i32",
               "stride_bk": "i32", "stride_br": "constexpr", "stride_wd": "i32",
               "stride_wr": "constexpr", "stride_bias": "constexpr", "stride_qk": "i32"}
        ce = dict(stride_br=1, stride_wr=1, stride_bias=1, HAS_BIAS=True,
                  UPCAST=(dtype == torch.float32), BF16_BITS=False, USE_DOT=True,
                  **c.constexprs())
        sig.update({k: "constexpr" for k in ce if k not in sig})
        rows.append(Build("project", _SHORT[dtype], c.label(), dtype != torch.float32, sig, ce,
                          _aligned(["B", "W", "BIAS", "Q", "QN_PART"], sig),
                          {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return rows


def _sqnorm_builds():
    rows = []
    c = sqnorm_config(False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sig = {"X": _PTR[dtype], "OUT": "*fp32", "M": "i32", "D": "i32", "stride_m": "i32",
               "stride_d": "constexpr"}
        ce = dict(stride_d=1, **c.constexprs())
        sig.update({k: "constexpr" for k in ce if k not in sig})
        rows.append(Build("row_sqnorm", _SHORT[dtype], c.label(), False, sig, ce,
                          _aligned(["X", "OUT"], sig),
                          {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return rows


def _backward_builds():
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        low = dtype != torch.float32
        c = backward_config(False, low)
        p = _PTR[dtype]
        sig = {"G": p, "B": p, "IDX": "*i64", "OUT": "*fp32", "N": "i32", "D": "i32",
               "R": "i32", "K": "i32", "n_per_split": "i32", "stride_gn": "i32", "stride_gd": "constexpr",
               "stride_bk": "i32", "stride_br": "constexpr"}
        ce = dict(stride_gd=1, stride_br=1, UPCAST=not low, USE_DOT=True, **c.constexprs())
        sig.update({k: "constexpr" for k in ce if k not in sig})
        rows.append(Build("gather_gemm_tn", _SHORT[dtype], c.label(), low, sig, ce,
                          _aligned(["G", "B", "IDX", "OUT"], sig),
                          {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return rows


def builds(archs=ARCHS) -> list[Build]:
    """Every (kernel, dtype, configuration) the launchers can choose, for each arch (the
    search: its tile table for that arch)."""
    out = []
    for cc, name, limit in archs:
        for b in (_search_builds(cc) + _project_builds() + _sqnorm_builds()
                  + _backward_builds()):
            b.cc, b.arch, b.shared_limit = cc, name, limit
            out.append(b)
    return out


def _ordered_signature(b: Build) -> dict:
    fn = KERNELS[b.kernel].jit
    missing = [a for a in fn.arg_names if a not in b.signature]
    if missing:
        raise ValueError(f"{b.kernel}: no signature entry for {missing}")
    return {a: b.signature[a] for a in fn.arg_names}


def compile_build(b: Build) -> BuildResult:
    """Compile one build for its arch and read its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = BuildResult(b)
    t0 = time.perf_counter()
    try:
        sig = _ordered_signature(b)
        attrs = {(list(sig).index(n),): [["tt.divisibility", 16]] for n in b.aligned}
        src = ASTSource(fn=KERNELS[b.kernel].jit, signature=sig, constexprs=b.constexprs,
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", b.cc, 32), options=dict(b.options))
        cubin = k.asm["cubin"]
        ptx = k.asm["ptx"]
    except Exception as e:  # a failed build is a row of the report, not a crash
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        res.problems.append("does not compile: " + res.error)
        res.seconds = time.perf_counter() - t0
        return res
    res.seconds = time.perf_counter() - t0
    kernels = sass.inspect_binary(cubin)
    if len(kernels) != 1:
        res.problems.append(f"expected one kernel in the cubin, found {len(kernels)}")
        return res
    r = kernels[0]
    res.registers = r.registers
    res.spill_bytes = r.local
    res.shared = int(getattr(k.metadata, "shared", 0)) + r.shared
    res.tensor_core_ops = r.tensor_core_ops
    target_line = next((ln for ln in ptx.splitlines() if ln.startswith(".target")), "")
    if b.arch not in target_line.split():
        res.problems.append(f"PTX targets {target_line!r}, not {b.arch}")
    if r.arch != b.arch:
        res.problems.append(f"cubin is for {r.arch}, not {b.arch}")
    if res.spill_bytes > 0:
        res.problems.append(f"spills ({res.spill_bytes} bytes of local memory per thread)")
    if res.shared > b.shared_limit:
        res.problems.append(f"needs {res.shared} bytes of shared memory > {b.shared_limit}")
    if b.tensor_core and not res.tensor_core_ops:
        res.problems.append("no tensor-core instruction in the SASS")
    res.ok = not res.problems
    return res


def compile_all(archs=ARCHS, jobs: int | None = None) -> list[BuildResult]:
    """Compile every build (in ``jobs`` worker processes; Triton's cache makes reruns
    fast)."""
    todo = builds(archs)
    jobs = jobs or min(4, os.cpu_count() or 1)
    # TRITON_INTERPRET also changes how the compiler evaluates constexpr functions:
    # compile as a GPU process would (the workers inherit the environment)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        if jobs <= 1:
            return [compile_build(b) for b in todo]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(compile_build, todo))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def format_table(results: list[BuildResult]) -> str:
    head = ("kernel", "arch", "dtype", "config", "regs", "spill B", "smem B", "tensor-core op",
            "status")
    rows = []
    for r in results:
        b = r.build
        tc = ", ".join(f"{op} x{n}" for op, n in sorted(r.tensor_core_ops.items())) or "-"
        rows.append((b.kernel, b.arch, b.dtype, b.config, str(r.registers), str(r.spill_bytes),
                     str(r.shared), tc, "ok" if r.ok else "FAIL: " + "; ".join(r.problems)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
