"""Inputs: the same seeded tensors for every provider of a case."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .presets import Shape

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
    codebook: torch.Tensor  # (K, d) = basis @ weight.T + bias, fp32
    g_out: torch.Tensor  # (N, d) upstream gradient of the layer output


def make_inputs(shape: Shape, device="cpu", seed: int = 0) -> Inputs:
    """Deterministic inputs for ``shape``: the official initialisation (basis N(0, 1/r),
    weight/bias like nn.Linear(r, d)) and tokens drawn at the codebook's scale so that
    they fall among the codes, not far outside them."""
    n, k, d, r = shape.n, shape.k, shape.d, shape.basis_dim
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + k * 31 + d)
    basis = torch.randn(k, r, generator=g) * r**-0.5
    bound = 1 / math.sqrt(r)
    weight = (torch.rand(d, r, generator=g) * 2 - 1) * bound
    bias = (torch.rand(d, generator=g) * 2 - 1) * bound
    codebook = torch.addmm(bias, basis, weight.t())
    scale = float(codebook.std())
    z = torch.randn(n, d, generator=g) * scale + codebook.mean(0)
    g_out = torch.randn(n, d, generator=g) / (n * d) ** 0.5
    dev = torch.device(device)
    return Inputs(shape, z.to(dev), basis.to(dev), weight.to(dev), bias.to(dev),
                  codebook.to(dev), g_out.to(dev))
