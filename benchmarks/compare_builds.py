#!/usr/bin/env python
"""Two builds of the CPU kernels side by side (the search by default; --op step or
backward for the training step or the backward ops): each round runs one child process
per build, alternately, on the same inputs; each child times ``nearest_code`` (backend
``cpu``, best of ``--repeat``) and the FMA peak of the ISA in use, so a drift of the
machine's speed between rounds hits both builds alike. Reports per shape the median over
rounds of each build's time and % of peak, and the median of the per-round ratios.

``--op step`` times the training step instead, as the bench's ``layer fwd+bwd`` rows do:
a float32 ``SimVQ`` layer (backend ``cpu``) forward and the backward of
``loss + sum(out * g)``, channel-last and channel-first (the tokens as (N/256, d, 16, 16)
images), next to the bare search of the layer's codebook; per build the times and the
step / search ratios, and the A / B ratio of each.

    git worktree add /tmp/simvq-old <commit> && (cd /tmp/simvq-old && \\
        SIMVQ_BUILD_CUDA=0 python setup.py build_ext --inplace)
    python benchmarks/compare_builds.py /tmp/simvq-old . --rounds 5 --markdown out.md
    SIMVQ_CPU_ISA=avx2 python benchmarks/compare_builds.py /tmp/simvq-old . ...

``--op backward`` times the CPU backward ops alone (``quantize_backward`` and the fused
step's ``quantize_train_backward``, channel-last and channel-first, r = d), with the
grad_weight product's % of the FMA peak.

A build is a directory holding the ``simvq_kernels`` package with its extension built
in place. Both children get the same environment (SIMVQ_CPU_ISA and friends apply).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

# what every child starts with: the arguments (shapes, repeat, threads) and best-of timing
PRELUDE = r"""
import json, sys, time, torch
import simvq_kernels as sk
shapes, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
def best(f, n):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return min(ts)
"""

# what the search and backward children measure first: the FMA peak of the ISA in use
PEAK = r"""
from simvq_kernels import _ext
_ext.load()
isa = json.loads(torch.ops.simvq.cpu_kernel_config())["isa"]
lanes = {"avx512": 16, "avx2": 8}.get(isa, 1)
it = 2_000_000
peak = 2 * 12 * lanes * it * torch.get_num_threads() / best(
    lambda: torch.ops.simvq.fma_peak(isa, it), 5) / 1e9
"""

CHILD = PRELUDE + PEAK + r"""
out = {"isa": isa, "peak": peak, "ms": []}
for n, k, d in shapes:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    q = torch.randn(k, d, generator=g)
    out["ms"].append(1e3 * best(lambda: sk.nearest_code(z, q, backend="cpu"), repeat))
print(json.dumps(out))
"""

STEP_CHILD = PRELUDE + r"""
def cf(t):  # (N, d) -> (N / 256, d, 16, 16), contiguous
    return t.reshape(-1, 16, 16, t.shape[1]).permute(0, 3, 1, 2).contiguous()
out = {"ms": []}
for n, k, d in shapes:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    up = torch.randn(n, d, generator=g) * 1e-3
    row = {}
    for name, first in (("step", False), ("step_cf", True)):
        torch.manual_seed(0)
        layer = sk.SimVQ(d, k, backend="cpu", channel_first=first)
        x = (cf(z) if first else z.clone()).requires_grad_(True)
        u = cf(up) if first else up
        params = (x, layer.weight, layer.bias)
        def step():
            for p in params:
                p.grad = None
            o, _, loss = layer(x)
            (loss + (o * u).sum()).backward()
        row[name] = 1e3 * best(step, repeat)
    with torch.no_grad():
        q = (layer.basis @ layer.weight.t() + layer.bias).contiguous()
    row["search"] = 1e3 * best(lambda: sk.nearest_code(z, q, backend="cpu"), repeat)
    out["ms"].append(row)
print(json.dumps(out))
"""

BACKWARD_CHILD = PRELUDE + PEAK + r"""
op = torch.ops.simvq
def cf(t):  # (N, d) -> (N / 256, d, 256), contiguous
    return t.reshape(-1, 16, 16, t.shape[1]).permute(0, 3, 1, 2).contiguous().reshape(
        -1, t.shape[1], 256)
out = {"isa": isa, "peak": peak, "ms": []}
for n, k, d in shapes:
    g0 = torch.Generator().manual_seed(0)
    r = d
    z, up = torch.randn(n, d, generator=g0), torch.randn(n, d, generator=g0)
    basis = torch.randn(k, r, generator=g0) * r ** -0.5
    weight, bias = torch.randn(d, r, generator=g0), torch.randn(d, generator=g0)
    q = (basis @ weight.t() + bias).contiguous()
    idx = torch.randint(0, k, (n,), generator=g0)
    zc, uc = cf(z), cf(up)
    out["ms"].append({
        "dw": 1e3 * best(lambda: op.quantize_backward(up, basis, idx, weight), repeat),
        "train": 1e3 * best(lambda: op.quantize_train_backward(up, z, basis, q, idx, 0.5,
                                                               0.25), repeat),
        "train_cf": 1e3 * best(lambda: op.quantize_train_backward(uc, zc, basis, q, idx, 0.5,
                                                                  0.25), repeat)})
