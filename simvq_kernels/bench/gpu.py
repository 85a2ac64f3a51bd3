"""GPU acceptance: ``python -m simvq_kernels.bench --preset gpu``.

On one GPU, in one call:

(a) the accuracy sweep: every GPU backend ('cuda', 'triton': whichever serves the
    device) against the float64 oracle at full size, N = 16384 tokens, K in {1024, 16384,
    262144}, d in {32, 128, 512}, in bf16, tf32 and fp32 (matmul precision 'highest'):
    the search (picks and distances of sampled tokens against all K codes, design.md §3)
    and the SimVQ layer's forward and gradients (dz, dW, db against float64 autograd at
    the backend's own picks). One child process per backend.
(b) timed rows (the preset's cases, in this order): the headline shapes, N = 16384 x
    K = 262144 x d = 128 and (c) N = 262144 x K = 262144 x d = 128 in bf16 with its peak
    memory (the reference would need 256 GiB for its distance matrix), next to the
    same-shape cuBLAS product into a preallocated output; the other forward and
    training-step (layer fwd+bwd) rows; then the peers on the same inputs: the kernels
    that set the bar, flash-kmeans' and flashlib's Triton assignment kernels
    (gpu_peers.py), then the reference formula, torch.cdist + argmin,
    vector-quantize-pytorch and faiss-gpu where importable; and the tensor-core ceiling
    (cuBLAS 8192^3 in each precision mode), reporting % of ceiling;
(d) CSV, markdown and plot (and the sweep's CSV) with card, driver, versions and commit.

``--dry-run`` runs the same logic on tiny shapes (the 'gpu-dry' preset), on the CPU when
there is no GPU: the 'cpu' backend, and 'triton' under TRITON_INTERPRET=1, stand in for
the GPU backends, and with SIMVQ_BENCH_PEER_STAND_INS=1 (run.sh's dry run) the stand-ins
of benchmarks/gpu/standins for flash-kmeans and flashlib. That is how CI tests this file
without a GPU.
"""
from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .checks import CheckResult, check_output, mode_roundoff
from .inputs import make_inputs
from .presets import MODES, Case, Shape

GPU_BACKENDS = ("cuda", "triton")
# On a CPU (dry run) these stand in for the GPU backends.
STAND_INS = ("cpu", "triton")


@dataclass(frozen=True)
class Sweep:
    """The accuracy sweep of a preset: every (K, d, mode) at N tokens, per GPU backend;
    ``rows`` tokens (sampled) are checked against all K codes in float64. ``budget``
    (seconds, 0 = none): no part starts once the sweep has run that long, so that the
    timed rows after it keep their time; parts not run are reported as such."""

    n: int
    ks: tuple
    ds: tuple
    modes: tuple
    rows: int = 512
    layer: bool = True
    budget: float = 0.0

    def backends(self, providers, device) -> list:
        want = GPU_BACKENDS if torch.device(device).type == "cuda" else STAND_INS
        return [b for b in want if b in providers]

    def steps(self, providers, device) -> int:
        return len(self.backends(providers, device)) * len(self.ks)

    def run(self, providers, device, *, case_timeout: float, seed: int = 0,
            bar=None) -> "SweepResult":
        """One child process per (backend, K), K by K (every backend's small-K parts
        before any large-K part): a crash or a hang costs that part only, and each part
        stays well inside ``case_timeout``."""
        from .child import run_in_child

        result = SweepResult(self)
        backends = self.backends(providers, device)
        start = time.perf_counter()
        for k in self.ks:
            for b in backends:
                if bar is not None:
                    bar.set_postfix_str(f"accuracy sweep: {b} K={k}")
                t0 = time.perf_counter()
                if self.budget and t0 - start >= self.budget:
                    result.skipped.append(f"{b} K={k}: not run (the sweep's {self.budget:g} "
                                          "s were spent)")
                    if bar is not None:
                        bar.update(1)
                    continue
                part = dict(asdict(self), ks=(k,))
                out = run_in_child({"op": "sweep", "provider": b, "device": str(device),
                                    "seed": seed, "sweep": part, "threads": None},
                                   case_timeout)
                if out["status"] == "ok":
                    result.records += out["records"]
                else:
                    why = out.get("error") or out.get("reason")
                    result.errors.append(f"{b} K={k}: the sweep did not finish "
                                         f"({time.perf_counter() - t0:.0f} s): {why}")
                if bar is not None:
                    bar.update(1)
        result.backends += backends
        return result


