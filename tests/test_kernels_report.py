"""The Triton kernels compile for real GPUs, checked without one.

- ``python -m simvq_kernels.info --kernels`` compiles every configuration the launchers
  can choose for sm_90a and sm_80 and must exit 0 (no build fails, spills, exceeds the
  architecture's shared memory, or lacks a tensor-core instruction where its products
  are bf16/fp16/tf32); every build is listed.
- The AOT list covers every configuration the launchers' fixed rules can pick.
- ``simvq_kernels.sass`` reads resources and tensor-core instructions from a Triton
  cubin and from a shared object with CUDA kernels for two architectures.

Run in subprocesses without TRITON_INTERPRET (the compiler, not the interpreter).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from simvq_kernels.triton import aot
from simvq_kernels.triton.nearest_code import search_config
from simvq_kernels.triton.prologue import project_config, sqnorm_config
from simvq_kernels.triton.quantize_backward import backward_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_info_kernels_compiles_every_config_for_hopper_and_ampere():
    proc = subprocess.run([sys.executable, "-m", "simvq_kernels.info", "--kernels"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    rows = [line.split() for line in out.splitlines()]
    builds = aot.builds()
    assert {b.arch for b in builds} == {"sm_90a", "sm_80"}
    for b in builds:
        cfg_words = b.config.split()
        match = [r for r in rows if r[:3] == [b.kernel, b.arch, b.dtype]
                 and r[3:3 + len(cfg_words)] == cfg_words]
        assert len(match) == 1, f"{b.kernel} {b.arch} {b.dtype} {b.config} not listed once"
        row = match[0]
        rest = row[3 + len(cfg_words):]
        regs, spill, smem = int(rest[0]), int(rest[1]), int(rest[2])
        assert 0 < regs <= 255 and spill == 0 and 0 <= smem <= b.shared_limit, row
        assert row[-1] == "ok", row
        if b.arch == "sm_80":  # the sm_80 tables also fit sm_86 / sm_89 (99 KiB a block)
            assert smem <= 99 * 1024, row
        if b.tensor_core:
            op = "HGMMA" if b.arch == "sm_90a" else "HMMA"
            assert op in rest[3], f"no {op} in {row}"
    assert f"{len(builds)} of {len(builds)} Triton builds ok" in out


def test_every_launcher_choice_is_built():
    """Whatever the shape, the search's choice on each architecture is a build for that
    architecture, and a whole-d tile holds d."""
    built = {(b.kernel, b.arch, b.dtype, b.config) for b in aot.builds()}
    ns = (1, 17, 4096, 65535, 65536, 65537, 262144, 262145, 2**24)
    ks = (1, 7, 256, 257, 1023, 1024, 1025, 16384, 16385, 65535, 65536, 65537, 262144)
    ds = list(range(1, 300)) + [511, 512, 513, 1024, 2048, 4096]
    for arch, sass_arch in (("sm_90", "sm_90a"), ("sm_80", "sm_80")):
        for dtype, label, prec in ((torch.bfloat16, "bf16", "ieee"),
                                   (torch.float16, "fp16", "ieee"),
                                   (torch.float32, "fp32-tf32", "tf32"),
                                   (torch.float32, "fp32-ieee", "ieee")):
            for d in ds:
                for n in ns:
                    for k in ks:
                        c = search_config(d, dtype, prec, interpreted=False, n=n, k=k,
                                          arch=arch)
                        assert ("nearest_code", sass_arch, label, c.label()) in built, \
                            (arch, label, n, k, d, c.label())
                        if c.constexprs()["SINGLE_D"]:
                            assert d <= c.constexprs()["BLOCK_D"]
    for arch in ("sm_90a", "sm_80"):
        for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                             (torch.float32, "fp32")):
            assert ("project", arch, label, project_config(False, dtype).label()) in built
            assert ("row_sqnorm", arch, label, sqnorm_config(False).label()) in built
            low = dtype != torch.float32
            assert ("gather_gemm_tn", arch, label,
                    backward_config(False, low).label()) in built


def test_tile_tables_follow_the_published_rows():
    """Spot checks of the rows seeded from flash-kmeans' per-GPU heuristics (cited in
    simvq_kernels/triton/nearest_code.py)."""
    def pick(n, k, d, dtype=torch.bfloat16, prec="ieee", arch="sm_90"):
        c = search_config(d, dtype, prec, interpreted=False, n=n, k=k, arch=arch)
        b = c.constexprs()
        return b["BLOCK_N"], b["BLOCK_K"], c.num_warps, c.num_stages
    # H100 bf16: BLOCK_N 64 below N = 65536; d = 128, 1024 < K <= 65536: 128, 8 warps, 2
    assert pick(16384, 16384, 128) == (64, 128, 8, 2)
    assert pick(65536, 16384, 128) == (128, 128, 8, 2)
    # d <= 64, 16384 < K <= 65536: BLOCK_K 128, 4 warps, 4 stages
    assert pick(262144, 65536, 64) == (128, 128, 4, 4)
    # d = 128, K > 65536 (the headline shapes): BLOCK_K 64, 4 warps, 4 stages
    assert pick(16384, 262144, 128) == (64, 64, 4, 4)
    assert pick(262144, 262144, 128) == (128, 64, 4, 4)
    # A100: BLOCK_N 128, BLOCK_K 32, 4 warps, 2 stages; d = 128, N <= 65536: BLOCK_K 64
    assert pick(16384, 16384, 64, arch="sm_80") == (128, 32, 4, 2)
    assert pick(16384, 16384, 128, arch="sm_80") == (128, 64, 4, 2)
    assert pick(262144, 16384, 128, arch="sm_80") == (128, 32, 4, 2)
    # H200 fp32 (tf32 products), d <= 64, 256 < K <= 65536: 128 x 128, 8 warps, 2 stages
    assert pick(16384, 4096, 64, torch.float32, "tf32") == (128, 128, 8, 2)


def test_sass_reads_a_triton_cubin():
    b = next(b for b in aot.builds() if b.kernel == "nearest_code" and b.dtype == "bf16"
             and b.arch == "sm_80")
    r = aot.compile_build(b)
    assert r.ok, r.problems
    assert r.tensor_core_ops.get("HMMA", 0) > 0 and r.registers > 0 and r.spill_bytes == 0


_CU = r"""
#include <mma.h>
using namespace nvcuda;
__global__ void tc_kernel(const half* a, const half* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
__global__ void plain_kernel(float* x) { x[threadIdx.x] *= 2.0f; }
extern "C" void launch(const half* a, const half* b, float* c) { tc_kernel<<<1, 32>>>(a, b, c); }
"""


def test_sass_reads_a_shared_object_with_two_architectures(tmp_path):
    from simvq_kernels import sass
    nvcc = shutil.which("nvcc")
    assert nvcc is not None, "nvcc is part of the development and CI machines"
    src = tmp_path / "k.cu"
    src.write_text(_CU)
    so = tmp_path / "libk.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC",
                    "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90a,code=sm_90a", "-o", str(so), str(src)],
                   check=True, capture_output=True, timeout=600)
    rows = {(r.arch, "tc" if "tc_kernel" in r.kernel else "plain"): r
            for r in sass.inspect_binary(str(so))}
    assert set(rows) == {("sm_80", "tc"), ("sm_80", "plain"), ("sm_90a", "tc"),
                         ("sm_90a", "plain")}
    for arch in ("sm_80", "sm_90a"):
        assert rows[(arch, "tc")].tensor_core_ops.get("HMMA", 0) > 0
        assert rows[(arch, "plain")].tensor_core_ops == {}
        assert rows[(arch, "plain")].registers > 0 and rows[(arch, "plain")].local == 0


def test_sass_on_an_object_without_device_code():
    from simvq_kernels import _ext, sass
    ext = _ext.load()
    if ext is None:
        pytest.fail(f"the compiled extension does not load: {_ext.error()}")
    rows = sass.inspect_binary(ext.__file__)
    if not _ext.built_with_cuda():
        assert rows == []
    else:
        assert rows and all(r.arch.startswith("sm_") for r in rows)
