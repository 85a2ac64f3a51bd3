"""Codebook usage statistics over a stream of batches."""
from __future__ import annotations

import math

import torch


class CodebookUsage:
    """Counts how often each code is picked, over any number of batches.

    >>> usage = CodebookUsage(codebook_size=1024)
    >>> usage.update(indices)          # any shape of int64 indices, any device
    >>> usage.utilisation(), usage.perplexity()

    ``utilisation`` is the fraction of codes picked at least once; ``perplexity`` is
    exp(entropy) of the empirical code distribution (K when all codes are equally used,
    1 when one code takes everything).
    """

    def __init__(self, codebook_size: int, device=None):
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"`codebook_size` must be a positive int, got {codebook_size!r}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def reset(self):
        self.counts.zero_()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, mask: torch.Tensor | None = None):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError("`indices` must be an integer tensor")
        flat = indices.reshape(-1)
        if mask is not None:
            if mask.shape != indices.shape:
                raise ValueError(f"`mask` has shape {tuple(mask.shape)} but `indices` has "
                                 f"{tuple(indices.shape)}")
            flat = flat[mask.reshape(-1).to(torch.bool)]
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"`indices` must lie in [0, {self.codebook_size})")
        # validate before touching the counts, so a bad batch changes nothing
        self.counts = self.counts.to(flat.device)
        self.counts += torch.bincount(flat.long(), minlength=self.codebook_size)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def utilisation(self) -> float:
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        total = self.total
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return float(math.exp(float(-(p * p.log()).sum())))

    def summary(self) -> dict:
        return {"utilisation": self.utilisation(), "perplexity": self.perplexity(),
                "used": int((self.counts > 0).sum()), "codebook_size": self.codebook_size,
                "tokens": self.total}


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict:
    """One-shot utilisation/perplexity/counts of ``indices``."""
    u = CodebookUsage(codebook_size, device=indices.device).update(indices)
    out = u.summary()
    out["counts"] = u.counts
    return out


# ------------------------------------------------------------ distributed training

def all_reduce_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sum per-code ``counts`` over the ranks of ``group`` (torch.distributed, any
    backend) and return the result; ``counts`` itself is not modified. A collective:
    every rank of the group must call it. Without an initialised process group (or with
    one rank) it returns a copy."""
    import torch.distributed as dist

    out = counts.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def sync_codebook_usage(usage: CodebookUsage, group=None) -> CodebookUsage:
    """A new :class:`CodebookUsage` holding the counts of ``usage`` summed over the
    ranks of ``group`` -- the statistics of the global batch stream (the official
    SimVQ code reports per-process counts). A collective: call it on every rank. The
    per-rank ``usage`` is left unchanged, so it can keep accumulating."""
    out = CodebookUsage(usage.codebook_size, device=usage.counts.device)
    out.counts = all_reduce_counts(usage.counts, group=group)
    return out