def sweep_in_child(spec: dict) -> dict:
    """Body of one backend's sweep (in its own child process)."""
    from .providers import build_runner

    sw = Sweep(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["sweep"].items()})
    backend, device, seed = spec["provider"], torch.device(spec["device"]), spec["seed"]
    records = []
    for k in sw.ks:
        for d in sw.ds:
            shape = Shape(sw.n, k, d)
            for mode in sw.modes:
                torch.set_float32_matmul_precision(MODES[mode][1])
                inp = make_inputs(shape, device, seed, mode)
                ops = ("fwd", "layer") if sw.layer else ("fwd",)
                for op in ops:
                    t0 = time.perf_counter()
                    try:
                        runner = build_runner(backend, op, inp)
                        out = runner.output(runner.run())
                        res = check_output(op, inp, out, u=mode_roundoff(mode),
                                           check_rows=sw.rows, seed=seed)
                    except Exception as e:  # a raising kernel is a failed check, reported
                        res = CheckResult(False, f"raised {type(e).__name__}: {e}")
                    records.append({"backend": backend, "n": sw.n, "k": k, "d": d,
                                    "mode": mode, "what": op, "ok": res.ok,
                                    "detail": res.detail,
                                    "seconds": time.perf_counter() - t0})
                del inp
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"status": "ok", "records": records}


@dataclass
class SweepResult:
    sweep: Sweep
    records: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    backends: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # parts not started (the sweep's budget)

    def _by_backend(self):
        out = {}
        for r in self.records:
            out.setdefault(r["backend"], []).append(r)
        return out

    def targets(self) -> list:
        sw = self.sweep
        lines = []
        by = self._by_backend()
        for b in self.backends:
            recs = by.get(b, [])
            want = len(sw.ks) * len(sw.ds) * len(sw.modes) * (2 if sw.layer else 1)
            good = sum(r["ok"] for r in recs)
            lines.append((f"{b}: accuracy sweep vs the float64 oracle (N={sw.n}, K in "
                          f"{list(sw.ks)}, d in {list(sw.ds)}, {'/'.join(sw.modes)}; search "
                          f"{'and layer gradients' if sw.layer else 'only'}) passes",
                          f"{good}/{want} checks", "met" if good == want else "MISSED"))
        return lines

    def failures(self) -> list:
        return [r for r in self.records if not r["ok"]]

    def text(self) -> str:
        sw = self.sweep
        lines = [f"accuracy sweep (N={sw.n}, {sw.rows} sampled tokens vs all K codes in "
                 "float64; layer: dz, dW, db vs float64 autograd):"]
        for b, recs in self._by_backend().items():
            for mode in sw.modes:
                rs = [r for r in recs if r["mode"] == mode]
                good = sum(r["ok"] for r in rs)
                secs = sum(r["seconds"] for r in rs)
                lines.append(f"  {b:<8} {mode:<5} {good}/{len(rs)} pass ({secs:.1f} s)")
        for r in self.failures():
            lines.append(f"  FAIL {r['backend']} {r['what']} {r['mode']} "
                         f"{r['n']}x{r['k']}x{r['d']}: {r['detail']}")
        lines += [f"  {e}" for e in self.errors + self.skipped]
        return "\n".join(lines)

    def markdown(self) -> str:
        sw = self.sweep
        md = [f"## Accuracy sweep (N = {sw.n}; {sw.rows} sampled tokens against all K codes "
              "in float64, design.md §3; layer rows: dz, dW, db against float64 autograd)",
              "", "| backend | K | d | mode | search | layer fwd+bwd |",
              "|---|---:|---:|---|---|---|"]
        cells = {}
        for r in self.records:
            cells.setdefault((r["backend"], r["k"], r["d"], r["mode"]), {})[r["what"]] = r
        for (b, k, d, mode), c in cells.items():
            def fmt(r):
                return "-" if r is None else ("pass" if r["ok"] else "**FAIL**")
            md.append(f"| {b} | {k} | {d} | {mode} | {fmt(c.get('fwd'))} | "
                      f"{fmt(c.get('layer'))} |")
        fails = self.failures()
        if fails or self.errors:
            md += ["", "Failures:", ""]
            md += [f"- {r['backend']} {r['what']} {r['mode']} {r['n']}x{r['k']}x{r['d']}: "
                   f"{r['detail']}" for r in fails]
            md += [f"- {e}" for e in self.errors]
        if self.skipped:
            md += ["", "Not run:", ""] + [f"- {e}" for e in self.skipped]
        return "\n".join(md)

    def write_csv(self, path: str) -> None:
        fields = ("backend", "n", "k", "d", "mode", "what", "ok", "detail", "seconds")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in self.records:
                w.writerow({k: r.get(k) for k in fields})


