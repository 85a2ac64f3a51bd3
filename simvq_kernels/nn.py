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
and their fake kernels exist before tracing. Inside a compiled region the serving
cache (below) is not used: the codebook is projected in the graph at every call.

Serving (``encode`` / ``decode`` and the forward under ``torch.no_grad()`` /
``torch.inference_mode()``). The implicit codebook Q = transform(basis) costs K*r*d
flops, as much as the search itself for a few hundred tokens, so the layer keeps Q (and
the basis' duplicate map) from one call to the next and recomputes them only when
something they depend on changed: a parameter or buffer of the layer (or of its
codebook transform) was modified in place (an optimizer step, ``load_state_dict``,
``copy_`` -- version counters), replaced (``.data =``, ``.to()``: storage pointer,
device, dtype), or written through ``.data`` (the parameters are compared with a
snapshot on each call; that is O(d*r), a host sync on a GPU). Training forwards with
gradients run the fused projection + search and never read the cache.
"""
from __future__ import annotations

import math
import random
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext, backends, ops, reference

# Keys of foreign layouts that load into SimVQ (see design notes §2).
_OFFICIAL_KEYS = {"embedding.weight": "basis", "embedding_proj.weight": "weight",
                  "embedding_proj.bias": "bias"}
_VQ_PYTORCH_KEYS = {"frozen_codebook": "basis", "code_transform.weight": "weight",
                    "code_transform.bias": "bias"}
_LAYOUTS = {"official": _OFFICIAL_KEYS, "vector_quantize_pytorch": _VQ_PYTORCH_KEYS}
_USAGE_KEY = "usage_counts"  # the usage counts' state-dict entry (see SimVQ)

_EPS_ROT = 1e-6  # vector-quantize-pytorch's safe_div / l2norm epsilon

# rotation_trick=True warns once per process (see _warn_rotation_trick)
_ROTATION_TRICK_WARNED = False
ROTATION_TRICK_WARNING = (
    "simvq_kernels: rotation_trick=True on a SimVQ layer. In the library's demos the "
    "rotation trick kept the SimVQ codebook collapsed (images, K = 1024: 3-4% of the codes "
    "in use after 2,500 steps, where the straight-through estimator used 94%; with "
    "beta = 1.0 still 1.9% after 5,000 steps), in this layer and in "
    "vector-quantize-pytorch's SimVQ, whose default it is. The SimVQ paper and this "
    "library's default (rotation_trick=False) use straight-through; see "
    "docs/migration.md. Shown once per process.")


def _warn_rotation_trick(stacklevel: int = 3):
    """Warn (UserWarning, once per process) that the rotation trick collapses SimVQ."""
    global _ROTATION_TRICK_WARNED
    if _ROTATION_TRICK_WARNED:
        return
    _ROTATION_TRICK_WARNED = True
    warnings.warn(ROTATION_TRICK_WARNING, UserWarning, stacklevel=stacklevel)


# ------------------------------------------------------------------- small helpers

# -------------------------------------------------- the loss and the estimator

def commitment_losses(z, zq):
    """(commit, codebook) = (mean((sg(zq) - z)^2), mean((zq - sg(z))^2))."""
    commit = torch.mean((zq.detach() - z) ** 2)
    codebook = torch.mean((zq - z.detach()) ** 2)
    return commit, codebook


def _weighted_loss(commit, codebook, beta, legacy):
    """beta * commit + codebook (legacy=True swaps the weights)."""
    if legacy:
        return commit + beta * codebook
    return beta * commit + codebook


def simvq_loss(z, zq, beta=0.25, legacy=False):
    """Official loss: beta * commit + codebook (legacy=True swaps the weights)."""
    return _weighted_loss(*commitment_losses(z, zq), beta, legacy)


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




def _positive_int(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}"
                         f", got {v!r}")


def _describe(t):
    """A tensor's shape, or the type of a non-tensor, for error messages."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


class _LinearView:
    """(weight, bias) seen as the ``nn.Linear`` that other implementations hold
    (vector-quantize-pytorch's ``code_transform``, the official ``embedding_proj``):
    ``.weight``, ``.bias``, ``in_features``, ``out_features`` and a call. Not a module
    (it owns nothing; the parameters are the layer's)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[0]

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")


class _TensorView:
    """A tensor seen as a module's ``.weight`` (the official ``embedding``)."""

    def __init__(self, weight):
        self.weight = weight


def _tensor_state(t):
    """What identifies a tensor's current contents without reading them: storage
    pointer, version counter (bumped by every in-place op, .data writes excepted),
    device, dtype, shape and strides. None for inference tensors (no version counter)."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape), t.stride())


class SimVQ(nn.Module):
    """SimVQ vector quantiser (arXiv 2411.02038) with a fused search and backward.

    The codebook is implicit: Q = basis @ weight.T + bias, with ``basis`` (K, r) a frozen
    random buffer drawn from N(0, r^-1/2) and ``weight`` (d, r), ``bias`` (d,) trained
    (initialised like ``nn.Linear(r, d)``, as in the official code). Any per-row
    ``codebook_transform`` may replace the linear projection (below).

    Args:
        dim: token width d.
        codebook_size: K.
        basis_dim: r (default d, as in the official code); any r >= 1 works.
        bias: learn a bias in the projection (the official layer has one).
        beta: commitment weight (0.25): the weight of mean((sg(zq) - z)^2).
        legacy: swap the two loss weights as taming-transformers' legacy loss does
            (the official SimVQ configs use legacy=False).
        channel_first: inputs are (B, dim, *spatial) instead of (..., dim).
        backend: "auto" or a name from :func:`simvq_kernels.available_backends`
            (checked here: an unknown name raises ``ValueError``).

    Keyword-only:
        rotation_trick: pass gradients to ``z`` with the rotation trick (Fifty et al.
            2024) instead of the straight-through estimator (default False, the paper's
            estimator; vector-quantize-pytorch defaults to True).
        track_usage: count how often each code is picked (real tokens only), for
            :meth:`codebook_usage`; synchronised across ranks on query. The counts are
            saved in the state dict (``usage_counts``, this process's counts), so a
            resumed run continues them; checkpoints without them load as well.
        codebook_transform: a module mapping basis rows (..., r) to codes (..., dim) row
            by row (e.g. ``nn.Sequential(nn.Linear(r, h), nn.SiLU(), nn.Linear(h,
            dim))``). A plain ``nn.Linear`` *is* the projection: its parameters become
            ``weight``/``bias`` (its own bias setting wins over ``bias``) and the fused
            backward is kept. Any other module: the search runs over Q =
            transform(basis) computed without gradient, and the picked codes are
            recomputed with gradient, zq = transform(basis[idx]) (the gradient a full
            ``transform(basis)[idx]`` would give, without its K-row backward). Its
            parameters live under ``code_transform.*`` (vector-quantize-pytorch's keys).
        init_fn: applied once to the freshly drawn basis, (K, r) -> (K, r).
        input_to_quantize_commit_loss_weight: vector-quantize-pytorch's name for
            ``beta``.
        commitment_weight: multiplies the returned loss (1.0).
        frozen_codebook_dim: vector-quantize-pytorch's name for ``basis_dim``.

    Forward: ``out, indices, loss = layer(z, mask=None, return_distances=False)``, where
    ``out`` has z's shape and dtype (straight-through: out = z + sg(zq - z), or the
    rotation trick; contiguous, also for channel_first), ``indices`` is int64 with z's
    shape minus the channel dim, and ``loss = commitment_weight * (beta * mean((sg(zq)
    - z)^2) + mean((zq - sg(z))^2))`` (fp32 for bf16/fp16).

    ``mask`` (bool, the indices' shape, True = real token) marks padding: padded tokens
    pick no code (index -1, distance 0), pass through unchanged (out = z there, with an
    identity gradient), and count neither in the loss mean nor in the usage statistics;
    they may hold any value, even NaN. ``return_distances=True`` appends the squared L2
    distance of each picked code, fp32 (fp64 for fp64 input), the indices' shape.

    Serving: ``encode(z)`` -> indices and ``decode(indices)`` -> codes, in the layouts
    of ``forward``; both run without gradient over a cached codebook (see the module
    docstring). ``decode`` (= ``indices_to_codes``) maps index -1 (padding) to zeros.

    ``layer.last_backend`` names the backend that served the last forward or encode.
    """

    def __init__(self, dim: int, codebook_size: int, basis_dim: int | None = None,
                 bias: bool = True, beta: float = 0.25, legacy: bool = False,
                 channel_first: bool = False, backend: str = "auto", *,
                 rotation_trick: bool = False, track_usage: bool = False,
                 codebook_transform: nn.Module | None = None, init_fn=None,
                 input_to_quantize_commit_loss_weight: float | None = None,
                 commitment_weight: float = 1.0, frozen_codebook_dim: int | None = None):
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("codebook_size", codebook_size)
        if isinstance(basis_dim, nn.Module):
            raise TypeError("`basis_dim` (the third positional argument) must be an int; "
                            "pass a module as codebook_transform=...")
        _positive_int("basis_dim", basis_dim, allow_none=True)
        _positive_int("frozen_codebook_dim", frozen_codebook_dim, allow_none=True)
        if basis_dim is not None and frozen_codebook_dim is not None and \
                basis_dim != frozen_codebook_dim:
            raise ValueError(f"`basis_dim`={basis_dim} and `frozen_codebook_dim`="
                             f"{frozen_codebook_dim} name the same thing; give one")
        basis_dim = basis_dim or frozen_codebook_dim
        if input_to_quantize_commit_loss_weight is not None:
            if beta != 0.25 and float(beta) != float(input_to_quantize_commit_loss_weight):
                raise ValueError("`beta` and `input_to_quantize_commit_loss_weight` name "
                                 "the same weight; give one")
            beta = input_to_quantize_commit_loss_weight
        backends.check_name(backend)
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError("`codebook_transform` must be an nn.Module, got "
                            f"{type(codebook_transform).__name__}")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"`init_fn` must be callable, got {type(init_fn).__name__}")
        linear = codebook_transform if type(codebook_transform) is nn.Linear else None
        if linear is not None:
            if linear.out_features != dim:
                raise ValueError(f"`codebook_transform` maps to {linear.out_features} "
                                 f"features but `dim` is {dim}")
            if basis_dim is not None and basis_dim != linear.in_features:
                raise ValueError(f"`codebook_transform` takes {linear.in_features} "
                                 f"features but the basis dim is {basis_dim}")
            basis_dim = linear.in_features
        self.dim = dim
        self.codebook_size = codebook_size
        self.basis_dim = basis_dim or dim
        self.beta = float(beta)
        self.legacy = bool(legacy)
        self.channel_first = bool(channel_first)
        self.backend = backend
        self.rotation_trick = bool(rotation_trick)
        if self.rotation_trick:
            _warn_rotation_trick()
        self.track_usage = bool(track_usage)
        self.commitment_weight = float(commitment_weight)
        self.last_backend: str | None = None
        r = self.basis_dim
        self._init_basis(codebook_size, r)
        if init_fn is not None:
            self._apply_init_fn(init_fn)
        if linear is not None:
            self.weight, self.bias = linear.weight, linear.bias  # adopted, not re-drawn
        elif codebook_transform is not None:
            self.weight, self.bias = None, None
            self.code_transform = codebook_transform  # registered as a submodule
            self._check_transform()
        else:
            self.weight = nn.Parameter(torch.empty(dim, r))
            self.bias = nn.Parameter(torch.empty(dim)) if bias else None
            self.reset_parameters()
        # A plain tensor, not a buffer: DDP's per-step buffer broadcast would overwrite
        # every rank's counts with rank 0's. Moved with the module by _apply, saved and
        # loaded as ``usage_counts`` by the state-dict hooks below.
        self._usage_counts = (torch.zeros(codebook_size, dtype=torch.long)
                              if self.track_usage else None)
        self._codebook_cache = None  # (key, parameter snapshots, Q)
        self._codebook_map_cache = None  # (Q, its duplicate-code map)
        self._dup_cache = {}  # basis dtype -> (key, duplicate map)
        # Load the compiled ops (and register their fake kernels / autograd) now, outside
        # any torch.compile trace.
        _ext.load()

    def _init_basis(self, codebook_size, r):
        self.register_buffer("basis", torch.randn(codebook_size, r) * r**-0.5)

    def _apply_init_fn(self, init_fn):
        with torch.no_grad():
            new = init_fn(self.basis.clone())
        if not isinstance(new, torch.Tensor) or new.shape != self.basis.shape:
            raise ValueError(f"`init_fn` must return a tensor of shape "
                             f"{tuple(self.basis.shape)}, got {_describe(new)}")
        self.basis = new.to(self.basis.dtype).detach()

    def _check_transform(self):
        probe = self.basis[:2]
        with torch.no_grad():
            out = self.code_transform(probe)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (probe.shape[0], self.dim):
            raise ValueError(
                f"`codebook_transform` must map basis rows ({probe.shape[0]}, "
                f"{self.basis_dim}) to codes ({probe.shape[0]}, {self.dim}) row by row, got "
                f"{_describe(out)}")

    def reset_parameters(self):
        """nn.Linear's initialisation (the official projection is an nn.Linear)."""
        if self.weight is None:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.basis_dim)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def _linear(self) -> bool:
        """True when the codebook is the linear projection (the fused path)."""
        return "code_transform" not in self._modules

    def extra_repr(self):
        s = (f"dim={self.dim}, codebook_size={self.codebook_size}, "
             f"basis_dim={self.basis_dim}, ")
        if self._linear:
            s += f"bias={self.bias is not None}, "
        s += (f"beta={self.beta}, legacy={self.legacy}, channel_first={self.channel_first}, "
              f"backend={self.backend!r}")
        if self.commitment_weight != 1.0:
            s += f", commitment_weight={self.commitment_weight}"
        if self.rotation_trick:
            s += ", rotation_trick=True"
        if self.track_usage:
            s += ", track_usage=True"
        return s

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._usage_counts is not None:
            self._usage_counts = fn(self._usage_counts)
        self.clear_codebook_cache()
        return out

    # ----------------------------------------- vector-quantize-pytorch's names
    @property
    def input_to_quantize_commit_loss_weight(self) -> float:
        return self.beta

    @property
    def frozen_codebook(self) -> torch.Tensor:
        """vector-quantize-pytorch's name for ``basis``."""
        return self._full_basis()

    @property
    def code_transform(self):
        """The codebook transform (vector-quantize-pytorch's name): the module given as
        ``codebook_transform``, or for the linear projection a view of
        (``weight``, ``bias``) as an ``nn.Linear``."""
        m = self._modules.get("code_transform")
        return m if m is not None else _LinearView(self.weight, self.bias)

    # ------------------------------------------------------------------ codebook
    def _transform_tensors(self):
        """The trainable tensors the codebook depends on (besides the basis)."""
        if self._linear:
            return [t for t in (self.weight, self.bias) if t is not None]
        return list(self.code_transform.parameters())

    def _transform_buffers(self):
        return [] if self._linear else list(self.code_transform.buffers())

    def _project_rows(self, rows):
        """Codes of basis rows (n, r) -> (n, dim), differentiable."""
        if self._linear:
            return F.linear(rows, self.weight, self.bias)
        return self.code_transform(rows)

    @property
    def codebook(self) -> torch.Tensor:
        """The projected codebook Q = transform(basis), (K, dim) (with gradient)."""
        if self._linear:
            return reference.project_codebook(self.basis, self.weight, self.bias)
        return self.code_transform(self.basis)

    def clear_codebook_cache(self):
        """Drop the cached codebook and duplicate map (they are rebuilt when needed)."""
        self._codebook_cache = None
        self._codebook_map_cache = None
        self._dup_cache = {}

    def __getstate__(self):
        # pickling / deepcopy: the caches are derived data (and K x dim large)
        state = self.__dict__.copy()
        state["_codebook_cache"] = None
        state["_codebook_map_cache"] = None
        state["_dup_cache"] = {}
        return state

    def _search_dtype(self, zs):
        """The dtype the search runs in for tokens ``zs`` (autocast's, or zs's)."""
        return autocast_compute_dtype(zs) or zs.dtype

    def _projected(self, sdt):
        """Q in the search dtype ``sdt``, without gradient, the way the fused op forms it:
        parameters rounded to ``sdt``, projected in fp32 (fp64 for fp64)."""
        pdt = reference.compute_dtype(sdt)
        with torch.no_grad(), torch.autocast(self.basis.device.type, enabled=False):
            if self._linear:
                b = None if self.bias is None else self.bias.to(sdt).to(pdt)
                q = reference.project_codebook(self.basis.to(sdt).to(pdt),
                                               self.weight.to(sdt).to(pdt), b)
            else:
                q = self.code_transform(self.basis)
        return q.to(sdt)

    def _cache_key(self, sdt):
        tensors = [self.basis] + self._transform_tensors() + self._transform_buffers()
        states = [_tensor_state(t) for t in tensors]
        if any(s is None for s in states):
            return None  # inference tensors: no version counters, nothing is cached
        return (sdt, torch.is_inference_mode_enabled(), tuple(states))

    def _cached_codebook(self, sdt):
        """Q in the search dtype, from the cache when nothing it depends on changed."""
        if torch.compiler.is_compiling():
            return self._projected(sdt)
        key = self._cache_key(sdt)
        if key is None:
            return self._projected(sdt)
        params = self._transform_tensors()
        c = self._codebook_cache
        if c is not None and c[0] == key and all(
                torch.equal(p, s) for p, s in zip(params, c[1])):
            return c[2]
        q = self._projected(sdt)
        with torch.no_grad():
            snaps = [p.detach().clone() for p in params]
        self._codebook_cache = (key, snaps, q)
        return q

    def _codebook_map(self, q, device, sdt):
        """The duplicate-code map of the cached codebook ``q`` for the backends that
        need one (the pure-PyTorch searches), computed once per cached codebook."""
        if torch.compiler.is_compiling():
            return None
        name = backends.select_backend(self.backend, device, sdt)
        if not backends.BACKENDS[name].wants_duplicate_map:
            return None
        c = self._codebook_map_cache
        if c is not None and c[0] is q:
            return c[1]
        m = ops.codebook_duplicate_map(q)
        if self._codebook_cache is not None and self._codebook_cache[2] is q:
            self._codebook_map_cache = (q, m)  # lives as long as the cached codebook
        return m

    def _duplicate_map(self, basis):
        """For each row of ``basis`` (the layer's basis, possibly cast to the search
        dtype), the lowest index of an identical row; cached like the codebook."""
        if torch.compiler.is_compiling():
            return None  # the op computes it in the graph
        key = _tensor_state(self.basis)
        if key is None:
            return ops.basis_duplicate_map(basis)
        hit = self._dup_cache.get(basis.dtype)
        if hit is not None and hit[0] == key:
            return hit[1]
        m = ops.basis_duplicate_map(basis)
        self._dup_cache[basis.dtype] = (key, m)
        return m

    def _check_indices(self, indices, allow_padding=True):
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or \
                indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError("`indices` must be an integer tensor")
        lo = -1 if allow_padding else 0
        if indices.numel() and (int(indices.min()) < lo or
                                int(indices.max()) >= self.codebook_size):
            raise ValueError(f"`indices` must lie in [0, {self.codebook_size})"
                             + (" (or be -1 for padding)" if allow_padding else ""))

    def _decode_rows(self, flat_idx):
        rows = self.basis.index_select(0, flat_idx.long().to(self.basis.device))
        return self._project_rows(rows)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode indices to codes *with* the projection applied (the official
        ``get_codebook_entry`` returns unprojected basis rows).

        indices (...) int -> codes (..., dim), or (B, dim, ...) if channel_first
        (contiguous). Index -1 (what ``forward`` and ``encode`` return for padded
        tokens) decodes to a zero vector. Only the picked basis rows are projected; no
        K x dim codebook is built. Differentiable w.r.t. the projection's parameters.
        """
        self._check_indices(indices)
        if self.channel_first and indices.dim() < 1:
            raise ValueError("channel_first decoding needs indices of shape (B, ...)")
        flat = indices.reshape(-1).long()
        pad = flat < 0
        codes = self._decode_rows(flat.clamp_min(0))
        codes = torch.where(pad[:, None], codes.new_zeros(()), codes)
        codes = codes.reshape(*indices.shape, self.dim)
        if self.channel_first:
            codes = codes.movedim(-1, 1).contiguous()
        return codes

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` in ``forward``'s output layout (see
        :meth:`indices_to_codes`), computed without gradient."""
        with torch.no_grad():
            return self.indices_to_codes(indices)

    # ------------------------------------------------------------------- forward
    def _channel_last(self, z):
        return _channel_last(z, self.dim, self.channel_first)

    def _use_cache(self) -> bool:
        """Serve from the cached codebook: no gradient is wanted from the codebook."""
        if torch.compiler.is_compiling():
            return False
        return not torch.is_grad_enabled() or not any(
            p.requires_grad for p in self._transform_tensors())

    def _nearest_cached(self, zs):
        """(indices, distances, backend) of the detached tokens over the cached codebook
        (or, inside torch.compile, one projected in the graph)."""
        sdt = self._search_dtype(zs)
        q = self._cached_codebook(sdt)
        dev = zs.device.type
        with torch.autocast(dev, enabled=False):
            res = ops.nearest_code_ex(zs.to(sdt), q, backend=self.backend,
                                      duplicate_map=self._codebook_map(q, zs.device, sdt))
        idx = res.indices
        dup = self._duplicate_map(self.basis.to(sdt))
        if dup is None:
            dup = ops.basis_duplicate_map(self.basis.to(sdt))
        if idx.numel():
            idx = dup[idx]
        return idx, res.distances, res.backend

    def _search(self, zs):
        """Nearest codes of the detached tokens ``zs`` (N, d).

        Returns (zq, indices, distances, backend): ``zq`` differentiable w.r.t. the
        projection's parameters (in zs's dtype without autocast, in the parameters'
        dtype under autocast; see the module docstring).
        """
        self._check_dtype(zs)
        cdt = autocast_compute_dtype(zs)
        if not self._linear or self._use_cache():
            idx, dist, backend = self._nearest_cached(zs)
            with torch.autocast(zs.device.type, enabled=False):
                zq = self._project_rows(self.basis.index_select(0, idx))
            if cdt is None:
                zq = zq.to(zs.dtype)
            return zq, idx, dist, backend
        # training: the parameters are about to change, a cached codebook would only
        # hold memory (K x dim) until the next no-grad call rebuilds it
        if not torch.compiler.is_compiling():
            self._codebook_cache = None
            self._codebook_map_cache = None
        if cdt is None:
            q = ops.quantize(zs, self.basis, self.weight, self.bias, backend=self.backend,
                             duplicate_map=self._duplicate_map(self.basis))
            return q.zq, q.indices, q.distances, q.backend
        dev = zs.device.type
        with torch.autocast(dev, enabled=False):
            b = None if self.bias is None else self.bias.detach().to(cdt)
            basis = self.basis.to(cdt)
            q = ops.quantize(zs.to(cdt), basis, self.weight.detach().to(cdt), b,
                             backend=self.backend, duplicate_map=self._duplicate_map(basis))
            rows = self.basis.index_select(0, q.indices)
            zq = F.linear(rows, self.weight, self.bias)
        return zq, q.indices, q.distances, q.backend

    def _trains_fused(self, flat) -> bool:
        """Whether the training forward of the tokens ``flat`` (..., d) may run as one
        ``ops.quantize_train`` step: a plain linear projection whose parameters want
        gradients, float32 / float64 tokens of the parameters' dtype, no autocast, not
        inside torch.compile (which fuses the plain formulas itself), N > 0."""
        return (self._linear and not self._use_cache() and not torch.compiler.is_compiling()
                and flat.numel() > 0 and flat.dtype in (torch.float32, torch.float64)
                and flat.dtype == self.weight.dtype == self.basis.dtype
                and autocast_compute_dtype(flat) is None)

    def _check_dtype(self, zs):
        """Without autocast every tensor of a call shares one dtype (the ops would name
        the basis; the user passed only z)."""
        ref = self.weight if self.weight is not None else self.basis
        if autocast_compute_dtype(zs) is None and zs.dtype != ref.dtype and \
                zs.is_floating_point():
            raise TypeError(f"`z` has dtype {zs.dtype} but the layer's parameters have "
                            f"dtype {ref.dtype}; convert one of them (e.g. "
                            f"layer.to({zs.dtype})) or run under torch.autocast")

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

    def _loss(self, flat_s, zq, m):
        # always multiplied (exact for 1.0): comparing the float would make torch.compile
        # with dynamic=True specialise it and restart the trace
        return _masked_loss(flat_s, zq, m, self.beta, self.legacy) * self.commitment_weight

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_distances: bool = False):
        x = self._channel_last(z)
        lead = x.shape[:-1]
        m = _flat_mask(mask, lead, z)
        if m is None and not self.rotation_trick and self._trains_fused(x):
            out, idx, dist, loss = self._fused_step(z, x)
        else:
            flat = x.reshape(-1, self.dim)
            # padded rows are zeroed before anything reads them (their values, even NaN,
            # must reach neither the search, nor the loss, nor a gradient)
            flat_s = flat if m is None else torch.where(m[:, None], flat, flat.new_zeros(()))
            zq, idx, dist, backend = self._search(flat_s.detach())
            self.last_backend = backend
            loss = self._loss(flat_s, zq, m)
            out = self._estimator(flat_s, zq)
            self._count(idx, m)
            if m is not None:
                out = torch.where(m[:, None], out, flat)
                idx = torch.where(m, idx, idx.new_full((), -1))
                dist = torch.where(m, dist, dist.new_zeros(()))
            out = out.reshape(*lead, self.dim)
            if self.channel_first:
                out = out.movedim(-1, 1).contiguous()
        indices = idx.reshape(lead)
        if return_distances:
            return out, indices, loss, dist.reshape(lead)
        return out, indices, loss

    def _fused_step(self, z, x):
        """The plain training step (see ``_trains_fused``): quantiser, estimator and
        losses in one ``ops.quantize_train`` call, on the channel-first layout in place
        (B, dim, T) when the layer is channel-first. Returns (out in z's layout,
        indices (N,), distances (N,), loss)."""
        # the parameters are about to change: a cached codebook would only hold memory
        self._codebook_cache = self._codebook_map_cache = None
        common = dict(backend=self.backend, duplicate_map=self._duplicate_map(self.basis))
        if self.channel_first:
            step = ops.quantize_train(z.reshape(z.shape[0], self.dim, -1), self.basis,
                                      self.weight, self.bias, channel_first=True, **common)
            out = step.out.reshape(z.shape)
        else:
            step = ops.quantize_train(x.reshape(-1, self.dim), self.basis, self.weight,
                                      self.bias, **common)
            out = step.out.reshape(x.shape)
        self.last_backend = step.backend
        self._count(step.indices, None)
        loss = (_weighted_loss(step.commit, step.codebook, self.beta, self.legacy)
                * self.commitment_weight)
        return out, step.indices, step.distances, loss

    def _encode_flat(self, flat):
        """Indices of the tokens (N, d), no gradient, no side effects but the backend
        name."""
        self._check_dtype(flat)
        idx, _, backend = self._nearest_cached(flat)
        self.last_backend = backend
        return idx

    def encode(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the nearest codes, the serving path: ``forward``'s ``indices``
        without its loss, output or gradient.

        z (..., dim), or (B, dim, ...) if channel_first -> int64 indices, z's shape
        without the channel dim (-1 where ``mask`` is False). The codebook is cached
        between calls and re-projected only when the layer's parameters or buffers
        changed (see the module docstring), so a call costs the search over a
        precomputed codebook. Usage counts are not updated.
        """
        x = self._channel_last(z)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = _flat_mask(mask, lead, z)
        with torch.no_grad():
            flat_s = flat if m is None else torch.where(m[:, None], flat, flat.new_zeros(()))
            idx = self._encode_flat(flat_s.detach())
            if m is not None:
                idx = torch.where(m, idx, idx.new_full((), -1))
        return idx.reshape(lead)

    # ------------------------------------------------------------- usage stats
    def codebook_usage(self, sync: bool | None = None, group=None):
        """The codes picked by the real tokens of every forward since construction or
        :meth:`reset_usage` (or since the run a loaded state dict came from), as a
        :class:`simvq_kernels.CodebookUsage` (``.utilisation()``, ``.perplexity()``,
        ``.counts``, ``.summary()``).

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
          ``SimVQ(..., codebook_transform=nn.Linear(r, d, bias=True))``; with a
          non-linear ``codebook_transform``, its ``code_transform.*`` entries).

        Tensors are detached copies on the layer's device.
        """
        if layout not in _LAYOUTS:
            raise ValueError(f"unknown `layout` {layout!r}; choose one of {sorted(_LAYOUTS)}")
        if not self._linear:
            if layout == "official":
                raise ValueError("the official layout holds a linear projection; this "
                                 "layer has a non-linear codebook_transform")
            out = {"frozen_codebook": self._full_basis().detach().clone()}
            for k, v in self.code_transform.state_dict().items():
                out["code_transform." + k] = v.detach().clone()
            return out
        ours = {"basis": self._full_basis(), "weight": self.weight, "bias": self.bias}
        out = {}
        for theirs, mine in _LAYOUTS[layout].items():
            if ours[mine] is not None:
                out[theirs] = ours[mine].detach().clone()
        return out

    def _full_basis(self):
        return self.basis

    def _remap_foreign(self, state_dict, prefix):
        """Rename the keys of a foreign layout to ours, in place, and take the usage
        counts out (see :meth:`_load_from_state_dict`)."""
        self._take_usage_counts(state_dict, prefix)
        mappings = (_OFFICIAL_KEYS, _VQ_PYTORCH_KEYS) if self._linear else \
            ({"frozen_codebook": "basis"},)
        for mapping in mappings:
            if any(prefix + k in state_dict for k in mapping):
                for src, dst in mapping.items():
                    if prefix + src in state_dict:
                        state_dict[prefix + dst] = state_dict.pop(prefix + src)
                if self._linear and self.bias is not None and \
                        prefix + "bias" not in state_dict:
                    # a bias-free layout (vector-quantize-pytorch's default) is exactly
                    # a zero bias
                    w = state_dict.get(prefix + "weight")
                    state_dict[prefix + "bias"] = torch.zeros(
                        self.dim, dtype=w.dtype if w is not None else self.weight.dtype)

    def _take_usage_counts(self, state_dict, prefix):
        counts = state_dict.pop(prefix + _USAGE_KEY, None)
        if counts is None or self._usage_counts is None:
            return  # an old checkpoint keeps the counts as they are; untracked: ignored
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != \
                (self.codebook_size,):
            raise RuntimeError(f"{prefix + _USAGE_KEY}: expected usage counts of shape "
                               f"({self.codebook_size},), got {_describe(counts)}")
        self._usage_counts = counts.to(device=self._usage_counts.device,
                                       dtype=torch.long).clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._usage_counts is not None:
            destination[prefix + _USAGE_KEY] = self._usage_counts if keep_vars else \
                self._usage_counts.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Accepts the official SimVQ layout (embedding.weight, embedding_proj.weight,
        embedding_proj.bias) and vector-quantize-pytorch's (frozen_codebook,
        code_transform.weight[, code_transform.bias], or a non-linear transform's
        code_transform.*) besides our own; ``usage_counts`` is optional."""
        self._remap_foreign(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


def _dropout_seed(device) -> int:
    """A seed for quantizer dropout, the same on every rank when torch.distributed runs
    with more than one (summed over the ranks)."""
    import torch.distributed as dist
    s = torch.randint(0, 10_000, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(s)
    return int(s.item())


class ResidualSimVQ(nn.Module):
    """Residual SimVQ: ``num_quantizers`` SimVQ stages, stage i quantising the residual
    r_i = z - zq_0 - ... - zq_{i-1} left by the stages before it (Zeghidour et al. 2021,
    Algorithm 1), each with its own frozen basis and projection.

    Forward: ``out, indices, loss = layer(z, mask=None, return_distances=False,
    return_all_codes=False, rand_quantize_dropout_fixed_seed=None)``:

    - ``out`` has z's shape and dtype with the value zq_0 + ... + zq_{Q-1}; one gradient
      estimator (straight-through, or the rotation trick) is applied to the sum, so
      dL/dz = dL/dout (not Q times it, as stage-wise estimators give; pass
      ``stagewise_estimator=True`` for those, vector-quantize-pytorch's behaviour);
    - ``indices`` int64 (..., Q) (z's shape minus the channel dim, plus the stage);
    - ``loss`` is the sum of the stages' SimVQ losses, stage i's taken on its residual
      (with r_i's earlier codes detached, so each stage's commitment term pulls z);
      ``return_all_losses=True`` returns the (Q,) per-stage losses instead, as
      vector-quantize-pytorch does;
    - ``mask`` and ``return_distances`` (then (..., Q)) as in :class:`SimVQ`;
    - ``return_all_codes=True`` appends every stage's codes, (Q, ..., dim) (or
      (Q, B, dim, ...) if channel_first).

    Quantizer dropout (``quantize_dropout=True``, training mode only): each forward
    keeps the stages up to a random one drawn from
    ``[quantize_dropout_cutoff_index, Q)`` (rounded up to a multiple of
    ``quantize_dropout_multiple_of``, minus one), the same on every rank, or from
    ``rand_quantize_dropout_fixed_seed``; the dropped stages return index -1 and loss 0.
    ``heads`` must be 1 (as in vector-quantize-pytorch).

    Decoding: ``get_codes_from_indices(indices)`` -> (Q, ..., dim) per stage,
    ``get_output_from_indices(indices)`` = ``indices_to_codes`` = ``decode`` -> their
    sum, in ``forward``'s layout; index -1 (padding, dropped stages) decodes to zeros,
    and with quantizer dropout fewer than Q stages may be given. ``encode(z)`` gives the
    indices alone over the stages' cached codebooks. ``layers[i]`` is stage i (a
    :class:`SimVQ`); the remaining keyword arguments (``codebook_transform``,
    ``init_fn``, ``commitment_weight``, ...) are passed to every stage (a
    ``codebook_transform`` module is shared by the stages, as in
    vector-quantize-pytorch).
    """

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int,
                 basis_dim: int | None = None, bias: bool = True, beta: float = 0.25,
                 legacy: bool = False, channel_first: bool = False, backend: str = "auto",
                 *, rotation_trick: bool = False, track_usage: bool = False,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, heads: int = 1,
                 stagewise_estimator: bool = False, return_all_losses: bool = False,
                 **simvq_kwargs):
        super().__init__()
        _positive_int("num_quantizers", num_quantizers)
        if heads != 1:
            raise ValueError(f"`heads` must be 1 (residual quantisation has one code per "
                             f"stage), got {heads!r}")
        if not isinstance(quantize_dropout_cutoff_index, int) or \
                quantize_dropout_cutoff_index < 0:
            raise ValueError("`quantize_dropout_cutoff_index` must be an int >= 0, got "
                             f"{quantize_dropout_cutoff_index!r}")
        _positive_int("quantize_dropout_multiple_of", quantize_dropout_multiple_of)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        if self.quantize_dropout and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"`quantize_dropout_cutoff_index` must be below num_quantizers"
                             f"={num_quantizers}, got {quantize_dropout_cutoff_index}")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.channel_first = bool(channel_first)
        self.rotation_trick = bool(rotation_trick)
        if self.rotation_trick:
            _warn_rotation_trick()
        self.stagewise_estimator = bool(stagewise_estimator)
        self.return_all_losses = bool(return_all_losses)
        self.layers = nn.ModuleList(
            SimVQ(dim, codebook_size, basis_dim, bias, beta, legacy, channel_first=False,
                  backend=backend, track_usage=track_usage, **simvq_kwargs)
            for _ in range(num_quantizers))
        self.last_backend: str | None = None

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, dim): each stage's projected codebook."""
        return torch.stack([layer.codebook for layer in self.layers])

    # ---------------------------------------------------------------- decoding
    def _stage_indices(self, indices):
        q = self.num_quantizers
        if not isinstance(indices, torch.Tensor) or indices.dim() < 1 or \
                indices.shape[-1] > q or (indices.shape[-1] < q and not self.quantize_dropout):
            got = _describe(indices)
            raise ValueError(f"`indices` must have shape (..., {q}) (one index per stage"
                             + ("; fewer stages with quantize_dropout" if self.quantize_dropout
                                else "") + f"), got {got}")
        if self.channel_first and indices.dim() < 2:
            raise ValueError("channel_first decoding needs indices of shape (B, ..., Q)")
        if indices.shape[-1] < q:
            indices = F.pad(indices, (0, q - indices.shape[-1]), value=-1)
        return indices

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., Q) -> every stage's codes, (Q, ..., dim) (or (Q, B, dim, ...) if
        channel_first); -1 decodes to zeros."""
        indices = self._stage_indices(indices)
        codes = torch.stack([layer.indices_to_codes(indices[..., i])
                             for i, layer in enumerate(self.layers)])
        if self.channel_first:
            codes = codes.movedim(-1, 2).contiguous()
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., Q) -> the sum of the stages' codes, (..., dim) (or (B, dim, ...)
        if channel_first): the quantised value ``out`` had."""
        indices = self._stage_indices(indices)
        codes = None
        for i, layer in enumerate(self.layers):
            c = layer.indices_to_codes(indices[..., i])
            codes = c if codes is None else codes + c
        if self.channel_first:
            codes = codes.movedim(-1, 1).contiguous()
        return codes

    indices_to_codes = get_output_from_indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """:meth:`get_output_from_indices` without gradient (the serving path)."""
        with torch.no_grad():
            return self.get_output_from_indices(indices)

    def encode(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (..., Q) of ``forward`` without its loss and output, over each stage's
        cached codebook (see :meth:`SimVQ.encode`). No quantizer dropout."""
        x = _channel_last(z, self.dim, self.channel_first)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = _flat_mask(mask, lead, z)
        with torch.no_grad():
            residual = flat if m is None else torch.where(m[:, None], flat,
                                                          flat.new_zeros(()))
            residual = residual.detach()
            all_idx = []
            for layer in self.layers:
                layer._check_dtype(residual)
                idx, _, backend = layer._nearest_cached(residual)
                zq = layer._project_rows(layer.basis.index_select(0, idx))
                residual = residual - zq.to(residual.dtype)
                all_idx.append(idx)
                layer.last_backend = backend
            self.last_backend = self.layers[-1].last_backend
            idx = torch.stack(all_idx, dim=-1)
            if m is not None:
                idx = torch.where(m[:, None], idx, idx.new_full((), -1))
        return idx.reshape(*lead, self.num_quantizers)

    def codebook_usage(self, sync: bool | None = None, group=None):
        """Per-stage :class:`CodebookUsage` list (needs ``track_usage=True``)."""
        return [layer.codebook_usage(sync, group) for layer in self.layers]

    # ----------------------------------------------------------------- forward
    def _last_kept_stage(self, device, seed):
        """The last stage this forward runs (quantizer dropout), or None for all."""
        if not (self.training and self.quantize_dropout):
            return None
        if seed is None:
            seed = _dropout_seed(device)
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                             self.num_quantizers)
        m = self.quantize_dropout_multiple_of
        if m != 1:
            last = math.ceil((last + 1) / m) * m - 1
        return last

    def _estimate(self, flat, zq):
        return rotation_trick(flat, zq) if self.rotation_trick else straight_through(flat, zq)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_distances: bool = False, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        x = _channel_last(z, self.dim, self.channel_first)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        m = _flat_mask(mask, lead, z)
        flat_s = flat if m is None else torch.where(m[:, None], flat, flat.new_zeros(()))
        last = self._last_kept_stage(z.device, rand_quantize_dropout_fixed_seed)
        residual = flat_s
        total = None
        losses, all_idx, all_dist, backends = [], [], [], []
        for i, layer in enumerate(self.layers):
            if last is not None and i > last:
                losses.append(None)
                all_idx.append(torch.full((flat.shape[0],), -1, dtype=torch.long,
                                          device=flat.device))
                all_dist.append(None)
                backends.append(None)
                continue
            zq, idx, dist, backend = layer._search(residual.detach())
            backends.append(backend)
            losses.append(layer._loss(residual, zq, m))
            zq_val = zq.to(flat.dtype)
            if self.stagewise_estimator:
                stage_out = self._estimate(residual, zq_val)
                total = stage_out if total is None else total + stage_out
                residual = residual - stage_out.detach()
            else:
                total = zq_val if total is None else total + zq_val
                residual = residual - zq_val.detach()
            all_idx.append(idx)
            all_dist.append(dist)
        # every stage succeeded: only now touch the stages' state (usage counts and
        # last_backend), so that a stage rejecting its input leaves all stages unchanged
        for layer, idx, backend in zip(self.layers, all_idx, backends):
            if backend is not None:
                layer.last_backend = backend
                layer._count(idx, m)
        self.last_backend = [b for b in backends if b is not None][-1]
        out = total if self.stagewise_estimator else self._estimate(flat_s, total)
        ref = next(l for l in losses if l is not None)
        losses = [ref.new_zeros(()) if l is None else l for l in losses]
        if self.return_all_losses:
            loss = torch.stack(losses)
        else:
            loss = losses[0]
            for l in losses[1:]:
                loss = loss + l
        ref_d = next(d for d in all_dist if d is not None)
        all_dist = [ref_d.new_zeros(ref_d.shape) if d is None else d for d in all_dist]
        idx = torch.stack(all_idx, dim=-1)
        dist = torch.stack(all_dist, dim=-1)
        if m is not None:
            out = torch.where(m[:, None], out, flat)
            idx = torch.where(m[:, None], idx, idx.new_full((), -1))
            dist = torch.where(m[:, None], dist, dist.new_zeros(()))
        out = out.reshape(*lead, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1).contiguous()
        indices = idx.reshape(*lead, self.num_quantizers)
        ret = (out, indices, loss)
        if return_distances:
            ret = ret + (dist.reshape(*lead, self.num_quantizers),)
        if return_all_codes:
            ret = ret + (self.get_codes_from_indices(indices),)
        return ret
