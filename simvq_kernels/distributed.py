"""SimVQ on torch.distributed: data parallel, synchronised usage, a codebook-sharded search.

Everything here uses torch.distributed collectives (any backend: gloo on CPU, NCCL on
GPUs); there is no transport of our own.

1. Data parallel (DDP). ``SimVQ`` needs nothing special: wrap the model in
   ``DistributedDataParallel`` as usual. The only trained tensors are ``weight`` and
   ``bias``, whose gradients DDP all-reduces; the basis is a frozen buffer, identical on
   every rank after DDP's initial broadcast and never updated, so nothing else needs
   syncing (``broadcast_buffers=False`` skips DDP's per-step re-broadcast of it, which is
   K x r elements each step). With equal per-rank batches, the loss (a mean over the
   rank's tokens) averaged by DDP equals the single-process loss of the global batch,
   so training matches one process on the global batch up to summation order.

2. Codebook usage. ``SimVQ(track_usage=True).codebook_usage()`` and
   :func:`simvq_kernels.metrics.sync_codebook_usage` sum the per-rank counts with one
   ``all_reduce`` when asked (the official code reports per-process counts).

3. Codebook sharding, for codebooks too large for one device: :class:`ShardedSimVQ`
   (and the bare search :func:`sharded_nearest_code`). Rank p of the group holds the
   contiguous slice of codes [offset_p, offset_p + K_p) (``shard_sizes``, any split,
   even uneven or empty); ``weight`` and ``bias`` are replicated. A forward:

   a. gathers the tokens of all ranks (``all_gather``, padded to the largest rank's
      count), N_total x d;
   b. projects the local basis slice (K_p x d, never K x d) and runs the fused
      nearest-code search of all tokens against it, giving each token a local
      (min distance, argmin) with the lowest local index on ties;
   c. merges: ``all_gather`` of every rank's (distance, global index) per token; the
      winner is the smallest distance, and among equal distances the lowest rank --
      which, because ranks hold ascending slices, is the lowest global index. Every rank
      computes the same merge, so every rank knows every token's winner and its owner;
   d. fetches the winning basis rows B[k*] of its own tokens: each owner writes the rows
      it owns into an N_total x r buffer of zeros and one ``all_reduce(SUM)`` delivers
      them (exact: one non-zero term per row);
   e. zq = B[k*] W^T + b, computed on the token's rank.

   Backward: dW = sum_n g_n B[k*_n]^T and db = sum_n g_n. The contribution of a token
   whose code lives on rank p is, by definition, g_n (x) B[k*_n] -- it needs the owner's
   basis row and the token's gradient. Instead of sending g_n to the owner and reducing
   per-owner partial dW's, the row was brought to the token in step (d), so each rank
   computes its tokens' terms locally (the backward of step e, a gather-GEMM with no
   K x d buffer) and the usual data-parallel all-reduce of W's gradient (DDP) forms the
   same sum: sum over ranks of the token-side partials = sum over owners of the
   owner-side partials. No collective runs in the backward beyond DDP's own, and the
   result equals the single-process gradient of the global batch up to summation order.

   Communication per forward: N_total x (d + 2 world + r) elements; memory per rank:
   K_p x (r + d) for the shard and its projection, N_total x (d + r) for the gathered
   tokens and rows.

   Agreement with one process: each rank searches with the same fused kernel and the
   same precision as the single-process layer, and the merge compares the returned
   squared distances (||z||^2 + ||Q_k||^2 - 2 z.Q_k, rounded once). The indices are
   therefore those of one process's search of the whole codebook, except possibly when
   the best codes of two ranks are within one rounding of the returned distance of
   each other -- a near-tie where either pick meets design.md §3, and where the merge
   takes the lower global index. The tests check exact index equality (2 and 3
   processes; K = 65,537 split unevenly) and the §3 criterion.

   The sharded search runs eagerly (``torch.compiler.disable``: under torch.compile it
   is a graph break; the rest of the layer compiles). Under DDP, tell DDP not to
   broadcast or check the per-rank shards: :func:`ddp_ignore_shards` (model) before
   wrapping.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops, reference
from .backends import select_backend
from .nn import SimVQ, autocast_compute_dtype

__all__ = [
    "ShardedSimVQ",
    "balanced_shard_sizes",
    "ddp_ignore_shards",
    "sharded_nearest_code",
]

_BASIS_CHUNK = 16384  # rows per independently seeded block of the sharded basis


def _require_dist(group=None):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("simvq_kernels.distributed needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def balanced_shard_sizes(codebook_size: int, world_size: int) -> list:
    """K split over ``world_size`` ranks as evenly as possible (the first K % world
    ranks get one code more)."""
    base, extra = divmod(codebook_size, world_size)
    return [base + (1 if p < extra else 0) for p in range(world_size)]


def _all_gather_varlen(t: torch.Tensor, group=None):
    """all_gather of tensors whose first dim differs per rank. Returns (cat, counts)."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    counts = [int(x.item()) for x in ns]
    nmax = max(counts)
    if nmax == 0:
        return t.new_empty((0,) + tuple(t.shape[1:])), counts
    pad = t.new_zeros((nmax,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    bufs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad.contiguous(), group=group)
    return torch.cat([b[:c] for b, c in zip(bufs, counts)]), counts


def _merge_min(dist_local, gidx_local, group=None):
    """Global (min, argmin) over ranks for every token: smallest distance, then lowest
    rank (= lowest global index, ranks holding ascending slices). Returns
    (dist, global idx, owner rank), identical on every rank."""
    world = dist.get_world_size(group)
    ds = [torch.empty_like(dist_local) for _ in range(world)]
    ids = [torch.empty_like(gidx_local) for _ in range(world)]
    dist.all_gather(ds, dist_local.contiguous(), group=group)
    dist.all_gather(ids, gidx_local.contiguous(), group=group)
    D = torch.stack(ds)  # (world, N)
    ID = torch.stack(ids)
    best = D.min(dim=0).values
    owner = (D == best).to(torch.int8).argmax(dim=0)  # the first (lowest) rank at the min
    idx = ID.gather(0, owner[None].long())[0]
    return best, idx, owner


def _local_search(z_all, codebook_shard, backend, check_finite):
    """Each token's (distance, local argmin) over this rank's codes; +inf / -1 if the
    shard is empty."""
    n = z_all.shape[0]
    ddt = torch.float64 if z_all.dtype == torch.float64 else torch.float32
    if codebook_shard.shape[0] == 0:
        return (torch.full((n,), math.inf, dtype=ddt, device=z_all.device),
                torch.full((n,), -1, dtype=torch.long, device=z_all.device), None)
    out = ops.nearest_code_ex(z_all, codebook_shard, backend, check_finite=check_finite)
    return out.distances.to(ddt), out.indices, out.backend


def _shard_offsets(k_local, group, device):
    world = dist.get_world_size(group)
    k = torch.tensor([k_local], dtype=torch.long, device=device)
    ks = [torch.zeros_like(k) for _ in range(world)]
    dist.all_gather(ks, k, group=group)
    sizes = [int(x.item()) for x in ks]
    return [sum(sizes[:p]) for p in range(world)], sizes


def sharded_nearest_code(z, codebook_shard, *, group=None, shard_offset: int | None = None,
                         backend: str = "auto", check_finite=None):
    """Nearest code of this rank's tokens over a codebook split across the ranks.

    A collective: every rank of ``group`` calls it with its own tokens ``z`` (N_p, d)
    (N_p may differ per rank, even be 0) and its own codes ``codebook_shard`` (K_p, d),
    which are the global codes [shard_offset, shard_offset + K_p); by default the shards
    are taken to be consecutive in rank order (offsets found with one all_gather).

    Returns (indices, distances) for this rank's tokens: global int64 indices, ties to
    the lowest global index, and the squared L2 distance (fp32; fp64 for fp64) -- the
    result of :func:`simvq_kernels.nearest_code` on the full codebook.
    """
    world, rank = _require_dist(group)
    if shard_offset is None:
        offsets, _ = _shard_offsets(codebook_shard.shape[0], group, z.device)
        shard_offset = offsets[rank]
    res = _sharded_search(z, codebook_shard, shard_offset, group, backend, check_finite)
    return res["idx"], res["dist"]


def _sharded_search(z, codebook_shard, shard_offset, group, backend, check_finite):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    z_all, counts = _all_gather_varlen(z.detach(), group)
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    ddt = torch.float64 if z.dtype == torch.float64 else torch.float32
    if z_all.shape[0] == 0:
        e = torch.empty(0, dtype=torch.long, device=z.device)
        return dict(idx=e, dist=torch.empty(0, dtype=ddt, device=z.device), owner=e,
                    idx_all=e, owner_all=e, lo=0, hi=0, backend=None)
    d_loc, i_loc, backend_ran = _local_search(z_all, codebook_shard.detach(), backend,
                                              check_finite)
    gidx = torch.where(i_loc >= 0, i_loc + shard_offset, i_loc)
    best, idx, owner = _merge_min(d_loc, gidx, group)
    return dict(idx=idx[lo:hi], dist=best[lo:hi], owner=owner[lo:hi], idx_all=idx,
                owner_all=owner, lo=lo, hi=hi, backend=backend_ran)


def _fetch_rows(basis_shard, shard_offset, idx_all, owner_all, lo, hi, group):
    """The basis rows B[idx] of this rank's tokens [lo, hi) of the gathered list, for
    indices owned by any rank: each owner writes its rows, one all_reduce(SUM)."""
    rank = dist.get_rank(group)
    hold = torch.float64 if basis_shard.dtype == torch.float64 else torch.float32
    R = torch.zeros(idx_all.shape[0], basis_shard.shape[1], dtype=hold,
                    device=basis_shard.device)
    mine = (owner_all == rank).nonzero().flatten()
    if mine.numel():
        R[mine] = basis_shard.index_select(0, idx_all[mine] - shard_offset).to(hold)
    dist.all_reduce(R, op=dist.ReduceOp.SUM, group=group)
    return R[lo:hi].to(basis_shard.dtype)


def ddp_ignore_shards(model: torch.nn.Module) -> list:
    """Mark every ShardedSimVQ shard buffer of ``model`` for DistributedDataParallel to
    ignore (it would otherwise broadcast rank 0's shard over the others'). Call it on the
    module you pass to DDP, before wrapping. Returns the names added."""
    names = [f"{prefix}.basis_shard" if prefix else "basis_shard"
             for prefix, mod in model.named_modules() if isinstance(mod, ShardedSimVQ)]
    have = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = have + [n for n in names if n not in have]
    return names


class ShardedSimVQ(SimVQ):
    """SimVQ with the codebook split across the ranks of a torch.distributed group
    (see the module docstring for the algorithm and the backward).

    Construct it on every rank of ``group`` (a collective) with the same arguments as
    :class:`SimVQ`, plus

    - ``group``: the process group (default: the world);
    - ``shard_sizes``: codes per rank, summing to ``codebook_size`` (default
      :func:`balanced_shard_sizes`); rank p holds codes [offset_p, offset_p + K_p);
    - ``seed``: the basis seed. The basis is drawn in independently seeded blocks of
      rows, so each rank draws only the blocks overlapping its slice and the full basis
      does not depend on the split; default: drawn from rank 0's torch RNG and
      broadcast. ``weight`` and ``bias`` are broadcast from rank 0 at construction.

    ``basis_shard`` (K_p, r) is this rank's slice (the state dict holds it under that
    name); :attr:`codebook` is this rank's projected slice (K_p, dim). ``load_state_dict``
    also takes a full SimVQ state dict (ours, the official layout or
    vector-quantize-pytorch's) and keeps this rank's slice; :meth:`full_state_dict`
    (a collective) gathers a full ``SimVQ`` state dict; :meth:`indices_to_codes` is a
    collective too. The forward returns global indices, as ``SimVQ`` does.
    """

    def __init__(self, dim: int, codebook_size: int, basis_dim: int | None = None,
                 bias: bool = True, beta: float = 0.25, legacy: bool = False,
                 channel_first: bool = False, backend: str = "auto", *,
                 rotation_trick: bool = False, track_usage: bool = False, group=None,
                 shard_sizes=None, seed: int | None = None):
        world, rank = _require_dist(group)
        if shard_sizes is None:
            shard_sizes = balanced_shard_sizes(codebook_size, world)
        shard_sizes = [int(s) for s in shard_sizes]
        if len(shard_sizes) != world or any(s < 0 for s in shard_sizes) or \
                sum(shard_sizes) != codebook_size:
            raise ValueError(f"`shard_sizes` must give {world} non-negative counts summing "
                             f"to codebook_size={codebook_size}, got {shard_sizes}")
        self._pending = dict(group=group, world=world, rank=rank, sizes=shard_sizes,
                             seed=seed)
        super().__init__(dim, codebook_size, basis_dim, bias, beta, legacy, channel_first,
                         backend, rotation_trick=rotation_trick, track_usage=track_usage)
        del self._pending
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for p in (self.weight, self.bias):
                if p is not None:
                    dist.broadcast(p.data, src=src, group=group)

    def _init_basis(self, codebook_size, r):
        pend = self._pending
        self.group = pend["group"]
        self.world_size, self.rank = pend["world"], pend["rank"]
        self.shard_sizes = pend["sizes"]
        self.shard_start = sum(self.shard_sizes[: self.rank])
        self.shard_end = self.shard_start + self.shard_sizes[self.rank]
        seed = pend["seed"]
        if seed is None:
            s = torch.randint(0, 2**62, (1,), dtype=torch.long)
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(s, src=src, group=self.group)
            seed = int(s.item())
        self.seed = int(seed)
        self.register_buffer("basis_shard", self._draw_rows(self.shard_start, self.shard_end,
                                                            codebook_size, r))

    def _draw_rows(self, start, end, k, r):
        parts = []
        c0, c1 = start // _BASIS_CHUNK, -(-end // _BASIS_CHUNK)
        for c in range(c0, c1):
            b0 = c * _BASIS_CHUNK
            rows = min(_BASIS_CHUNK, k - b0)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + c) % (2**63))
            block = torch.randn(rows, r, generator=g) * r**-0.5
            parts.append(block[max(start, b0) - b0: min(end, b0 + rows) - b0])
        return torch.cat(parts) if parts else torch.empty(0, r)

    def extra_repr(self):
        return (super().extra_repr() + f", shard=[{self.shard_start}, {self.shard_end}) of "
                f"{self.codebook_size} on rank {self.rank}/{self.world_size}")

    @classmethod
    def from_simvq(cls, layer: SimVQ, *, group=None, shard_sizes=None):
        """A sharded copy of a single-process ``layer`` (same hyper-parameters and
        weights; this rank keeps its slice of the basis). A collective."""
        out = cls(layer.dim, layer.codebook_size, layer.basis_dim, layer.bias is not None,
                  layer.beta, layer.legacy, layer.channel_first, layer.backend,
                  rotation_trick=layer.rotation_trick, track_usage=layer.track_usage,
                  group=group, shard_sizes=shard_sizes, seed=0)
        out.load_state_dict(layer.state_dict())
        return out.to(layer.weight.device)

    # ---------------------------------------------------------------- codebook
    @property
    def codebook(self) -> torch.Tensor:
        """This rank's slice of the projected codebook, (K_p, dim): codes
        [shard_start, shard_end)."""
        return reference.project_codebook(self.basis_shard, self.weight, self.bias)

    def _full_basis(self):
        full, _ = _all_gather_varlen(self.basis_shard, self.group)
        return full

    def full_state_dict(self) -> dict:
        """A state dict for a single-process :class:`SimVQ` (full basis). A collective."""
        out = {"basis": self._full_basis().detach().clone(),
               "weight": self.weight.detach().clone()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out

    def _decode_rows(self, flat_idx):
        idx = flat_idx.long().to(self.basis_shard.device)
        idx_all, counts = _all_gather_varlen(idx, self.group)
        lo = sum(counts[: self.rank])
        hi = lo + counts[self.rank]
        bounds = torch.tensor([sum(self.shard_sizes[: p + 1]) for p in range(self.world_size)],
                              device=idx_all.device)
        owner = torch.bucketize(idx_all, bounds, right=True)
        rows = _fetch_rows(self.basis_shard, self.shard_start, idx_all, owner, lo, hi,
                           self.group)
        return F.linear(rows, self.weight, self.bias)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """As :meth:`SimVQ.indices_to_codes` (global indices); a collective: every rank
        of the group calls it (with its own indices, possibly none)."""
        return super().indices_to_codes(indices)

    # ----------------------------------------------------------------- search
    def _trains_fused(self, flat) -> bool:
        # the training step goes through the sharded search below (a collective), never
        # the single-device fused step
        return False

    @torch.compiler.disable
    def _search(self, zs):
        cdt = autocast_compute_dtype(zs)
        sdt = cdt or zs.dtype
        pdt = reference.compute_dtype(sdt)
        dev = zs.device.type
        ctx = torch.autocast(dev, enabled=False) if cdt is not None else _nullcontext()
        with ctx:
            with torch.no_grad():
                # the same precision as the fused op: parameters in the search dtype,
                # projected and searched in fp32 (fp64 for fp64)
                b = None if self.bias is None else self.bias.to(sdt).to(pdt)
                q_shard = reference.project_codebook(self.basis_shard.to(sdt).to(pdt),
                                                     self.weight.to(sdt).to(pdt), b)
                res = _sharded_search(zs.to(sdt).to(pdt), q_shard, self.shard_start,
                                      self.group, self.backend, None)
            rows = _fetch_rows(self.basis_shard, self.shard_start, res["idx_all"],
                               res["owner_all"], res["lo"], res["hi"], self.group)
            zq = F.linear(rows, self.weight, self.bias)
        if cdt is None:
            zq = zq.to(zs.dtype)
        # an empty shard (or no tokens anywhere) runs no search here: report the
        # backend that would have served it
        backend = res["backend"] or select_backend(self.backend, zs.device, pdt)
        return zq, res["idx"], res["dist"], backend

    def _encode_flat(self, flat):
        """``encode``: the sharded search (a collective; no cached codebook)."""
        self._check_dtype(flat)
        _, idx, _, backend = self._search(flat)
        self.last_backend = backend
        return idx

    # ------------------------------------------------------------ state dicts
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Takes a sharded state dict (``basis_shard``: this rank's slice, as saved by
        this rank) or a full one (``basis`` (K, r), or a foreign layout), keeping this
        rank's slice of the latter."""
        self._remap_foreign(state_dict, prefix)
        key = prefix + "basis"
        if key in state_dict:
            full = state_dict.pop(key)
            if full.dim() != 2 or full.shape[0] != self.codebook_size:
                error_msgs.append(f"{key}: expected a full basis of {self.codebook_size} "
                                  f"rows, got shape {tuple(full.shape)}")
            else:
                state_dict[prefix + "basis_shard"] = full[self.shard_start: self.shard_end]
        torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata,
                                              strict, missing_keys, unexpected_keys,
                                              error_msgs)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
