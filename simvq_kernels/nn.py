"""The SimVQ layer: shapes, loss, straight-through estimator, state-dict import."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference

# Keys of foreign layouts that load into SimVQ (see design notes §2).
_OFFICIAL_KEYS = {"embedding.weight": "basis", "embedding_proj.weight": "weight",
                  "embedding_proj.bias": "bias"}
_VQ_PYTORCH_KEYS = {"frozen_codebook": "basis", "code_transform.weight": "weight",
                    "code_transform.bias": "bias"}


class SimVQ(nn.Module):
    """SimVQ vector quantiser (arXiv 2411.02038) with a fused search and backward.

    The codebook is implicit: Q = basis @ weight.T + bias, with ``basis`` (K, r) a frozen
    random buffer drawn from N(0, r^-1/2) and ``weight`` (d, r), ``bias`` (d,) trained
    (initialised like ``nn.Linear(r, d)``, as in the official code).

    Args:
        dim: token width d.
        codebook_size: K.
        basis_dim: r (default d, as in the official code).
        bias: learn a bias in the projection (the official layer has one).
        beta: commitment weight (0.25).
        legacy: swap the two loss weights as taming-transformers' legacy loss does
            (the official SimVQ configs use legacy=False).
        channel_first: inputs are (B, dim, *spatial) instead of (..., dim).
        backend: "auto" or a name from :func:`simvq_kernels.available_backends`.

    Forward: ``out, indices, loss = layer(z)``, where ``out`` has z's shape and dtype
    (straight-through: out = z + sg(zq - z)), ``indices`` is int64 with z's shape minus
    the channel dim, and ``loss = beta * mean((sg(zq) - z)^2) + mean((zq - sg(z))^2)``.
    ``layer.last_backend`` names the backend that served the last forward.
    """

    def __init__(self, dim: int, codebook_size: int, basis_dim: int | None = None,
                 bias: bool = True, beta: float = 0.25, legacy: bool = False,
                 channel_first: bool = False, backend: str = "auto"):
        super().__init__()
        for name, v in (("dim", dim), ("codebook_size", codebook_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if basis_dim is not None and (not isinstance(basis_dim, int) or basis_dim < 1):
            raise ValueError(f"`basis_dim` must be a positive int or None, got {basis_dim!r}")
        if not isinstance(backend, str):
            raise TypeError(f"`backend` must be a string, got {type(backend).__name__}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.basis_dim = basis_dim or dim
        self.beta = float(beta)
        self.legacy = bool(legacy)
        self.channel_first = bool(channel_first)
        self.backend = backend
        self.last_backend: str | None = None
        r = self.basis_dim
        self.register_buffer("basis", torch.randn(codebook_size, r) * r**-0.5)
        self.weight = nn.Parameter(torch.empty(dim, r))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialisation (the official projection is an nn.Linear)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.basis_dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"basis_dim={self.basis_dim}, bias={self.bias is not None}, beta={self.beta}, "
                f"legacy={self.legacy}, channel_first={self.channel_first}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------ codebook
    @property
    def codebook(self) -> torch.Tensor:
        """The projected codebook Q = basis @ weight.T + bias, (K, dim)."""
        return reference.project_codebook(self.basis, self.weight, self.bias)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode indices to codes *with* the projection applied (the official
        ``get_codebook_entry`` returns unprojected basis rows).

        indices (...) int -> codes (..., dim), or (B, dim, ...) if channel_first.
        Only the picked basis rows are projected; no K x dim codebook is built.
        """
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or \
                indices.is_complex():
            raise TypeError("`indices` must be an integer tensor")
        if indices.numel() and (int(indices.min()) < 0 or
                                int(indices.max()) >= self.codebook_size):
            raise ValueError(f"`indices` must lie in [0, {self.codebook_size})")
        rows = self.basis.index_select(0, indices.reshape(-1).long().to(self.basis.device))
        codes = F.linear(rows, self.weight, self.bias).reshape(*indices.shape, self.dim)
        if self.channel_first:
            if indices.dim() < 1:
                raise ValueError("channel_first decoding needs indices of shape (B, ...)")
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------- forward
    def _channel_last(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"`z` must be a torch.Tensor, got {type(z).__name__}")
        if self.channel_first:
            if z.dim() < 2:
                raise ValueError("channel_first=True expects `z` of shape (B, dim, ...), got "
                                 f"shape {tuple(z.shape)}")
            if z.shape[1] != self.dim:
                raise ValueError(f"channel_first=True expects `z` of shape (B, {self.dim}, ...)"
                                 f" (channels at dim 1), got shape {tuple(z.shape)}")
            return z.movedim(1, -1)
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"`z` must have shape (..., {self.dim}) (channels last; pass "
                             f"channel_first=True for (B, {self.dim}, ...)), got shape "
                             f"{tuple(z.shape)}")
        return z

    def forward(self, z: torch.Tensor):
        x = self._channel_last(z)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        q = ops.quantize(flat, self.basis, self.weight, self.bias, backend=self.backend)
        self.last_backend = q.backend
        zq = q.zq
        if flat.shape[0] == 0:
            loss = (flat.sum() + zq.sum()) * 0.0
        else:
            loss = reference.simvq_loss(flat, zq, self.beta, self.legacy)
        out = reference.straight_through(flat, zq).reshape(*lead, self.dim)
        indices = q.indices.reshape(lead)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return out, indices, loss

    # ------------------------------------------------------- foreign state dicts
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Accepts the official SimVQ layout (embedding.weight, embedding_proj.weight,
        embedding_proj.bias) and vector-quantize-pytorch's (frozen_codebook,
        code_transform.weight[, code_transform.bias]) besides our own."""
        for mapping in (_OFFICIAL_KEYS, _VQ_PYTORCH_KEYS):
            if any(prefix + k in state_dict for k in mapping):
                for src, dst in mapping.items():
                    if prefix + src in state_dict:
                        state_dict[prefix + dst] = state_dict.pop(prefix + src)
                if self.bias is not None and prefix + "bias" not in state_dict:
                    # a bias-free layout (vector-quantize-pytorch's default) is exactly
                    # a zero bias
                    w = state_dict.get(prefix + "weight")
                    state_dict[prefix + "bias"] = torch.zeros(
                        self.dim, dtype=w.dtype if w is not None else self.weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