# ------------------------------------------------------------------------ presets

FUSED = GPU_BACKENDS
# the same-shape cuBLAS product: a ceiling, timed with this library's rows
CUBLAS = ("matmul",)
# the kernels that set the bar, on the bf16 forward rows (gpu_peers.py)
KERNEL_PEERS = ("flash-kmeans", "flashlib")
# the other peers of the bf16 forward across K (cdist and faiss-gpu take fp32 only: n/a
# there), of the fp32-input forwards, and of the training step; 'chunked' is what
# backend="auto" runs on a GPU until a GPU backend is validated, so it is timed once per op
BF16_PEERS = ("reference", "chunked", "vq-pytorch")
FP32_PEERS = ("reference", "cdist", "faiss-gpu", "vq-pytorch")
LAYER_PEERS = ("reference", "vq-pytorch")


def gpu_cases(n: int, ks: tuple, d_main: int, ds_other: tuple, k_mid: int, big: Shape,
              stand_ins: tuple = ()) -> tuple:
    """The timed cases of the GPU acceptance (b) and (c), in the order they run (the
    accuracy sweep runs before them), so that a run cut short by its deadline loses the
    least: the headline shapes (N x the largest K x d_main, and ``big``) for this
    library's backends and the same-shape cuBLAS product, then for the kernel peers
    (flash-kmeans, flashlib: same shapes, same inputs); then this library's other
    forward and training-step rows; the kernel peers on those forward shapes; the
    other peers last. ``stand_ins`` are added to the fused backends for a dry run on a
    CPU."""
    fused = tuple(dict.fromkeys(FUSED + stand_ins))
    head = Shape(n, ks[-1], d_main)
    big_note = ("the reference would need "
                f"{big.n * big.k * 4 / 2**30:.0f} GiB for its fp32 distance matrix")
    others_fwd = [*(Shape(n, k, d_main) for k in ks[:-1]),
                  *(Shape(n, k_mid, d) for d in ds_other)]
    cases = [Case(head, "fwd", fused + CUBLAS, mode="bf16"),
             Case(big, "fwd", fused, mode="bf16", memory_check=True, note=big_note),
             Case(head, "fwd", KERNEL_PEERS, mode="bf16"),
             Case(big, "fwd", KERNEL_PEERS, mode="bf16")]
    cases += [Case(s, "fwd", fused + CUBLAS, mode="bf16") for s in others_fwd]
    cases += [Case(Shape(n, k_mid, d_main), "fwd", fused + CUBLAS, mode=m)
              for m in ("tf32", "fp32")]  # fp32 inputs: tf32 and exact products
    layer_ks = tuple(dict.fromkeys((k_mid, ks[-1])))  # the training step (fwd + bwd)
    cases += [Case(Shape(n, k, d_main), "layer", fused, mode="bf16") for k in layer_ks]
    cases.append(Case(Shape(n, k_mid, d_main), "layer", fused, mode="fp32"))
    cases += [Case(s, "fwd", KERNEL_PEERS, mode="bf16") for s in others_fwd]
    cases += [Case(s, "fwd", BF16_PEERS if s.d == d_main else ("reference",), mode="bf16")
              for s in [head, *others_fwd]]
    cases += [Case(Shape(n, k_mid, d_main), "fwd", FP32_PEERS, mode=m)
              for m in ("tf32", "fp32")]
    cases += [Case(Shape(n, k, d_main), "layer",
                   LAYER_PEERS + (("chunked", "vq-pytorch-rot") if k == k_mid else ()),
                   mode="bf16") for k in layer_ks]
    cases.append(Case(Shape(n, k_mid, d_main), "layer", LAYER_PEERS, mode="fp32"))
    return tuple(cases)


