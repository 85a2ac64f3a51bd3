"""What the Triton kernels share: how a kernel is built and launched, and the knobs.

Every kernel is a plain Python function turned into two objects by :func:`kernel`:
a compiled ``JITFunction`` (CUDA tensors) and an ``InterpretedFunction`` (CPU tensors,
run by Triton's interpreter). ``@triton.jit`` would pick one of the two when the module
is imported, from ``TRITON_INTERPRET``; building both keeps CUDA and CPU tensors served
in one process whatever the import order, and lets ``simvq_kernels.triton.aot`` compile
every configuration for a GPU even in a process that interprets. CPU tensors are still
served only when ``TRITON_INTERPRET=1`` is set when the call is made (the backend's
device rule).

Kernels read no plain module globals (the compiler rejects them; the interpreter does
not notice): every constant is a literal or a ``tl.constexpr`` argument.

No autotuning: a launcher picks its tile configuration from the shape class by a fixed
rule (see each launcher's ``*_config``), so nothing is timed while torch.compile traces
or while a CUDA graph is captured, and ``aot.py`` can compile every configuration a
launcher can choose.

Environment variable (read on every call, and at trace time under torch.compile):

- ``SIMVQ_TRITON_SPLIT_K``: ``auto`` (default) lets the search split the codebook
  across programs when there are too few token tiles to fill the GPU; an integer
  ``s >= 1`` forces ``s`` splits (clamped to the number of code tiles; ``1`` = off).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

SPLIT_K_ENV = "SIMVQ_TRITON_SPLIT_K"


class TritonKernel:
    """One kernel source, compiled for CUDA tensors or interpreted for CPU tensors."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.jit = JITFunction(fn)
        self._interp = None

    @property
    def interpreted(self):
        if self._interp is None:
            self._interp = InterpretedFunction(self.fn)
        return self._interp

    def for_device(self, device: torch.device):
        return self.interpreted if device.type == "cpu" else self.jit


def kernel(fn) -> TritonKernel:
    return TritonKernel(fn)


_STDLIB_INTERPRETED: dict = {}


@contextlib.contextmanager
def _interpreted_stdlib():
    """Triton's standard library (``tl.sum``, ``tl.min``, ...) is itself ``@triton.jit``
    code, built compiled or interpreted when triton is imported. When triton was
    imported without TRITON_INTERPRET=1, an interpreted kernel cannot call those
    compiled functions; swap in interpreted twins for the duration of the launch."""
    import triton.language as tl
    from triton.language import standard
    try:  # imported lazily by a launch and reads the standard library: load it unswapped
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass

    swaps = []
    for name, obj in vars(standard).items():
        if isinstance(obj, JITFunction):
            twin = _STDLIB_INTERPRETED.get(name)
            if twin is None:
                twin = _STDLIB_INTERPRETED[name] = InterpretedFunction(obj.fn)
            swaps.append((standard, name, obj, twin))
            if getattr(tl, name, None) is obj:
                swaps.append((tl, name, obj, twin))
    for mod, name, _, twin in swaps:
        setattr(mod, name, twin)
    try:
        yield
    finally:
        for mod, name, obj, _ in swaps:
            setattr(mod, name, obj)


def launch(k: TritonKernel, grid, *args, device: torch.device, **kwargs):
    """Launch ``k`` on ``grid``. CUDA: through ``torch.library.wrap_triton`` so that a
    ``triton_op`` traced by torch.compile shows Inductor the kernel (outside tracing it
    is the plain launch). CPU: the interpreter (eager only; the CPU ops are opaque)."""
    if device.type == "cpu":
        with _interpreted_stdlib():
            k.interpreted[grid](*args, **kwargs)
        return
    if (device.index is not None and torch.cuda.is_available()
            and device.index != torch.cuda.current_device()):
        with torch.cuda.device(device.index):  # Triton launches on the current device
            torch.library.wrap_triton(k.jit)[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(k.jit)[grid](*args, **kwargs)


@dataclass(frozen=True)
class Config:
    """A tile configuration: constexpr block sizes plus launch options."""
    blocks: tuple  # ((name, value), ...) constexpr block sizes
    num_warps: int = 4
    num_stages: int = 3

    def constexprs(self) -> dict:
        return dict(self.blocks)

    def launch_options(self, device) -> dict:
        if device.type == "cpu":
            return {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def label(self) -> str:
        """e.g. "128x64x16 whole-d w4 s3": the block sizes in argument order (for the
        search BLOCK_N x BLOCK_K x BLOCK_D), warps and pipeline stages."""
        sizes = "x".join(str(v) for _, v in self.blocks if not isinstance(v, bool))
        flags = [("whole-d" if v else "d-loop") if name == "SINGLE_D" else
                 (name.lower() if v else "") for name, v in self.blocks if isinstance(v, bool)]
        return " ".join([sizes, *[f for f in flags if f], f"w{self.num_warps}",
                         f"s{self.num_stages}"])


def cfg(num_warps=4, num_stages=3, **blocks) -> Config:
    return Config(tuple(blocks.items()), num_warps, num_stages)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a couple of programs is enough to exercise splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:  # queried once per device, never during graph capture
    return torch.cuda.get_device_properties(index).multi_processor_count


def forced_splits() -> int | None:
    """The ``SIMVQ_TRITON_SPLIT_K`` override: None (auto) or a forced split count >= 1."""
    raw = os.environ.get(SPLIT_K_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        s = int(raw)
    except ValueError:
        s = 0
    if s < 1:
        raise ValueError(f"{SPLIT_K_ENV} must be 'auto' or an integer >= 1, got {raw!r}")
    return s


def fp32_input_precision() -> str:
    """tl.dot's input precision for float32 inputs, from torch's matmul precision:
    "highest" -> exact fp32 products ("ieee"), "high"/"medium" -> "tf32"."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for a search on ``dtype`` inputs (bf16/fp16 products are
    exact in fp32 accumulation whatever the mode)."""
    if dtype == torch.float32:
        return fp32_input_precision()
    if dtype in (torch.bfloat16, torch.float16):
        return "ieee"
    raise TypeError(f"the triton kernels serve float32, bfloat16 and float16, not {dtype}")


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))
