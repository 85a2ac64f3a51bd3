"""Held-out utilisation as a curve over the number of held-out tokens per code.

"Utilisation" counts the codes picked at least once by n held-out tokens. With a
skewed code histogram, n = 10 tokens per code misses codes that are alive but rare: a
code picked with probability p is missed by n independent tokens with probability
(1 - p)^n. To tell sampling from dead codes, each point of the curve is reported with

- the observed utilisation of the first n tokens (a prefix of one random stream, so
  the curve is what a larger held-out set adds);
- the perplexity of those n tokens' histogram;
- ``expected_seen``: the fraction of the K codes that n independent draws from the
  histogram ``p`` of the *largest* set are expected to pick,
  ``(1/K) * sum_k 1 - (1 - p_k)^n``. If the observed curve follows it, the gap to
  100% at small n is sampling; the codes the largest set never picked (p_k = 0) stay
  out at every n, and are dead as far as this data can tell;
- for the largest set, the Good-Turing estimate of the probability mass of the codes
  it did not pick (singletons / n) and the Chao1 lower-bound estimate of the number of
  codes in use, ``used + f1^2 / (2 f2)`` (f1, f2: codes picked once, twice).
"""
from __future__ import annotations

import math

import torch


def histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts (K,) int64 of the indices (any shape, values in [0, K))."""
    idx = indices.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size})")
    return torch.bincount(idx, minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the histogram ``counts``."""
    total = float(counts.sum())
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(torch.exp(-(p * p.log()).sum()))


def expected_seen_fraction(p: torch.Tensor, n: float) -> float:
    """Expected fraction of the ``len(p)`` codes picked at least once by ``n``
    independent draws from the distribution ``p``: ``mean_k 1 - (1 - p_k)^n``."""
    p = p.double()
    if p.numel() == 0:
        raise ValueError("`p` must not be empty")
    if bool((p < 0).any()) or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-5):
        raise ValueError("`p` must be a probability vector (non-negative, sums to 1)")
    missed = torch.exp(n * torch.log1p(-p.clamp(max=1.0)))  # (1 - p)^n, 0 where p = 1
    return float((1.0 - missed).mean())


def chao1(counts: torch.Tensor) -> float:
    """Chao1 estimate of the number of classes: S_obs + f1^2 / (2 f2), or the
    bias-corrected S_obs + f1 (f1 - 1) / 2 when f2 = 0."""
    s_obs = int((counts > 0).sum())
    f1, f2 = int((counts == 1).sum()), int((counts == 2).sum())
    if f2 > 0:
        return s_obs + f1 * f1 / (2.0 * f2)
    return s_obs + f1 * (f1 - 1) / 2.0


def utilisation_curve(indices: torch.Tensor, codebook_size: int, token_counts) -> dict:
    """The curve over prefixes of ``indices`` (1-D, in the order they were drawn).

    ``token_counts``: prefix lengths (each <= len(indices)); the histogram p of the
    whole of ``indices`` gives the expected fractions. Returns ``{"points": [...],
    "full": {...}}``: per point n, tokens per code, codes used, utilisation,
    perplexity and ``expected_seen``; for the whole set also Good-Turing's unseen mass
    and Chao1."""
    idx = indices.reshape(-1)
    total = idx.numel()
    if total == 0:
        raise ValueError("no indices")
    full = histogram(idx, codebook_size)
    p = full.double() / total
    points = []
    for n in sorted(int(n) for n in token_counts):
        if not 0 < n <= total:
            raise ValueError(f"prefix length {n} outside (0, {total}]")
        c = full if n == total else histogram(idx[:n], codebook_size)
        used = int((c > 0).sum())
        points.append({"tokens": n, "tokens_per_code": n / codebook_size, "used": used,
                       "utilisation": used / codebook_size, "perplexity": perplexity(c),
                       "expected_seen": expected_seen_fraction(p, n)})
    f1 = int((full == 1).sum())
    used_full = int((full > 0).sum())
    return {"points": points,
            "full": {"tokens": total, "tokens_per_code": total / codebook_size,
                     "used": used_full, "utilisation": used_full / codebook_size,
                     "perplexity": perplexity(full), "singletons": f1,
                     "doubletons": int((full == 2).sum()),
                     "good_turing_unseen_mass": f1 / total,
                     "chao1_codes": chao1(full),
                     "chao1_utilisation": min(1.0, chao1(full) / codebook_size)}}
