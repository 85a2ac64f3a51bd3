"""The SimVQ layers: shapes, loss, gradient estimators, masks, state-dict import/export.

``SimVQ`` is one quantiser; ``ResidualSimVQ`` stacks several, each quantising what the
previous ones left. The sharded variant for codebooks too large for one device is
``simvq_kernels.distributed.ShardedSimVQ`` (a subclass of ``SimVQ``).

Mixed precision (``torch.autocast``). A custom op is not autocast-aware, so the layer
picks the compute dtype itself: when autocast is enabled for the input's device type
(and the input is not float64), the search -- the N x K x d product, the only expensive
part -- runs on ``z``, ``basis``, ``weight`` and ``bias`` cast to
``torch.get_autocast_dtype(device_type)`` (bf16 or fp16), with products and distance
sums accumulated in fp32 by every backend. The picked codes are then projected from the
stored (master) parameters, ``zq = basis[idx] @ weight.T + bias``, in the parameters'
dtype with autocast off (a gather-GEMM of N x r x d, the size of an encoder's last
layer), and the loss is computed in fp32. So ``zq``, the loss and the gradients of
``weight`` and ``bias`` keep fp32 accuracy (no fp16 underflow of the 1/(N*d)-scaled loss
gradient), ``out`` comes back in ``z``'s dtype, ``distances`` in fp32. Without autocast,
every tensor of the call must share one dtype (pure bf16 layers and inputs work; the ops
accumulate in fp32 and the loss is computed in fp32).

torch.compile: the forward of ``SimVQ`` and ``ResidualSimVQ`` compiles with
``fullgraph=True`` (no graph break; see ``ops`` for how the backend choice and the
finite check are traced). The constructor loads the compiled extension, so that its ops
and their fake kernels exist before tracing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext, ops, reference

# Keys of foreign layouts that load into SimVQ (see design notes §2).
_OFFICIAL_KEYS = {"embedding.weight": "basis", "embedding_proj.weight": "weight",
                  "embedding_proj.bias": "bias"}
_VQ_PYTORCH_KEYS = {"frozen_codebook": "basis", "code_transform.weight": "weight",
                    "code_transform.bias": "bias"}
_LAYOUTS = {"official": _OFFICIAL_KEYS, "vector_quantize_pytorch": _VQ_PYTORCH_KEYS}

_EPS_ROT = 1e-6  # vector-quantize-pytorch's safe_div / l2norm epsilon


# ------------------------------------------------------------------- small helpers

# -------------------------------------------------- the loss and the estimator

def commitment_losses(z, zq):
    """(commit, codebook) = (mean((sg(zq) - z)^2), mean((zq - sg(z))^2))."""
    commit = torch.mean((zq.detach() - z) ** 2)
    codebook = torch.mean((zq - z.detach()) ** 2)
    return commit, codebook


def simvq_loss(z, zq, beta=0.25, legacy=False):
    """Official loss: beta * commit + codebook (legacy=True swaps the weights)."""
    commit, codebook = commitment_losses(z, zq)
    if legacy:
        return commit + beta * codebook
    return beta * commit + codebook


def straight_through(z, zq):
    """out = z + sg(zq - z)."""
    return z + (zq - z).detach()


def autocast_compute_dtype(t: torch.Tensor):
    """The dtype the search runs in for ``t`` under the current autocast state, or None
    when autocast is off for ``t``'s device type (or ``t`` is float64, which autocast
    leaves alone)."""
    dev = t.device.type
    if t.dtype == torch.float64 or not torch.amp.is_autocast_available(dev):
        return None
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses of bf16/fp16 tensors are computed (and returned) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotation_trick(z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, arXiv 2410.06424, §4.2), as written in
    vector-quantize-pytorch's ``rotate_to``: rows (N, d).

    Forward value: the rotation R that takes z/|z| to zq/|zq|, applied to z and scaled by
    |zq|/|z| -- i.e. zq (up to rounding). Backward: dL/dz = (|zq|/|z|) R^T dL/dout, with
    R and the scale treated as constants (no gradient reaches zq through this path; the
    codebook learns from the loss). Computed in at least fp32, returned in z's dtype.
    """
    dt = torch.promote_types(z.dtype, torch.float32)
    e = z.to(dt)
    q_ = zq.detach().to(dt)
    nz = e.norm(dim=-1, keepdim=True)
    nq = q_.norm(dim=-1, keepdim=True)
    u = (e / nz.clamp_min(_EPS_ROT)).detach()
    q = q_ / nq.clamp_min(_EPS_ROT)
    w = F.normalize(u + q, p=2, dim=-1, eps=_EPS_ROT)
    out = (e - 2.0 * (e * w).sum(-1, keepdim=True) * w
           + 2.0 * (e * u).sum(-1, keepdim=True) * q)
    out = out * (nq / nz.clamp_min(_EPS_ROT)).detach()
    return out.to(z.dtype)


