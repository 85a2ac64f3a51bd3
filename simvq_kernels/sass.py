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

Each kernel's row also counts its shared-memory instructions (``LDSM`` = ldmatrix,
``LDS``/``STS`` = loads/stores, ``LDGSTS`` = cp.async), statically in the SASS.

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
# Shared-memory opcodes counted per kernel (static instruction counts in the SASS).
SHARED_MEMORY_OPCODES = ("LDSM", "LDS", "STS", "LDGSTS")


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
    shared_memory_ops: dict = field(default_factory=dict)  # opcode -> count


_ARCH_RE = re.compile(r"^\s*(?:arch = |code for )(sm_\w+)")
_FUNC_RES_RE = re.compile(r"^\s*Function (\S+):\s*$")
_FIELD_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_FUNC_SASS_RE = re.compile(r"^\s*Function : (\S+)")
_INSTR_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def _cuobjdump(binary: bytes | str, *flags: str) -> str | None:
    """cuobjdump's output, or None for an object without device code."""
    path, done = _as_file(binary, ".cubin")
    try:
        proc = subprocess.run([tool("cuobjdump"), *flags, path], capture_output=True, text=True)
    finally:
        done()
    if proc.returncode != 0:
        if "does not contain device code" in proc.stderr + proc.stdout:
            return None
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed: {proc.stderr.strip()[:500]}")
    if "does not contain device code" in proc.stderr:
        return None
    return proc.stdout


def _parse(text: str) -> dict:
    """{(arch, kernel): KernelResources} from ``cuobjdump -res-usage -sass`` output."""
    out: dict = {}
    arch = "unknown"
    res_current, sass_current = None, None
    for line in text.splitlines():
        m = _ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC_SASS_RE.match(line)
        if m:
            key = (arch, m.group(1))
            sass_current = out.setdefault(key, KernelResources(*key))
            res_current = None
            continue
        m = _FUNC_RES_RE.match(line)
        if m:
            key = (arch, m.group(1))
            res_current = out.setdefault(key, KernelResources(*key))
            sass_current = None
            continue
        if res_current is not None:
            fields = dict(_FIELD_RE.findall(line))
            if fields:
                res_current.registers = int(fields.get("REG", 0))
                res_current.shared = int(fields.get("SHARED", 0))
                res_current.local = int(fields.get("LOCAL", 0))
                res_current.stack = int(fields.get("STACK", 0))
                res_current = None
            continue
        if sass_current is not None:
            m = _INSTR_RE.search(line)
            if m and m.group(1) in TENSOR_CORE_OPCODES:
                ops = sass_current.tensor_core_ops
                ops[m.group(1)] = ops.get(m.group(1), 0) + 1
            elif m and m.group(1) in SHARED_MEMORY_OPCODES:
                ops = sass_current.shared_memory_ops
                ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    # a lone cubin's resource section comes before its "code for sm_XX" line: merge the
    # 'unknown' entries into the kernel of the same name with a known architecture
    for (a, name), r in list(out.items()):
        if a != "unknown":
            continue
        known = [k for k in out if k[1] == name and k[0] != "unknown"]
        if len(known) == 1:
            k = out[known[0]]
            k.registers, k.shared, k.local, k.stack = r.registers, r.shared, r.local, r.stack
            del out[(a, name)]
    return out


def resource_usage(binary: bytes | str) -> dict:
    """{(arch, kernel): KernelResources} (registers, shared, local, stack) from
    ``cuobjdump -res-usage``; {} for an object without device code."""
    text = _cuobjdump(binary, "-res-usage", "-sass")
    return {} if text is None else _parse(text)


def tensor_core_ops(binary: bytes | str) -> dict:
    """{(arch, kernel): {opcode: count}} of tensor-core instructions in the SASS."""
    return {k: r.tensor_core_ops for k, r in resource_usage(binary).items()}


def inspect_binary(binary: bytes | str) -> list[KernelResources]:
    """Resources and tensor-core opcodes of every kernel in a cubin or .so (one
    cuobjdump run)."""
    return sorted(resource_usage(binary).values(), key=lambda r: (r.arch, r.kernel))


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
