"""Correctness: every result is checked against the float64 oracle (design.md §3)
before it may post a time."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .inputs import BETA, Inputs

GRAD_RTOL = 1e-4


@dataclass
class CheckResult:
    ok: bool
    detail: str
    na: bool = False  # nothing to check (a ceiling row: a product, not a search)

    @property
    def label(self) -> str:
        return "n/a" if self.na else "pass" if self.ok else "FAIL"


def unit_roundoff(device, dtype=torch.float32) -> float:
    """u of the products actually used (design.md §3)."""
    if dtype == torch.bfloat16:
        return 2.0**-8
    if dtype == torch.float16:
        return 2.0**-11
    if dtype == torch.float64:
        return 0.0
    if torch.device(device).type == "cpu":
        return 0.0
    prec = torch.get_float32_matmul_precision()
    return {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}.get(prec, 2.0**-11)


def mode_roundoff(mode: str) -> float:
    """u of design.md §3 for a precision mode of presets.MODES: 0 for exact fp32 products
    (CPU, or CUDA at matmul precision 'highest'), 2^-11 for tf32 and fp16, 2^-8 for bf16."""
    return {"fp32": 0.0, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}[mode]


# Normwise relative tolerance of the layer's gradients against float64 autograd, per
# precision mode (fp32 accumulation; tf32 products; results rounded to fp16 / bf16).
GRAD_RTOLS = {"fp32": GRAD_RTOL, "tf32": 2e-3, "fp16": 4e-3, "bf16": 1.6e-2}


def accumulation_term(d: int) -> float:
    """a(d) = max(1e-6, 4 sqrt(d) 2^-24) of design.md §3: the float32 accumulation error
    allowed, which grows with the length of the sums (and differs between BLAS builds)."""
    return max(1e-6, 4.0 * math.sqrt(max(int(d), 0)) * 2.0**-24)


def _codes64_from_codebook(codebook):
    def tile(k0, k1):
        return codebook[k0:k1].double()
    return tile


def _codes64_from_params(basis, weight, bias):
    w64, b64 = weight.double(), bias.double()

    def tile(k0, k1):
        return torch.addmm(b64, basis[k0:k1].double(), w64.t())
    return tile


def check_nearest(z, codes64: Callable, k: int, idx, dist=None, *, u: float = 0.0,
                  rows=None, tile_k: int = 8192) -> CheckResult:
    """design.md §3 criterion for picks ``idx`` (and distances ``dist``) of tokens ``z``.

    ``codes64(k0, k1)`` returns codes k0..k1-1 in float64 (so the full float64 codebook is
    never held at once); ``rows`` selects the tokens checked against all K codes (None =
    all). No N x K float64 matrix is built: memory is O(len(rows) * tile_k). The oracle
    runs on ``z``'s device (float64 on a GPU too), so full-size GPU checks stay fast.
    """
    n = z.shape[0]
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or \
            tuple(idx.shape) != (n,):
        return CheckResult(False, f"indices must be int64 of shape ({n},), got "
                           f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
    if n == 0:
        return CheckResult(True, "empty")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= k:
        return CheckResult(False, f"indices out of range [{lo}, {hi}] for K={k}")
    dev = z.device
    rows = torch.arange(n, device=dev) if rows is None else rows.to(dev)
    z64 = z.detach()[rows].double()
    pick = idx.detach().to(dev)[rows]
    best = torch.full((len(rows),), math.inf, dtype=torch.float64, device=dev)
    best_idx = torch.zeros(len(rows), dtype=torch.long, device=dev)
    zn = (z64 * z64).sum(1)
    qmax2 = 0.0
    for k0 in range(0, k, tile_k):
        q = codes64(k0, min(k, k0 + tile_k)).to(dev)
        qn = (q * q).sum(1)
        qmax2 = max(qmax2, float(qn.max()))
        dmat = (zn[:, None] + qn[None, :]).addmm_(z64, q.t(), alpha=-2)
        v, i = dmat.min(1)
        better = v < best
        best = torch.where(better, v, best)
        best_idx = torch.where(better, i + k0, best_idx)
    picked = _gather_codes64(codes64, pick, k, tile_k)
    d_pick = ((z64 - picked) ** 2).sum(1)
    eps = (4 * u * zn.sqrt() * math.sqrt(qmax2)
           + accumulation_term(z.shape[1]) * (zn + qmax2))
    excess = d_pick - best - eps
    bad = int((excess > 0).sum())
    agree = float((best_idx == pick).double().mean())
    detail = f"{len(rows)} rows vs all {k} codes; index agreement {agree:.4f}"
    if bad:
        j = int(excess.argmax())
        return CheckResult(False, f"{bad}/{len(rows)} picks outside eps (worst excess "
                           f"{float(excess[j]):.3g}, eps {float(eps[j]):.3g}); {detail}")
    if dist is not None:
        dd = dist.detach().to(dev)[rows].double()
        derr = (dd - d_pick).abs() - eps
        nbad = int((derr > 0).sum())
        if nbad:
            return CheckResult(False, f"{nbad}/{len(rows)} distances off by more than eps "
                               f"(worst {float(derr.max()):.3g} over); {detail}")
        detail += "; distances within eps"
    return CheckResult(True, detail)


def _gather_codes64(codes64, pick, k, tile_k):
    """Float64 codes for the indices ``pick``, built tile by tile."""
    out = torch.empty(len(pick), codes64(0, 1).shape[1], dtype=torch.float64,
                      device=pick.device)
    for k0 in range(0, k, tile_k):
        sel = (pick >= k0) & (pick < k0 + tile_k)
        if bool(sel.any()):
            q = codes64(k0, min(k, k0 + tile_k)).to(pick.device)
            out[sel] = q[pick[sel] - k0]
    return out


def oracle_layer_grads(inp: Inputs, idx, beta: float = BETA) -> dict:
    """dz, dW, db of ``loss + sum(out * g)`` by autograd through the float64 reference,
    at the picks ``idx`` (so near-ties cannot make the comparison fail). On the inputs'
    device, in float64."""
    z = inp.z.detach().double().requires_grad_(True)
    w = inp.weight.detach().double().requires_grad_(True)
    b = inp.bias.detach().double().requires_grad_(True)
    rows = inp.basis.detach().index_select(0, idx.detach().to(inp.basis.device)).double()
    zq = torch.nn.functional.linear(rows, w, b)
    # the official loss and estimator, written out (independent of the layer's code)
    loss = beta * torch.mean((zq.detach() - z) ** 2) + torch.mean((zq - z.detach()) ** 2)
    out = z + (zq - z).detach()
    (loss + (out * inp.g_out.detach().double()).sum()).backward()
    return {"z": z.grad, "weight": w.grad, "bias": b.grad}


def check_grads(grads: dict, ref: dict, rtol: float = GRAD_RTOL) -> CheckResult:
    """Normwise relative error ||g - g64|| / ||g64|| <= rtol for each gradient."""
    worst = []
    for name, r in ref.items():
        g = grads.get(name)
        if g is None:
            return CheckResult(False, f"no gradient for {name}")
        g = g.detach().to(r.device).double().reshape(r.shape)
        err = float((g - r).norm() / r.norm().clamp_min(1e-300))
        worst.append(f"d{name} {err:.1e}")
        if not err <= rtol:
            return CheckResult(False, f"d{name} relative error {err:.3g} > {rtol:g}")
    return CheckResult(True, "grads vs float64 autograd: " + ", ".join(worst))


def check_rows_for(n: int, check_rows: int, seed: int = 0):
    """All rows when N <= check_rows, else a fixed random subset of check_rows."""
    if n <= check_rows:
        return None
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randperm(n, generator=g)[:check_rows].sort().values


def check_output(op: str, inp: Inputs, out: dict, *, u: float, check_rows: int,
                 seed: int = 0) -> CheckResult:
    """Checks one provider's output dict (idx, dist, grads) for ``op`` on ``inp``."""
    s = inp.shape
    if out.get("na"):
        return CheckResult(True, out["na"], na=True)
    rows = check_rows_for(s.n, check_rows, seed)
    if op == "fwd":
        return check_nearest(inp.z, _codes64_from_codebook(inp.codebook), s.k, out["idx"],
                             out.get("dist"), u=u, rows=rows)
    res = check_nearest(inp.z, _codes64_from_params(inp.basis, inp.weight, inp.bias), s.k,
                        out["idx"], None, u=u, rows=rows)
    if not res.ok:
        return res
    if out.get("grads") is None:
        return CheckResult(True, res.detail + "; " + out.get("grad_note", "grads not compared"))
    g = check_grads(out["grads"], oracle_layer_grads(inp, out["idx"]), GRAD_RTOLS[inp.mode])
    return CheckResult(g.ok, res.detail + "; " + g.detail)