def _channel_last(z, dim, channel_first):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"`z` must be a torch.Tensor, got {type(z).__name__}")
    if channel_first:
        if z.dim() < 2:
            raise ValueError("channel_first=True expects `z` of shape (B, dim, ...), got "
                             f"shape {tuple(z.shape)}")
        if z.shape[1] != dim:
            raise ValueError(f"channel_first=True expects `z` of shape (B, {dim}, ...)"
                             f" (channels at dim 1), got shape {tuple(z.shape)}")
        return z.movedim(1, -1)
    if z.dim() < 1 or z.shape[-1] != dim:
        raise ValueError(f"`z` must have shape (..., {dim}) (channels last; pass "
                         f"channel_first=True for (B, {dim}, ...)), got shape "
                         f"{tuple(z.shape)}")
    return z


def _flat_mask(mask, lead, z):
    """Validate a padding mask (True = real token) of the indices' shape -> (N,) bool."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`mask` must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor (True = real token, False = "
                        f"padding), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"`mask` must have the shape of the indices, {tuple(lead)} "
                         f"(z's shape without the channel dim), got {tuple(mask.shape)}")
    if mask.device != z.device:
        raise ValueError(f"`mask` is on {mask.device} but `z` is on {z.device}")
    return mask.reshape(-1)


def _masked_loss(flat, zq, m, beta, legacy):
    """beta * mean((sg(zq) - z)^2) + mean((zq - sg(z))^2) over the real tokens only
    (weights swapped if legacy), computed in fp32 (fp64 for fp64). ``flat`` has its
    padded rows zeroed already, so nothing non-finite enters."""
    dt = _loss_dtype(flat.dtype)
    zf, qf = flat.to(dt), zq.to(dt)
    if m is None:
        if flat.shape[0] == 0:
            return (zf.sum() + qf.sum()) * 0.0
        return simvq_loss(zf, qf, beta, legacy)
    w = m.to(dt)[:, None]
    denom = (m.sum() * flat.shape[1]).clamp_min(1).to(dt)
    commit = (((qf.detach() - zf) ** 2) * w).sum() / denom
    code = (((qf - zf.detach()) ** 2) * w).sum() / denom
    return (commit + beta * code) if legacy else (beta * commit + code)


class SimVQ(nn.Module):
    """SimVQ vector quantiser (arXiv 2411.02038) with a fused search and backward.

    The codebook is implicit: Q = basis @ weight.T + bias, with ``basis`` (K, r) a frozen
    random buffer drawn from N(0, r^-1/2) and ``weight`` (d, r), ``bias`` (d,) trained
    (initialised like ``nn.Linear(r, d)``, as in the official code).

    Args:
        dim: token width d.
        codebook_size: K.
        basis_dim: r (default d, as in the official code); any r >= 1 works.
        bias: learn a bias in the projection (the official layer has one).
        beta: commitment weight (0.25).
        legacy: swap the two loss weights as taming-transformers' legacy loss does
            (the official SimVQ configs use legacy=False).
        channel_first: inputs are (B, dim, *spatial) instead of (..., dim).
        backend: "auto" or a name from :func:`simvq_kernels.available_backends`.
        rotation_trick: pass gradients to ``z`` with the rotation trick (Fifty et al.
            2024) instead of the straight-through estimator (keyword only).
        track_usage: count how often each code is picked (real tokens only), for
            :meth:`codebook_usage`; synchronised across ranks on query (keyword only).

    Forward: ``out, indices, loss = layer(z, mask=None, return_distances=False)``, where
    ``out`` has z's shape and dtype (straight-through: out = z + sg(zq - z), or the
    rotation trick), ``indices`` is int64 with z's shape minus the channel dim, and
    ``loss = beta * mean((sg(zq) - z)^2) + mean((zq - sg(z))^2)`` (fp32 for bf16/fp16).

    ``mask`` (bool, the indices' shape, True = real token) marks padding: padded tokens
    pick no code (index -1, distance 0), pass through unchanged (out = z there, with an
    identity gradient), and count neither in the loss mean nor in the usage statistics;
    they may hold any value, even NaN. ``return_distances=True`` appends the squared L2
    distance of each picked code, fp32 (fp64 for fp64 input), the indices' shape.

    ``layer.last_backend`` names the backend that served the last forward.
    """

    def __init__(self, dim: int, codebook_size: int, basis_dim: int | None = None,
                 bias: bool = True, beta: float = 0.25, legacy: bool = False,
                 channel_first: bool = False, backend: str = "auto", *,
                 rotation_trick: bool = False, track_usage: bool = False):
        super().__init__()
        for name, v in (("dim", dim), ("codebook_size", codebook_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if basis_dim is not None and (not isinstance(basis_dim, int) or
                                      isinstance(basis_dim, bool) or basis_dim < 1):
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
        self.rotation_trick = bool(rotation_trick)
        self.track_usage = bool(track_usage)
        self.last_backend: str | None = None
        r = self.basis_dim
        self._init_basis(codebook_size, r)
        self.weight = nn.Parameter(torch.empty(dim, r))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()
        # A plain tensor, not a buffer: DDP's per-step buffer broadcast would overwrite
        # every rank's counts with rank 0's. Moved with the module by _apply.
        self._usage_counts = (torch.zeros(codebook_size, dtype=torch.long)
                              if self.track_usage else None)
        # Load the compiled ops (and register their fake kernels / autograd) now, outside
        # any torch.compile trace.
        _ext.load()

    def _init_basis(self, codebook_size, r):
        self.register_buffer("basis", torch.randn(codebook_size, r) * r**-0.5)

    def reset_parameters(self):
        """nn.Linear's initialisation (the official projection is an nn.Linear)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.basis_dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        s = (f"dim={self.dim}, codebook_size={self.codebook_size}, "
             f"basis_dim={self.basis_dim}, bias={self.bias is not None}, beta={self.beta}, "
             f"legacy={self.legacy}, channel_first={self.channel_first}, "
             f"backend={self.backend!r}")
        if self.rotation_trick:
            s += ", rotation_trick=True"
        if self.track_usage:
            s += ", track_usage=True"
        return s

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._usage_counts is not None:
            self._usage_counts = fn(self._usage_counts)
        return out

    # ------------------------------------------------------------------ codebook
    @property
    def codebook(self) -> torch.Tensor:
        """The projected codebook Q = basis @ weight.T + bias, (K, dim)."""
        return reference.project_codebook(self.basis, self.weight, self.bias)

    def _check_indices(self, indices):
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or \
                indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError("`indices` must be an integer tensor")
        if indices.numel() and (int(indices.min()) < 0 or
                                int(indices.max()) >= self.codebook_size):
            raise ValueError(f"`indices` must lie in [0, {self.codebook_size})")

    def _decode_rows(self, flat_idx):
        rows = self.basis.index_select(0, flat_idx.long().to(self.basis.device))
        return F.linear(rows, self.weight, self.bias)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode indices to codes *with* the projection applied (the official
        ``get_codebook_entry`` returns unprojected basis rows).

        indices (...) int -> codes (..., dim), or (B, dim, ...) if channel_first.
        Only the picked basis rows are projected; no K x dim codebook is built.
        """
        self._check_indices(indices)
        codes = self._decode_rows(indices.reshape(-1)).reshape(*indices.shape, self.dim)
        if self.channel_first:
            if indices.dim() < 1:
                raise ValueError("channel_first decoding needs indices of shape (B, ...)")
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------- forward
    def _channel_last(self, z):
        return _channel_last(z, self.dim, self.channel_first)

    def _search(self, zs):
        """Nearest codes of the detached tokens ``zs`` (N, d).

        Returns (zq, indices, distances, backend): ``zq`` differentiable w.r.t. weight
        and bias (in zs's dtype without autocast, in the parameters' dtype under
        autocast; see the module docstring).
        """
        cdt = autocast_compute_dtype(zs)
        if cdt is None:
            q = ops.quantize(zs, self.basis, self.weight, self.bias, backend=self.backend)
            return q.zq, q.indices, q.distances, q.backend
        dev = zs.device.type
        with torch.autocast(dev, enabled=False):
            b = None if self.bias is None else self.bias.detach().to(cdt)
            q = ops.quantize(zs.to(cdt), self.basis.to(cdt), self.weight.detach().to(cdt), b,
                             backend=self.backend)
            rows = self.basis.index_select(0, q.indices)
            zq = F.linear(rows, self.weight, self.bias)
        return zq, q.indices, q.distances, q.backend

    def _estimator(self, flat, zq):
        """out for the tokens: value zq (in flat's dtype), gradient to flat."""
        zq = zq.to(flat.dtype)
        if self.rotation_trick:
            return rotation_trick(flat, zq)
        return straight_through(flat, zq)

    @torch.no_grad()
    def _count(self, idx, m):
        if self._usage_counts is None:
            return
        if self._usage_counts.device != idx.device:
            self._usage_counts = self._usage_counts.to(idx.device)
        w = torch.ones_like(idx) if m is None else m.to(idx.dtype)
        self._usage_counts.index_add_(0, idx, w)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_distances: bool = False):
        x = self._channel_last(z)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = _flat_mask(mask, lead, z)
        # padded rows are zeroed before anything reads them (their values, even NaN,
        # must reach neither the search, nor the loss, nor a gradient)
        flat_s = flat if m is None else torch.where(m[:, None], flat, flat.new_zeros(()))
        zq, idx, dist, backend = self._search(flat_s.detach())
        self.last_backend = backend
        loss = _masked_loss(flat_s, zq, m, self.beta, self.legacy)
        out = self._estimator(flat_s, zq)
        self._count(idx, m)
        if m is not None:
            out = torch.where(m[:, None], out, flat)
            idx = torch.where(m, idx, idx.new_full((), -1))
            dist = torch.where(m, dist, dist.new_zeros(()))
        out = out.reshape(*lead, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1)
        indices = idx.reshape(lead)
        if return_distances:
            return out, indices, loss, dist.reshape(lead)
        return out, indices, loss

    # ------------------------------------------------------------- usage stats
    def codebook_usage(self, sync: bool | None = None, group=None):
        """The codes picked by the real tokens of every forward since construction or
        :meth:`reset_usage`, as a :class:`simvq_kernels.CodebookUsage`
        (``.utilisation()``, ``.perplexity()``, ``.counts``, ``.summary()``).

        Needs ``track_usage=True``. ``sync`` (default: when torch.distributed is
        initialised with more than one rank) sums the counts over the ranks of ``group``
        with one ``all_reduce`` -- a collective: call it on every rank. The layer's own
        counts stay per rank (so calling it twice does not double-count).
        """
        from .metrics import CodebookUsage, all_reduce_counts

        if self._usage_counts is None:
            raise RuntimeError("usage tracking is off; construct the layer with "
                               "track_usage=True")
        counts = self._usage_counts.clone()
        if sync is None:
            import torch.distributed as dist
            sync = dist.is_available() and dist.is_initialized() and \
                dist.get_world_size(group) > 1
        if sync:
            counts = all_reduce_counts(counts, group=group)
        usage = CodebookUsage(self.codebook_size, device=counts.device)
        usage.counts = counts
        return usage

    def reset_usage(self):
        if self._usage_counts is not None:
            self._usage_counts.zero_()

    # ------------------------------------------------------- foreign state dicts
    def state_dict_for(self, layout: str) -> dict:
        """This layer's weights in a foreign layout, for the code that reads it:

        - ``"official"``: the official SimVQ layer (``embedding.weight``,
          ``embedding_proj.weight``, ``embedding_proj.bias``);
        - ``"vector_quantize_pytorch"``: vector-quantize-pytorch's ``SimVQ``
          (``frozen_codebook``, ``code_transform.weight``, and
          ``code_transform.bias`` when this layer has a bias -- load that into a
          ``SimVQ(..., codebook_transform=nn.Linear(r, d, bias=True))``).

        Tensors are detached copies on the layer's device.
        """
        if layout not in _LAYOUTS:
            raise ValueError(f"unknown `layout` {layout!r}; choose one of {sorted(_LAYOUTS)}")
        ours = {"basis": self._full_basis(), "weight": self.weight, "bias": self.bias}
        out = {}
        for theirs, mine in _LAYOUTS[layout].items():
            if ours[mine] is not None:
                out[theirs] = ours[mine].detach().clone()
        return out

    def _full_basis(self):
        return self.basis

    def _remap_foreign(self, state_dict, prefix):
        """Rename the keys of a foreign layout to ours, in place (see
        :meth:`_load_from_state_dict`)."""
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Accepts the official SimVQ layout (embedding.weight, embedding_proj.weight,
        embedding_proj.bias) and vector-quantize-pytorch's (frozen_codebook,
        code_transform.weight[, code_transform.bias]) besides our own."""
        self._remap_foreign(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class ResidualSimVQ(nn.Module):
    """Residual SimVQ: ``num_quantizers`` SimVQ stages, stage i quantising the residual
    r_i = z - zq_0 - ... - zq_{i-1} left by the stages before it (Zeghidour et al. 2021,
    Algorithm 1), each with its own frozen basis and projection.

    Forward: ``out, indices, loss = layer(z, mask=None, return_distances=False)``:

    - ``out`` has z's shape and dtype with the value zq_0 + ... + zq_{Q-1}; one gradient
      estimator (straight-through, or the rotation trick) is applied to the sum, so
      dL/dz = dL/dout (not Q times it, as stage-wise estimators would give);
    - ``indices`` int64 (..., Q) (z's shape minus the channel dim, plus the stage);
    - ``loss`` is the sum of the stages' SimVQ losses, stage i's taken on its residual
      (with r_i's earlier codes detached, so each stage's commitment term pulls z);
    - ``mask`` and ``return_distances`` (then (..., Q)) as in :class:`SimVQ`.

    ``indices_to_codes(indices)`` sums the stages' decoded codes. ``layers[i]`` is stage
    i (a :class:`SimVQ`); other arguments are passed to every stage.
    """

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int,
                 basis_dim: int | None = None, bias: bool = True, beta: float = 0.25,
                 legacy: bool = False, channel_first: bool = False, backend: str = "auto",
                 *, rotation_trick: bool = False, track_usage: bool = False):
        super().__init__()
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or \
                num_quantizers < 1:
            raise ValueError(f"`num_quantizers` must be a positive int, got {num_quantizers!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers
        self.channel_first = bool(channel_first)
        self.rotation_trick = bool(rotation_trick)
        self.layers = nn.ModuleList(
            SimVQ(dim, codebook_size, basis_dim, bias, beta, legacy, channel_first=False,
                  backend=backend, track_usage=track_usage)
            for _ in range(num_quantizers))
        self.last_backend: str | None = None

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, dim): each stage's projected codebook."""
        return torch.stack([layer.codebook for layer in self.layers])

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., Q) -> the sum of the stages' codes, (..., dim) (or (B, dim, ...)
        if channel_first): the quantised value ``out`` had."""
        if not isinstance(indices, torch.Tensor) or indices.dim() < 1 or \
                indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"`indices` must have shape (..., {self.num_quantizers}) "
                             f"(one index per stage), got "
                             f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        codes = None
        for i, layer in enumerate(self.layers):
            c = layer.indices_to_codes(indices[..., i])
            codes = c if codes is None else codes + c
        if self.channel_first:
            if indices.dim() < 2:
                raise ValueError("channel_first decoding needs indices of shape (B, ..., Q)")
            codes = codes.movedim(-1, 1)
        return codes

    def codebook_usage(self, sync: bool | None = None, group=None):
        """Per-stage :class:`CodebookUsage` list (needs ``track_usage=True``)."""
        return [layer.codebook_usage(sync, group) for layer in self.layers]

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_distances: bool = False):
        x = _channel_last(z, self.dim, self.channel_first)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = _flat_mask(mask, lead, z)
        flat_s = flat if m is None else torch.where(m[:, None], flat, flat.new_zeros(()))
        residual = flat_s
        total = None
        loss = None
        all_idx, all_dist, backends = [], [], []
        for layer in self.layers:
            zq, idx, dist, backend = layer._search(residual.detach())
            backends.append(backend)
            stage_loss = _masked_loss(residual, zq, m, layer.beta, layer.legacy)
            loss = stage_loss if loss is None else loss + stage_loss
            zq_val = zq.to(flat.dtype)
            total = zq_val if total is None else total + zq_val
            residual = residual - zq_val.detach()
            all_idx.append(idx)
            all_dist.append(dist)
        # every stage succeeded: only now touch the stages' state (usage counts and
        # last_backend), so that a stage rejecting its input leaves all stages unchanged
        for layer, idx, backend in zip(self.layers, all_idx, backends):
            layer.last_backend = backend
            layer._count(idx, m)
        self.last_backend = backends[-1]
        if self.rotation_trick:
            out = rotation_trick(flat_s, total)
        else:
            out = straight_through(flat_s, total)
        idx = torch.stack(all_idx, dim=-1)
        dist = torch.stack(all_dist, dim=-1)
        if m is not None:
            out = torch.where(m[:, None], out, flat)
            idx = torch.where(m[:, None], idx, idx.new_full((), -1))
            dist = torch.where(m[:, None], dist, dist.new_zeros(()))
        out = out.reshape(*lead, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1)
        indices = idx.reshape(*lead, self.num_quantizers)
        if return_distances:
            return out, indices, loss, dist.reshape(*lead, self.num_quantizers)
        return out, indices, loss

