"""Build script for simvq-kernels.

Always builds the C++ extension ``simvq_kernels._C`` (CPU kernels + op schemas).
The CUDA sources under ``csrc/cuda/`` are added only when a CUDA toolkit and a CUDA
build of torch are both present; ``SIMVQ_BUILD_CUDA=1`` forces them on (and fails if
that is impossible), ``SIMVQ_BUILD_CUDA=0`` forces them off. ``SIMVQ_CUDA_ARCHS``
lists the target architectures (default "8.0+PTX;9.0a": machine code for sm_80 and
sm_90a, and sm_80 PTX, which newer GPUs can compile at load time; sm_90a PTX could not
serve them, being specific to sm_90a). ``SIMVQ_SKIP_EXTENSION=1``
installs the pure-Python package only (the reference backends still work).

What was decided (CUDA kernels built or not, and why) is written to
``simvq_kernels/_build_info.json`` for ``python -m simvq_kernels.info``.
"""
import glob
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[simvq-kernels setup] {msg}", file=sys.stderr)


def _resolve_cuda_home():
    """Find the CUDA toolkit folder whose lib/ or lib64/ holds libcudart.

    ``nvcc`` on PATH may be a wrapper script that execs the real one, in which case
    torch's own guess (the wrapper's parent folder) is wrong; follow the wrapper.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "r", errors="ignore") as f:
                head = f.read(4096)
            for m in re.finditer(r"(/\S+)/bin/nvcc\b", head):
                candidates.append(m.group(1))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in candidates:
        has_nvcc = os.path.exists(os.path.join(c, "bin", "nvcc"))
        has_rt = any(
            glob.glob(os.path.join(c, lib, "libcudart.so*")) for lib in ("lib", "lib64")
        )
        if has_nvcc and has_rt:
            return c
    return None


BUILD_INFO = {"cuda": False, "cuda_reason": None, "cuda_archs": None, "cuda_home": None}


def _write_build_info():
    path = os.path.join(ROOT, "simvq_kernels", "_build_info.json")
    try:
        import torch

        BUILD_INFO["torch"] = torch.__version__
        BUILD_INFO["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        with open(path, "w") as f:
            json.dump(BUILD_INFO, f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError as e:  # a read-only source tree: the build itself still works
        _log(f"could not write {path}: {e}")


def _want_cuda(cuda_sources):
    flag = os.environ.get("SIMVQ_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "off", "no"):
        _log("CUDA sources: off (SIMVQ_BUILD_CUDA=0)")
        BUILD_INFO["cuda_reason"] = "built with SIMVQ_BUILD_CUDA=0"
        return False, None
    forced = flag in ("1", "true", "on", "yes")
    reasons = []
    if not cuda_sources:
        reasons.append("no CUDA sources under csrc/cuda/")
    import torch

    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = _resolve_cuda_home()
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)")
    if reasons:
        if forced:
            raise RuntimeError("SIMVQ_BUILD_CUDA=1 but " + "; ".join(reasons))
        _log("CUDA sources: skipped (" + "; ".join(reasons) + ")")
        BUILD_INFO["cuda_reason"] = "; ".join(reasons)
        return False, None
    return True, cuda_home


def _extensions():
    if os.environ.get("SIMVQ_SKIP_EXTENSION", "0") == "1":
        _log("SIMVQ_SKIP_EXTENSION=1: building no extension")
        BUILD_INFO["cuda_reason"] = "built with SIMVQ_SKIP_EXTENSION=1 (no extension)"
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda, cuda_home = _want_cuda(cuda_sources)
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/simvq.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]
    if use_cuda:
        archs = os.environ.get("SIMVQ_CUDA_ARCHS", "8.0+PTX;9.0a")
        gencode = []
        for a in filter(None, (s.strip() for s in archs.split(";"))):
            ptx = a.endswith("+PTX")
            a = a.replace("+PTX", "")
            num = a.replace(".", "")
            gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
            if ptx:
                gencode.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        # the ATen side of the CUDA ops is plain C++ (csrc/cuda/*.cpp): the .cu files
        # include no torch headers, so nvcc stays quick
        cuda_sources = cuda_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        _log(f"CUDA sources: building {cuda_sources} with CUDA_HOME={cuda_home} for {archs}")
        BUILD_INFO.update(cuda=True, cuda_archs=archs, cuda_home=cuda_home)
        ext = CUDAExtension(
            "simvq_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSIMVQ_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DSIMVQ_WITH_CUDA"] + gencode},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("simvq_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
_write_build_info()

setup(
    packages=find_packages(include=["simvq_kernels", "simvq_kernels.*"]),
    package_data={"simvq_kernels": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