print(json.dumps(out))
"""

DEFAULT_SHAPES = "16384x1024x64,16384x8192x64,8192x65536x32,4096x16384x256"


def run(build, shapes, repeat, threads, child=CHILD):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(build))
    res = subprocess.run([sys.executable, "-c", child, json.dumps(shapes), str(repeat),
                          str(threads)], capture_output=True, text=True, env=env,
                         cwd=os.path.abspath(build), timeout=1800)
    if res.returncode != 0:
        sys.exit(f"the child for {build} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="directory of build A (the baseline)")
    p.add_argument("b", help="directory of build B")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxKxd,...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5, help="calls per timing (best of)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--markdown", help="write the table here too")
    p.add_argument("--op", choices=("search", "step", "backward"), default="search",
                   help="the bare search (default), the layer's training step, or the "
                        "CPU backward ops alone")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.op in ("step", "backward") and any(n % 256 for n, _, _ in shapes):
        p.error(f"--op {args.op} lays the tokens out as 16 x 16 images: N must be a "
                "multiple of 256")
    child = {"search": CHILD, "step": STEP_CHILD, "backward": BACKWARD_CHILD}[args.op]
    runs = {"a": [], "b": []}
    for r in range(args.rounds):
        for key, build in (("a", args.a), ("b", args.b)):
            runs[key].append(run(build, shapes, args.repeat, args.threads, child))
            print(f"round {r + 1} {key}: {runs[key][-1]}", file=sys.stderr, flush=True)
    text = {"search": search_table, "step": step_table,
            "backward": backward_table}[args.op](args, shapes, runs)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


def step_table(args, shapes, runs):
    med = statistics.median
    lines = [f"A = `{args.a}`, B = `{args.b}`; training step (float32 SimVQ layer, backend "
             f"cpu, forward + backward of loss + sum(out * g)) and the bare search, "
             f"{args.threads} thread(s), {args.rounds} rounds (A then B each round), best of "
             f"{args.repeat} calls per timing; step / search per round, then the median.", "",
             "| N × K × d | op | A ms | A / search | B ms | B / search | A / B (median of rounds) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for i, (n, k, d) in enumerate(shapes):
        for op in ("search", "step", "step_cf"):
            cols = []
            for key in ("a", "b"):
                cols += [f"{med(x['ms'][i][op] for x in runs[key]):.4g}",
                         f"{med(x['ms'][i][op] / x['ms'][i]['search'] for x in runs[key]):.2f}"]
            ratio = med(a["ms"][i][op] / b["ms"][i][op] for a, b in zip(runs["a"], runs["b"]))
            name = {"search": "search", "step": "step, channel-last",
                    "step_cf": "step, channel-first"}[op]
            lines.append(f"| {n} × {k} × {d} | {name} | " + " | ".join(cols)
                         + f" | {ratio:.2f}× |")
    return "\n".join(lines)


def backward_table(args, shapes, runs):
    med = statistics.median
    isa = runs["b"][0]["isa"]
    lines = [f"A = `{args.a}`, B = `{args.b}`; the CPU backward ops alone (float32, r = d): "
             f"`quantize_backward` (grad_weight and grad_bias of the layer's path) and the "
             f"fused step's `quantize_train_backward` (dz too), channel-last and "
             f"channel-first; ISA {isa}, {args.threads} thread(s), {args.rounds} rounds (A then "
             f"B each round), best of {args.repeat} calls per timing. % peak: the "
             f"2 N d r flops of grad_weight over the time, against the FMA peak measured in "
             f"the same child.", "",
             "| N × K × d | op | A ms | A % peak | B ms | B % peak | A / B (median of rounds) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = {"dw": "quantize_backward", "train": "quantize_train_backward, channel-last",
             "train_cf": "quantize_train_backward, channel-first"}
    for i, (n, k, d) in enumerate(shapes):
        flops = 2 * n * d * d
        for op, name in names.items():
            cols = []
            for key in ("a", "b"):
                pct = med(100 * flops / (x["ms"][i][op] * 1e-3) / 1e9 / x["peak"]
                          for x in runs[key])
                cols += [f"{med(x['ms'][i][op] for x in runs[key]):.4g}", f"{pct:.1f}%"]
            ratio = med(a["ms"][i][op] / b["ms"][i][op] for a, b in zip(runs["a"], runs["b"]))
            lines.append(f"| {n} × {k} × {d} | {name} | " + " | ".join(cols)
                         + f" | {ratio:.2f}× |")
    return "\n".join(lines)


def search_table(args, shapes, runs):
    isa = runs["b"][0]["isa"]
    lines = [f"A = `{args.a}`, B = `{args.b}`; ISA {isa}, {args.threads} threads, "
             f"{args.rounds} rounds (A then B each round), best of {args.repeat} calls per "
             "timing; % peak against the FMA peak measured in the same child.", "",
             "| N × K × d | A ms | A % peak | B ms | B % peak | A / B (median of rounds) |",
             "|---|---:|---:|---:|---:|---:|"]
    for i, (n, k, d) in enumerate(shapes):
        flops = 2 * n * k * d
        cols = []
        for key in ("a", "b"):
            ms = statistics.median(x["ms"][i] for x in runs[key])
            pct = statistics.median(100 * flops / (x["ms"][i] * 1e-3) / 1e9 / x["peak"]
                                    for x in runs[key])
            cols += [f"{ms:.4g}", f"{pct:.1f}%"]
        ratio = statistics.median(a["ms"][i] / b["ms"][i] for a, b in zip(runs["a"], runs["b"]))
        lines.append(f"| {n} × {k} × {d} | " + " | ".join(cols) + f" | {ratio:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
