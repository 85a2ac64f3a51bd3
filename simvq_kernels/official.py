"""Drop-in targets for the official SimVQ training code (youngsheen/SimVQ).

The official code builds its quantiser from a taming-style config and unpacks
``(z_q, emb_loss, indices), loss_breakdown = quantize(h)``. These classes take the same
constructor arguments, return the same values in the same layouts and save the same
state-dict keys, with the fused search (no tokens x codes distance matrix) behind them,
so switching is a one-line change of the config's ``target:``::

    quantconfig:
      target: simvq_kernels.official.SimVQ      # was taming.modules.vqvae.quantize.SimVQ
      params: {n_e: 65536, e_dim: 128, beta: 0.25, legacy: false}

    # audio: simvq_kernels.official.SimVQ1D      (was taming.modules.vqvae.quantize.SimVQ1D)

Checkpoints written by the official layer load unchanged (``embedding.weight``,
``embedding_proj.weight``, ``embedding_proj.bias`` and ``used`` with ``remap``), and
these classes write the same keys. What differs, on purpose:

- ``get_codebook_entry(indices, shape)`` applies the projection: it returns the codes
  ``forward`` used. The official one returns the unprojected basis rows
  (``embedding(indices)``), which are not the codes the decoder was trained on.
- ``emb_loss`` and the unused fields of the loss breakdown are zeros on the input's
  device (the official ones are CPU tensors).
- ``SimVQ1D`` with ``sane_index_shape=True`` returns indices of shape (B, T) (the
  official one fails there, reshaping to a fourth dimension that does not exist).
- The commitment loss of bf16/fp16 inputs is computed in fp32.

Both classes are :class:`simvq_kernels.SimVQ` layers (channel-first, with a bias), so
``encode``/``decode``, ``codebook``, ``backend=`` (keyword-only here) and the rest work
as documented there.
"""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch

from . import nn as _nn

__all__ = ["LossBreakdown", "SimVQ", "SimVQ1D"]

LossBreakdown = namedtuple("LossBreakdown",
                           ["per_sample_entropy", "codebook_entropy", "commitment",
                            "avg_probs"])

# our parameter/buffer names -> the official ones (state-dict keys)
_OURS_TO_OFFICIAL = {"basis": "embedding.weight", "weight": "embedding_proj.weight",
                     "bias": "embedding_proj.bias"}
_OFFICIAL_ORDER = ("used", "embedding.weight", "embedding_proj.weight",
                   "embedding_proj.bias")