# budget: within run.sh's 10-minute call (build, then about 370 s of bench), the sweep
# keeps to about half the bench, leaving the rest to the headline rows and the peers
GPU_SWEEP = Sweep(n=16384, ks=(1024, 16384, 262144), ds=(32, 128, 512),
                  modes=("bf16", "tf32", "fp32"), rows=512, budget=180.0)
GPU_CASES = gpu_cases(16384, (1024, 16384, 262144), 128, (32, 512), 16384,
                      Shape(262144, 262144, 128))
# Defaults for the CLI (flags given on the command line win): no waiting for a quiet
# CPU (the GPU does the work), short timed windows, bounded rows: the whole preset,
# build included, must fit in 8 minutes on one H100/H200.
GPU_DEFAULTS = (("quiet_wait", 0.0), ("contention_retries", 0), ("repeat", 20),
                ("min_time", 0.2), ("case_budget", 10.0), ("case_timeout", 180.0),
                ("check_rows", 512))

DRY_SWEEP = Sweep(n=64, ks=(16, 40), ds=(8, 32), modes=("bf16", "tf32", "fp32"), rows=32)
DRY_CASES = gpu_cases(64, (16, 40), 16, (8,), 16, Shape(128, 64, 16), stand_ins=STAND_INS)
DRY_DEFAULTS = (("quiet_wait", 0.0), ("contention_retries", 0), ("repeat", 2),
                ("min_time", 0.0), ("case_budget", 10.0), ("case_timeout", 300.0),
                ("check_rows", 64))


def dry_run_note(device) -> Optional[str]:
    if torch.device(device).type == "cuda":
        return None
    from .gpu_peers import stand_ins_on

    peers = ("flash-kmeans and flashlib run as CPU stand-ins with their real call "
             "signatures (benchmarks/gpu/standins); other GPU-only peers are skipped"
             if stand_ins_on() else "GPU-only peers are skipped")
    return ("dry run on the CPU: tiny shapes; 'cpu' (and 'triton' under TRITON_INTERPRET=1) "
            f"stand in for the GPU backends; {peers}. Timings mean nothing here; the run "
            "checks the logic.")


def _register() -> None:
    from .presets import PRESETS, Preset

    PRESETS["gpu"] = Preset(
        "gpu", "GPU acceptance on one GPU: every GPU backend vs the float64 oracle at full "
        "size, timings vs peers and ceilings, 262144x262144x128 bf16 (minutes)",
        GPU_CASES, defaults=GPU_DEFAULTS, device="cuda", sweep=GPU_SWEEP, dry_run="gpu-dry")
    PRESETS["gpu-dry"] = Preset(
        "gpu-dry", "the gpu preset's logic on tiny shapes (CPU stand-ins; for CI)",
        DRY_CASES, hidden=True, defaults=DRY_DEFAULTS, sweep=DRY_SWEEP)


_register()
