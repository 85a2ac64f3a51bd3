"""Inputs: the same seeded tensors for every provider of a case."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .presets import MODES, Shape

# The commitment weight of every layer row (the official SimVQ default).
BETA = 0.25


@dataclass
class Inputs:
    """The same inputs for every provider: z, the SimVQ parameters, Q and an upstream g."""

    shape: Shape
    z: torch.Tensor  # (N, d)
    basis: torch.Tensor  # (K, r)
    weight: torch.Tensor  # (d, r)
    bias: torch.Tensor  # (d,)
    codebook: torch.Tensor  # (K, d) = basis @ weight.T + bias, fp32 (the search's dtype)
    g_out: torch.Tensor  # (N, d) upstream gradient of the layer output
    mode: str = "fp32"  # a key of presets.MODES
    # layer rows in bf16/fp16 run under torch.autocast with this dtype (fp32 parameters)
    autocast: Optional[torch.dtype] = None


def make_inputs(shape: Shape, device="cpu", seed: int = 0, mode: str = "fp32") -> Inputs:
    """Deterministic inputs for ``shape``: the official initialisation (basis N(0, 1/r),
    weight/bias like nn.Linear(r, d)) and tokens drawn at the codebook's scale so that
    they fall among the codes, not far outside them.

    Drawn on the CPU (the same values on every machine), except on CUDA, where they are
    drawn on the device (seeded, so deterministic per device; GPU shapes are too large to
    draw on a few cores). For ``mode`` 'bf16'/'fp16' the search's inputs (z and the
    codebook) are stored in that dtype, and the checks read those stored values; the
    layer's parameters stay fp32 and layer rows run under autocast."""
    n, k, d, r = shape.n, shape.k, shape.d, shape.basis_dim
    dev = torch.device(device)
    gen_dev = dev if dev.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_dev).manual_seed(
        seed * 1_000_003 + n * 7919 + k * 31 + d)
    kw = {"generator": g, "device": gen_dev}
    basis = torch.randn(k, r, **kw) * r**-0.5
    bound = 1 / math.sqrt(r)
    weight = (torch.rand(d, r, **kw) * 2 - 1) * bound
    bias = (torch.rand(d, **kw) * 2 - 1) * bound
    codebook = torch.addmm(bias, basis, weight.t())
    scale = float(codebook.std())
    z = torch.randn(n, d, **kw) * scale + codebook.mean(0)
    g_out = torch.randn(n, d, **kw) / (n * d) ** 0.5
    dtype = getattr(torch, MODES[mode][0])
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    return Inputs(shape, z.to(dev, dtype), basis.to(dev), weight.to(dev), bias.to(dev),
                  codebook.to(dev, dtype), g_out.to(dev), mode, low)
