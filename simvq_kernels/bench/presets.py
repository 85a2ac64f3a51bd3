"""Presets: the named sets of cases (shape x op, optionally restricted to some providers)
that one run of the bench measures. A new preset is one entry of ``PRESETS``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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


# 'fwd': the search given the projected codebook; 'layer': a SimVQ layer's forward and
# backward (a training step without the optimizer); 'layer_cf': the same with
# channel_first=True on the same tokens laid out as (N/256, d, 16, 16) images; 'eval':
# the layer's forward in eval mode under no_grad; 'encode': ``layer.encode(z)`` (indices
# only, cached codebook).
OPS = {"fwd": "fwd", "layer": "layer fwd+bwd", "layer_cf": "layer fwd+bwd channel-first",
       "eval": "eval fwd", "encode": "encode"}

# Precision modes: (dtype, float32 matmul precision). 'fp32' is exact fp32 products
# (the default everywhere); 'tf32' float32 inputs with tensor-core tf32 products (CUDA);
# 'bf16' / 'fp16' inputs of that dtype for the search, autocast for layer rows.
MODES = {"fp32": ("float32", "highest"), "tf32": ("float32", "high"),
         "bf16": ("bfloat16", "highest"), "fp16": ("float16", "highest")}


def op_label(op: str, mode: str = "fp32") -> str:
    """'fwd', or 'fwd bf16' for a mode other than the default fp32."""
    return OPS[op] + ("" if mode == "fp32" else f" {mode}")


@dataclass(frozen=True)
class Case:
    """One shape and op; ``providers`` restricts which providers run it (None = all);
    ``mode`` is a key of MODES; ``memory_check`` marks the case whose peak memory is a
    target."""

    shape: Shape
    op: str  # a key of OPS
    providers: Optional[tuple] = None
    note: str = ""
    mode: str = "fp32"
    memory_check: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cases: tuple
    hidden: bool = False
    # CLI defaults this preset needs (e.g. no waiting for a quiet CPU on a GPU run)
    defaults: tuple = ()
    device: Optional[str] = None  # the device type it is meant for (None: any)
    # the GPU acceptance's accuracy sweep (gpu.py), run before the timed cases
    sweep: Optional[object] = None
    # the hidden tiny preset that ``--dry-run`` runs instead (same logic, CPU-sized)
    dry_run: Optional[str] = None

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


# The training step's target shapes (layer fwd+bwd <= 1.2x the bare search, channel-last
# and channel-first): the fused CPU backend, and the reference so that 'x ref' exists.
TRAINING_SHAPES = (Shape(16384, 1024, 64), Shape(16384, 8192, 64))
TRAINING_PROVIDERS = ("reference", "cpu")


def _channel_first(shapes):
    return tuple(Case(s, "layer_cf", providers=TRAINING_PROVIDERS) for s in shapes)


FUSED_BACKENDS = ("cpu", "cuda", "triton")
MEMORY_SHAPE = Shape(16384, 262144, 32)
MEMORY_TARGET_MIB = 256
_MEMORY_CASE = Case(MEMORY_SHAPE, "fwd",
                    providers=("reference", "cdist", "vq-pytorch", "chunked", "cpu", "cuda",
                               "faiss"), memory_check=True)
# Serving: a request of a few hundred tokens against a large codebook. The bare search
# over a precomputed codebook, the eval-mode forward (projects the codebook every call)
# and layer.encode (cached codebook) on the same inputs, side by side.
SERVE_SHAPE = Shape(256, 65536, 128)
SERVE_PROVIDERS = ("reference", "chunked", "cpu", "cuda", "triton")

PRESETS = {p.name: p for p in (
    Preset("tiny", "seconds; for the smoke test",
           _fwd_and_layer([Shape(512, 256, 16)]) + _channel_first([Shape(512, 256, 16)]),
           hidden=True),
    Preset("quick", "default; about a minute on 2 CPU cores",
           _fwd_and_layer([Shape(16384, 1024, 64), Shape(16384, 8192, 64)],
                          [Shape(16384, 1024, 64)])
           + (Case(Shape(16384, 8192, 64), "layer", providers=TRAINING_PROVIDERS),)
           + _channel_first(TRAINING_SHAPES)),
    Preset("core", "four timing shapes (d = 64, 32, 256), layer rows, and the "
           "16384x262144x32 memory check",
           _fwd_and_layer([Shape(16384, 1024, 64), Shape(16384, 8192, 64),
                           Shape(8192, 65536, 32), Shape(4096, 16384, 256)])
           + _channel_first(TRAINING_SHAPES) + (_MEMORY_CASE,)),
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
           "(--memory-check)",
           (Case(MEMORY_SHAPE, "fwd", providers=FUSED_BACKENDS, memory_check=True),)),
    Preset("serve", "serving: layer.encode vs the eval-mode forward vs the bare search, "
           "256 tokens x 65536 codes x d=128",
           tuple(Case(SERVE_SHAPE, op, providers=SERVE_PROVIDERS)
                 for op in ("fwd", "eval", "encode"))),
)}
