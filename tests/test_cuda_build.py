"""The CUDA kernels' machine code, read from the installed extension without a GPU.

The extension's fatbinary is read with ``cuobjdump`` (the copy Triton ships): the
search and backward kernels exist for sm_80 and sm_90a in every mode (bf16, fp16,
tf32, 3xTF32) and the projection in bf16/fp16, all using the tensor cores (HMMA) with
their fragments read by ldmatrix (LDSM: 6 per 16 MMAs); the bf16/fp16 kernels fit the
register budget of 2 blocks per SM; the search keeps its tiles in dynamic shared memory
(sized at launch); the CUDA-core kernels (float64, the fp32 projection) exist too; no
kernel has local memory (no spills, no stack arrays); sm_80 PTX is embedded for newer
GPUs.

This test builds nothing. When the installed extension has no CUDA kernels it skips,
saying why, unless CI is set and a CUDA toolkit and a CUDA build of torch are both
present: then the CUDA build was expected and the test fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from simvq_kernels import _ext

MODES = ("bf16", "fp16", "tf32", "tf32x3")
ARCHS = ("sm_80", "sm_90a")
# kernels that must use the tensor cores, per mode
MMA_KERNELS = ("search_kernel", "project_kernel", "backward_kernel")
OPS = ("nearest_code", "quantize", "quantize_backward")


def _toolkit_present() -> bool:
    if os.environ.get("CUDA_HOME") and os.path.exists(
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _cuda_build_expected() -> bool:
    return torch.version.cuda is not None and _toolkit_present()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def extension_path():
    mod = _ext.load()
    built = _ext.built_with_cuda()
    if mod is None or not built:
        info = _ext.build_info()
        why = ("the compiled extension is not loaded: " + str(_ext.error())) if mod is None \
            else "the installed extension was built without CUDA kernels"
        if info.get("cuda_reason"):
            why += f" ({info['cuda_reason']})"
        if _in_ci() and _cuda_build_expected():
            pytest.fail(f"CI has nvcc and a CUDA build of torch {torch.__version__}, but {why}")
        pytest.skip(why)
    return mod.__file__


@pytest.fixture(scope="module")
def kernels(extension_path):
    from simvq_kernels import sass

    try:
        sass.tool("cuobjdump")
    except sass.ToolMissing as e:
        pytest.fail(f"cannot read the extension's machine code: {e}")
    rows = sass.inspect_binary(extension_path)
    assert rows, f"cuobjdump found no device code in {extension_path}"
    return rows


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def _find(rows, arch, kernel, mode):
    """The rows of `arch` whose kernel is simvq::cuda::kernels::<kernel><mode::<mode>>."""
    names = _demangle([r.kernel for r in rows])
    want = f"simvq::cuda::kernels::{kernel}<simvq::cuda::mode::{mode}>("
    return [r for r in rows if r.arch == arch and want in names[r.kernel]]


def test_ops_registered_for_cuda(extension_path):
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"simvq::{op}", "CUDA"), op


def test_build_info_records_the_cuda_build(extension_path):
    info = _ext.build_info()
    assert info.get("cuda") is True, info
    assert info.get("cuda_reason") is None, info


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", MMA_KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_tensor_core_kernel_present(kernels, arch, kernel, mode):
    if kernel == "project_kernel" and mode not in ("bf16", "fp16"):
        # fp32 projections run on CUDA cores (exact fp32 accumulation): none built
        assert not _find(kernels, arch, kernel, mode)
        return
    found = _find(kernels, arch, kernel, mode)
    assert len(found) == 1, (f"{kernel}<{mode}> for {arch}: found {len(found)}; "
                             f"archs present: {sorted({r.arch for r in kernels})}")
    r = found[0]
    hmma = r.tensor_core_ops.get("HMMA", 0)
    assert hmma > 0, f"{kernel}<{mode}> for {arch} has no HMMA: {r.tensor_core_ops}"
    plain = hmma
    if mode == "tf32x3":  # three products per step: hi*hi + hi*lo + lo*hi
        plain = _find(kernels, arch, kernel, "tf32")[0].tensor_core_ops.get("HMMA", 0)
        assert hmma == 3 * plain, (hmma, plain)
    # fragments by ldmatrix.x4: per k-step 4 for A (64 rows) and 2 for B (32 cols) per
    # 4 x 4 MMAs
    ldsm = r.shared_memory_ops.get("LDSM", 0)
    assert ldsm > 0 and ldsm * 16 == plain * 6, (kernel, mode, arch, ldsm, plain)
    assert r.local == 0, f"{kernel}<{mode}> for {arch} uses {r.local} bytes of local memory"
    assert r.registers <= 255
    # the 16-bit modes are launched with 2 blocks of 256 threads per SM
    if mode in ("bf16", "fp16"):
        assert r.registers <= 128, r.registers
    assert r.shared <= 48 * 1024 + 1024, r.shared  # static shared memory only
    if kernel == "search_kernel":  # its tiles are dynamic (planned per device at launch)
        assert r.shared <= 1024, r.shared


def test_no_kernel_uses_local_memory(kernels):
    spilling = [(r.arch, r.kernel, r.local, r.stack) for r in kernels
                if r.local or r.stack]
    assert not spilling, spilling


def test_every_kernel_built_for_both_archs(kernels):
    by_arch = {a: {r.kernel for r in kernels if r.arch == a} for a in ARCHS}
    for a in ARCHS:
        assert by_arch[a], f"no kernel for {a}: {sorted({r.arch for r in kernels})}"
    assert by_arch["sm_80"] == by_arch["sm_90a"]
    names = _demangle(sorted(by_arch["sm_80"]))
    for kernel in ("code_norms_kernel", "finalize_kernel", "backward_finalize_kernel",
                   "project_simt_kernel"):
        assert any(f"::{kernel}<" in n for n in names.values()), kernel
    for kernel in ("search_f64_kernel", "norms_f64_kernel", "finalize_f64_kernel"):
        assert any(f"::{kernel}(" in n for n in names.values()), kernel


def test_ptx_for_newer_gpus(extension_path):
    from simvq_kernels import sass

    out = subprocess.run([sass.tool("cuobjdump"), "-lptx", extension_path],
                         capture_output=True, text=True, check=True).stdout
    ptx = [line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line]
    assert ptx and all(p.endswith(".sm_80.ptx") for p in ptx), ptx
