"""Read machine code without a GPU: registers, spills, shared memory, tensor-core ops.

Uses the CUDA binary tools that Triton ships (``triton/backends/nvidia/bin``:
``cuobjdump``, ``nvdisasm``, ``ptxas``), or the CUDA toolkit's on PATH. Works on a
Triton cubin and on a compiled extension ``.so`` (a host object with an embedded
fatbinary, possibly several architectures):

- :func:`resource_usage` -- per (arch, kernel): registers, shared memory (static),
  local memory (> 0 means spills or a stack array), stack;
- :func:`tensor_core_ops` -- per (arch, kernel): the tensor-core instructions found in
  the SASS (``HGMMA`` = Hopper warpgroup MMA, ``HMMA`` = mma.sync / wmma; also the
  integer/fp64/fp8 variants). ``HFMA2.MMA`` is a plain half2 FMA issued on the MMA
  pipe, not a tensor-core op, and is not counted;
- :func:`ptxas_info` -- registers and spill bytes reported by ``ptxas -v`` for PTX.

No GPU, driver or CUDA runtime is needed. Nothing here is imported by the package at
import time.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

# Tensor-core SASS opcodes: the mnemonic up to the first '.', as it appears in cuobjdump.
TENSOR_CORE_OPCODES = ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA", "UTCHMMA",
                       "UTCQMMA", "UTCIMMA", "UTCMMA")


class ToolMissing(RuntimeError):
    """A CUDA binary tool (cuobjdump / ptxas) was not found."""


def tool(name: str) -> str:
    """Path of ``name``: Triton's bundled copy first, then the CUDA toolkit on PATH."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(f"{name} not found (it ships with triton under backends/nvidia/bin, "
                      f"and with the CUDA toolkit)")


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[:500]}")
    return proc.stdout


def _as_file(binary: bytes | str, suffix: str):
    """(path, cleanup) for a binary given as bytes or as a path."""
    if isinstance(binary, (bytes, bytearray)):
        fd, path = tempfile.mkstemp(suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        return path, lambda: os.unlink(path)
    return str(binary), lambda: None


@dataclass
class KernelResources:
    arch: str
    kernel: str
    registers: int = 0
    shared: int = 0  # static shared memory (bytes); Triton's dynamic part is separate
    local: int = 0  # local memory per thread (bytes): > 0 means spills or a stack array
    stack: int = 0
    tensor_core_ops: dict = field(default_factory=dict)  # opcode -> count


_ARCH_RE = re.compile(r"^\s*(?:arch = |code for )(sm_\w+)")
_FUNC_RES_RE = re.compile(r"^\s*Function (\S+):\s*$")
_FIELD_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_FUNC_SASS_RE = re.compile(r"^\s*Function : (\S+)")
_INSTR_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def resource_usage(binary: bytes | str) -> dict:
    """{(arch, kernel): KernelResources} from ``cuobjdump -res-usage`` (cubin or .so).
    An object without device code gives {}."""
    path, done = _as_file(binary, ".cubin")
    try:
        proc = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True,
                              text=True)
    finally:
        done()
    if proc.returncode != 0:
        if "does not contain device code" in proc.stderr + proc.stdout:
            return {}
        raise RuntimeError(f"cuobjdump -res-usage failed: {proc.stderr.strip()[:500]}")
    out: dict = {}
    arch, current = "unknown", None
    for line in proc.stdout.splitlines():
        m = _ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC_RES_RE.match(line)
        if m:
            current = KernelResources(arch, m.group(1))
            out[(arch, current.kernel)] = current
            continue
        if current is not None:
            fields = dict(_FIELD_RE.findall(line))
            if fields:
                current.registers = int(fields.get("REG", 0))
                current.shared = int(fields.get("SHARED", 0))
                current.local = int(fields.get("LOCAL", 0))
                current.stack = int(fields.get("STACK", 0))
                current = None
    return out


def tensor_core_ops(binary: bytes | str) -> dict:
    """{(arch, kernel): {opcode: count}} of tensor-core instructions in the SASS
    (``cuobjdump -sass``); kernels without any map to {}."""
    path, done = _as_file(binary, ".cubin")
    try:
        proc = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    finally:
        done()
    if proc.returncode != 0:
        if "does not contain device code" in proc.stderr + proc.stdout:
            return {}
        raise RuntimeError(f"cuobjdump -sass failed: {proc.stderr.strip()[:500]}")
    out: dict = {}
    arch, current = "unknown", None
    for line in proc.stdout.splitlines():
        m = _ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC_SASS_RE.match(line)
        if m:
            current = out.setdefault((arch, m.group(1)), {})
            continue
        if current is None:
            continue
        m = _INSTR_RE.search(line)
        if m and m.group(1) in TENSOR_CORE_OPCODES:
            current[m.group(1)] = current.get(m.group(1), 0) + 1
    return out


def inspect_binary(binary: bytes | str) -> list[KernelResources]:
    """Resources and tensor-core opcodes of every kernel in a cubin or .so."""
    res = resource_usage(binary)
    tc = tensor_core_ops(binary)
    # a lone cubin's -res-usage names no architecture; -sass does ("code for sm_90a")
    archs = {name: arch for arch, name in tc}
    for (arch, name), r in list(res.items()):
        if arch == "unknown" and name in archs:
            del res[(arch, name)]
            r.arch = archs[name]
            res[(r.arch, name)] = r
    for key, ops in tc.items():
        if key not in res:
            res[key] = KernelResources(*key)
        res[key].tensor_core_ops = ops
    return sorted(res.values(), key=lambda r: (r.arch, r.kernel))


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_info(ptx: str, arch: str) -> dict:
    """{"registers", "spill_stores", "spill_loads"} from ``ptxas -v`` on PTX text
    (``arch`` e.g. "sm_90a")."""
    fd, path = tempfile.mkstemp(suffix=".ptx")
    out_fd, out_path = tempfile.mkstemp(suffix=".cubin")
    os.close(out_fd)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool("ptxas"), f"-arch={arch}", "-v", path, "-o", out_path],
                              capture_output=True, text=True)
    finally:
        os.unlink(path)
        os.unlink(out_path)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:500]}")
    text = proc.stderr + proc.stdout
    regs = _PTXAS_RE.search(text)
    spill = _SPILL_RE.search(text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0}