class SimVQ(_nn.SimVQ):
    """The official image quantiser's interface: z (B, e_dim, H, W) ->
    ``(z_q, emb_loss, indices), LossBreakdown(0, 0, commitment_loss, 0)``.

    Args (as in the official class):
        n_e: codebook size K.
        e_dim: code width (the basis and the projection are e_dim x e_dim).
        beta: commitment weight (0.25).
        remap: path of a ``.npy`` file with the code indices in use; indices are then
            reported as positions in that list (codes outside it: ``unknown_index``).
        unknown_index: "random" (a random position), "extra" (one extra position after
            the list) or an int.
        sane_index_shape: indices (B, H, W) instead of flat (B*H*W,) ((B*H*W, 1) with
            ``remap``).
        legacy: swap the two loss weights (default True, as in the official class; the
            official SimVQ configs pass ``legacy: false``).
        backend, track_usage: keyword-only, as in :class:`simvq_kernels.SimVQ`.

    ``forward(z, temp=None, rescale_logits=False, return_logits=False)``: the three
    extra arguments exist for interface compatibility only (as in the official code).
    """

    _spatial_dims = 2

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, unknown_index="random",
                 sane_index_shape=False, legacy=True, *, backend: str = "auto",
                 track_usage: bool = False):
        super().__init__(e_dim, n_e, None, True, beta, legacy, channel_first=True,
                         backend=backend, track_usage=track_usage)
        self.n_e = n_e
        self.e_dim = e_dim
        self.remap = remap
        self.sane_index_shape = bool(sane_index_shape)
        self.unknown_index = unknown_index
        if remap is not None:
            import numpy as np

            used = torch.as_tensor(np.load(remap))
            if used.dim() != 1 or used.is_floating_point():
                raise ValueError(f"`remap` must name a 1-D integer array, got "
                                 f"{used.dtype} of shape {tuple(used.shape)}")
            self.register_buffer("used", used)
            self.re_embed = used.shape[0]
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and (not isinstance(unknown_index, int) or
                                                isinstance(unknown_index, bool)):
                raise ValueError("`unknown_index` must be 'random', 'extra' or an int, got "
                                 f"{unknown_index!r}")
        else:
            self.re_embed = n_e

    # ---------------------------------------------------- the official attributes
    @property
    def embedding(self):
        """The official ``embedding`` (its ``.weight`` is the frozen basis)."""
        return _nn._TensorView(self.basis)

    @property
    def embedding_proj(self):
        """The official ``embedding_proj``: (``weight``, ``bias``) as an ``nn.Linear``."""
        return _nn._LinearView(self.weight, self.bias)

    # -------------------------------------------------------------- remapping
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Code indices (B, ...) -> positions in ``used`` (the first match); codes not
        in it get ``unknown_index`` (or a random position)."""
        used = self.used.to(inds.device, torch.long)
        n = max(self.n_e, int(used.max()) + 1 if used.numel() else 0)
        table = torch.full((n,), used.shape[0], dtype=torch.long, device=inds.device)
        table.scatter_reduce_(0, used.clamp_min(0),
                              torch.arange(used.shape[0], device=inds.device),
                              reduce="amin", include_self=True)
        out = table[inds.long()]
        unknown = out == used.shape[0]
        if self.unknown_index == "random":
            rand = torch.randint(0, self.re_embed, out.shape, device=out.device)
            out = torch.where(unknown, rand, out)
        else:
            out = torch.where(unknown, out.new_full((), int(self.unknown_index)), out)
        return out

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` -> code indices; the extra position maps to code
        ``used[0]`` (as the official code does)."""
        used = self.used.to(inds.device, torch.long)
        inds = torch.where(inds >= used.shape[0], inds.new_zeros(()), inds)
        return used[inds.long()]

    # --------------------------------------------------------------- forward
    def _check_layout(self, z):
        want = 2 + self._spatial_dims
        if not isinstance(z, torch.Tensor) or z.dim() != want:
            layout = "(B, e_dim, H, W)" if self._spatial_dims == 2 else "(B, e_dim, T)"
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"`z` must have shape {layout}, got {got}")

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        if temp is not None and temp != 1.0:
            raise ValueError("`temp` exists for interface compatibility only (None or 1.0)")
        if rescale_logits:
            raise ValueError("`rescale_logits` exists for interface compatibility only")
        if return_logits:
            raise ValueError("`return_logits` exists for interface compatibility only")
        self._check_layout(z)
        z_q, idx, loss = super().forward(z)
        b = z.shape[0]
        indices = idx.reshape(-1)
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(idx.shape)
        zero = torch.zeros((), device=z.device)
        return (z_q, zero, indices), LossBreakdown(zero, zero, loss, zero)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes of ``indices`` *with the projection applied* (what ``forward``
        returned as z_q, and what the decoder was trained on). The official method
        returns unprojected basis rows instead.

        ``shape``: (B, H, W, e_dim) -> codes (B, e_dim, H, W) (for ``SimVQ1D``:
        (B, T, e_dim) -> (B, e_dim, T)); None -> flat (N, e_dim). With ``remap``,
        ``indices`` are positions in ``used`` (and ``shape`` is needed).
        """
        if self.remap is not None:
            if shape is None:
                raise ValueError("with `remap`, `shape` is needed to undo the remapping")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1))
        flat = indices.reshape(-1)
        self._check_indices(flat)
        pad = flat < 0
        codes = self._decode_rows(flat.clamp_min(0))
        codes = torch.where(pad[:, None], codes.new_zeros(()), codes)
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != 2 + self._spatial_dims or shape[-1] != self.e_dim:
                want = "(B, H, W, e_dim)" if self._spatial_dims == 2 else "(B, T, e_dim)"
                raise ValueError(f"`shape` must be {want} with e_dim={self.e_dim}, got "
                                 f"{shape}")
            codes = codes.view(shape).movedim(-1, 1).contiguous()
        return codes

    # ------------------------------------------------------------ state dicts
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        ours = OrderedDict()
        super()._save_to_state_dict(ours, prefix, keep_vars)
        renamed = {}
        for k, v in ours.items():
            name = k[len(prefix):]
            renamed[_OURS_TO_OFFICIAL.get(name, name)] = v
        for name in _OFFICIAL_ORDER:
            if name in renamed:
                destination[prefix + name] = renamed.pop(name)
        for name, v in renamed.items():
            destination[prefix + name] = v


class SimVQ1D(SimVQ):
    """The official audio quantiser's interface: z (B, e_dim, T) -> ``(z_q, emb_loss,
    indices), LossBreakdown(0, 0, commitment_loss, 0)``; indices (B*T,) or, with
    ``sane_index_shape``, (B, T). Otherwise as :class:`SimVQ`."""

    _spatial_dims = 1
