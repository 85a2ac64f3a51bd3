"""Every GPU backend's ops on small shapes, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitize_ops.py
    compute-sanitizer --tool racecheck python benchmarks/gpu/sanitize_ops.py --quick

Small, edge-covering shapes (N and K around tile edges, odd d), every dtype a GPU
backend serves, the search (``nearest_code``) and the layer's forward and backward
(``quantize`` and its backward through ``SimVQ``), with non-contiguous inputs too. Each
result is also checked against the float64 oracle (design.md §3), so a run that the
sanitizer passes but that computed garbage still fails. Exit status 1 on a wrong result,
2 if no GPU backend can run here.
"""
from __future__ import annotations

import argparse
import sys

import torch

import simvq_kernels as sk
from simvq_kernels.bench.checks import (_codes64_from_codebook, check_grads, check_nearest,
                                        mode_roundoff, oracle_layer_grads, GRAD_RTOLS)
from simvq_kernels.bench.inputs import make_inputs
from simvq_kernels.bench.presets import MODES, Shape

SHAPES = ((1, 7, 3), (17, 1000, 64), (333, 4099, 129), (2049, 130, 32))
QUICK_SHAPES = ((17, 1000, 64), (333, 130, 129))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (for racecheck)")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default); cpu checks this script's logic with CPU backends")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    backends = [b for b in args.backends.split(",") if b in sk.available_backends()]
    if not backends:
        print(f"no GPU backend available: {sk.backend_status()}")
        return 2
    bad = 0
    for b in backends:
        for mode in ("fp32", "tf32", "bf16", "fp16"):
            torch.set_float32_matmul_precision(MODES[mode][1])
            for n, k, d in (QUICK_SHAPES if args.quick else SHAPES):
                inp = make_inputs(Shape(n, k, d), dev, seed=n + k + d, mode=mode)
                u = mode_roundoff(mode)
                # the search, on a non-contiguous view of z as well
                for z in (inp.z, torch.cat([inp.z, inp.z], 1)[:, :d]):
                    idx, dist = sk.nearest_code(z, inp.codebook, backend=b)
                    sync(dev)
                    res = check_nearest(z, _codes64_from_codebook(inp.codebook), k, idx, dist,
                                        u=u)
                    bad += not res.ok
                    print(f"{b} {mode} nearest_code {n}x{k}x{d} "
                          f"{'contiguous' if z.is_contiguous() else 'strided'}: "
                          f"{res.label} {res.detail}")
                # the layer: forward and backward (quantize and quantize_backward)
                layer = sk.SimVQ(d, k, backend=b).to(dev)
                with torch.no_grad():
                    layer.basis.copy_(inp.basis)
                    layer.weight.copy_(inp.weight)
                    layer.bias.copy_(inp.bias)
                x = inp.z.float().clone().requires_grad_(True)
                amp = inp.autocast
                with torch.autocast(dev.type, dtype=amp or torch.bfloat16,
                                    enabled=amp is not None):
                    out, idx, loss = layer(x)
                (loss + (out.float() * inp.g_out).sum()).backward()
                sync(dev)
                g = check_grads({"z": x.grad, "weight": layer.weight.grad,
                                 "bias": layer.bias.grad},
                                oracle_layer_grads(inp, idx.reshape(-1)), GRAD_RTOLS[mode])
                bad += not g.ok
                print(f"{b} {mode} layer fwd+bwd {n}x{k}x{d}: {g.label} {g.detail}")
    print(f"{bad} wrong result(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
