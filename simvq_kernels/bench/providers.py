"""Providers: what the bench times. A backend of this library or a peer tool, each one
entry of ``PROVIDERS`` (a :class:`Provider` built by :func:`register`). A provider's
``build(op, inp)`` returns a :class:`Runner`: the timed callable and the conversion of its
result into what the checks read (idx / dist / grads).

Adding a provider is one ``register(Provider(...))`` call with its builder."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .inputs import BETA, Inputs
from .memory import _gib
from .presets import MODES

MEMORY_FRACTION = 0.4


class NotAvailable(RuntimeError):
    """Raised by a provider's builder when it cannot run here (a missing API or build);
    the row is reported as skipped with this reason, not as an error."""


class Runner:
    """One provider on one op and input: ``run()`` is the timed callable (device work
    only; no host sync on CUDA, the timer synchronises), ``output(result)`` converts its
    result to a dict of idx / dist / grads for the check."""

    def __init__(self, run: Callable, output: Callable):
        self.run = run
        self.output = output


@dataclass(frozen=True)
class Provider:
    """One thing the bench can time.

    ``kind`` is "backend" (a backend of this library) or "peer" (another tool);
    ``ops`` the keys of :data:`presets.OPS` it runs; ``module``/``pip`` the import that
    must be installed and what to install; ``devices`` the device types it serves
    (``device_note`` says why not, elsewhere); ``modes`` the precision modes
    (presets.MODES) it runs; ``materialising`` that its forward builds the N x K
    distance matrix (skipped where that cannot fit); ``paired`` that its CPU forward rows
    get the side-by-side ceiling fraction; ``blas`` that it is a peer whose child process
    must run with the machine's own BLAS kernel (see blas.py)."""

    name: str
    kind: str
    ops: tuple
    build: Callable  # (op, inp) -> Runner
    module: Optional[str] = None
    pip: str = ""
    devices: tuple = ("cpu", "cuda")
    device_note: str = ""
    modes: tuple = ("fp32", "tf32", "bf16", "fp16")
    materialising: bool = False
    paired: bool = False
    blas: bool = False


PROVIDERS: dict = {}


def register(p: Provider) -> Provider:
    PROVIDERS[p.name] = p
    return p


# ------------------------------------------------------------------ our backends


def _copy_params(layer, inp: Inputs) -> None:
    with torch.no_grad():
        layer.basis.copy_(inp.basis)
        layer.weight.copy_(inp.weight)
        layer.bias.copy_(inp.bias)


def _backend(name: str) -> Callable:
    def build(op: str, inp: Inputs) -> Runner:
        import simvq_kernels as sk

        z, q, s = inp.z, inp.codebook, inp.shape
        if op == "fwd":
            return Runner(lambda: sk.nearest_code(z, q, backend=name),
                          lambda o: {"idx": o[0], "dist": o[1]})
        g = inp.g_out
        cf = op == "layer_cf"  # the same tokens, laid out channel-first
        # built on the device it runs on (initialising a 262k-code basis on a CPU is slow)
        with torch.device(z.device):
            layer = sk.SimVQ(s.d, s.k, basis_dim=s.basis_dim, backend=name,
                             **({"channel_first": True} if cf else {}))
        layer = layer.to(z.device)
        _copy_params(layer, inp)
        # fp32 tokens for the layer; under autocast (bf16/fp16 modes) the layer rounds them
        # to the stored low-precision values the checks read
        if cf:
            x, g = to_channel_first(z.float()).requires_grad_(True), to_channel_first(g)
            return _layer_runner(layer, x, g, _autocast(inp), to_channel_last)
        x = z.float().clone().requires_grad_(op == "layer")
        amp = _autocast(inp)
        if op in ("eval", "encode"):
            layer.eval()
            encode = getattr(layer, "encode", None)
            if op == "encode" and encode is None:
                raise NotAvailable("SimVQ.encode is not in this version of simvq-kernels")

            def run_eval():
                with torch.inference_mode(), amp():
                    return encode(x) if op == "encode" else layer(x)[1]
            return Runner(run_eval, lambda idx: {
                "idx": idx.reshape(-1), "grads": None,
                "grad_note": "indices only (inference)"})
        return _layer_runner(layer, x, g, amp)
    return build


CF_SIDE = 16  # channel-first rows: tokens as (N / 256, d, 16, 16) images


def to_channel_first(t):
    """(N, d) tokens as (N/256, d, 16, 16) images, token b*256 + 16*h + w at [b, :, h, w]
    (as (1, d, N) when N is not a multiple of 256); a contiguous copy."""
    n, d = t.shape
    if n % (CF_SIDE * CF_SIDE) == 0:
        t = t.reshape(-1, CF_SIDE, CF_SIDE, d).permute(0, 3, 1, 2)
    else:
        t = t.t()[None]
    return t.clone(memory_format=torch.contiguous_format)


def to_channel_last(t):
    """The inverse of :func:`to_channel_first`: (B, d, *spatial) -> (N, d)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _layer_runner(layer, x, g, amp, back=lambda t: t) -> Runner:
    """A layer row: forward and the backward of ``loss + sum(out * g)`` on ``x``; the
    checks read the indices and dz in token order (``back`` undoes a channel-first
    layout)."""
    params = (x, layer.weight, layer.bias)

    def run_layer():
        for p in params:
            p.grad = None
        with amp():
            out, idx, loss = layer(x)
        (loss + (out.float() * g).sum()).backward()
        return idx
    return Runner(run_layer, lambda idx: {
        "idx": idx.reshape(-1), "grads": {"z": back(x.grad), "weight": layer.weight.grad,
                                          "bias": layer.bias.grad}})


def _autocast(inp: Inputs):
    """A context factory: autocast to the inputs' low-precision dtype, or nothing."""
    import contextlib

    if inp.autocast is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(inp.z.device.type, dtype=inp.autocast)


for _name, _mat, _paired in (("reference", True, False), ("chunked", False, False),
                             ("cpu", False, True), ("cuda", False, True),
                             ("triton", False, False)):
    register(Provider(_name, "backend", ("fwd", "layer", "layer_cf", "eval", "encode"),
                      _backend(_name),
                      materialising=_mat, paired=_paired))


# ------------------------------------------------------------------------- peers


def _vq_pytorch_layer(inp: Inputs, rotation_trick: bool):
    from torch import nn
    from vector_quantize_pytorch import SimVQ as VQSimVQ

    s = inp.shape
    lin = nn.Linear(s.basis_dim, s.d, bias=True)
    layer = VQSimVQ(dim=s.d, codebook_size=s.k, codebook_transform=lin,
                    rotation_trick=rotation_trick, input_to_quantize_commit_loss_weight=BETA,
                    commitment_weight=1.0, frozen_codebook_dim=s.basis_dim)
    layer = layer.to(inp.z.device)
    with torch.no_grad():
        layer.frozen_codebook.copy_(inp.basis)
        lin.weight.copy_(inp.weight)
        lin.bias.copy_(inp.bias)
    return layer, lin


def _vq_pytorch(rot: bool) -> Callable:
    def build(op: str, inp: Inputs) -> Runner:
        layer, lin = _vq_pytorch_layer(inp, rotation_trick=rot)
        amp = _autocast(inp)
        if op == "fwd":
            x = inp.z.float()[None]

            def run_vq():
                with torch.no_grad(), amp():
                    return layer(x)
            return Runner(run_vq, lambda o: {"idx": o[1].reshape(-1).long(), "dist": None})
        x = inp.z.float()[None].clone().requires_grad_(True)
        g3 = inp.g_out[None]
        params = (x, lin.weight, lin.bias)

        def run_vq_layer():
            for p in params:
                p.grad = None
            with amp():
                out, idx, loss = layer(x)
            (loss + (out.float() * g3).sum()).backward()
            return idx
        if rot:
            return Runner(run_vq_layer, lambda idx: {
                "idx": idx.reshape(-1).long(), "grads": None,
                "grad_note": "grads not compared (the rotation trick changes them by design)"})
        return Runner(run_vq_layer, lambda idx: {
            "idx": idx.reshape(-1).long(),
            "grads": {"z": x.grad, "weight": lin.weight.grad, "bias": lin.bias.grad}})
    return build


def _cdist(op: str, inp: Inputs) -> Runner:
    z, q = inp.z, inp.codebook

    def run_cdist():
        v, i = torch.cdist(z, q).min(dim=1)
        return i, v * v
    return Runner(run_cdist, lambda o: {"idx": o[0], "dist": o[1]})


def _faiss(op: str, inp: Inputs) -> Runner:
    import faiss
    import numpy as np

    z, q = inp.z, inp.codebook
    if z.device.type != "cpu":
        raise RuntimeError("faiss-cpu serves CPU arrays only")
    faiss.omp_set_num_threads(torch.get_num_threads())
    zn = np.ascontiguousarray(z.numpy())
    qn = np.ascontiguousarray(q.numpy())
    d = inp.shape.d

    def run_faiss():
        index = faiss.IndexFlatL2(d)
        index.add(qn)
        return index.search(zn, 1)
    return Runner(run_faiss, lambda o: {"idx": torch.from_numpy(o[1][:, 0]).long(),
                                        "dist": torch.from_numpy(o[0][:, 0])})


def _pykeops(op: str, inp: Inputs) -> Runner:
    import pykeops
    from pykeops.torch import LazyTensor

    pykeops.set_verbose(False)
    z, q = inp.z, inp.codebook

    def run_keops():
        dmat = ((LazyTensor(z[:, None, :]) - LazyTensor(q[None, :, :])) ** 2).sum(-1)
        return dmat.min_argmin(dim=1)
    return Runner(run_keops, lambda o: {"idx": o[1].reshape(-1).long(),
                                        "dist": o[0].reshape(-1)})


register(Provider("vq-pytorch", "peer", ("fwd", "layer"), _vq_pytorch(False),
                  module="vector_quantize_pytorch", pip="vector-quantize-pytorch",
                  materialising=True))
register(Provider("vq-pytorch-rot", "peer", ("layer",), _vq_pytorch(True),
                  module="vector_quantize_pytorch", pip="vector-quantize-pytorch",
                  materialising=True))
register(Provider("cdist", "peer", ("fwd",), _cdist, modes=("fp32", "tf32"),
                  materialising=True))
register(Provider("faiss", "peer", ("fwd",), _faiss, module="faiss", pip="faiss-cpu",
                  devices=("cpu",), modes=("fp32",),
                  device_note="faiss-cpu serves CPU arrays (faiss-gpu is the 'faiss-gpu' peer)",
                  paired=True, blas=True))
register(Provider("pykeops", "peer", ("fwd",), _pykeops, module="pykeops", pip="pykeops",
                  modes=("fp32",)))


# ------------------------------------------------------------------- GPU peers


def _matmul(op: str, inp: Inputs) -> Runner:
    """The same-shape matrix product z @ Q^T into a preallocated N x K output: the cuBLAS
    ceiling for this shape (it writes N x K, which the fused op never does)."""
    z, qt = inp.z, inp.codebook.t()
    c = torch.empty(z.shape[0], qt.shape[1], dtype=z.dtype, device=z.device)

    def run_mm():
        torch.mm(z, qt, out=c)
    return Runner(run_mm, lambda o: {"na": "same-shape matrix product (a ceiling, no search)"})


def _faiss_gpu(op: str, inp: Inputs) -> Runner:
    """faiss' brute-force GPU k-NN (k = 1) on torch tensors: no index to build, as the
    codebook changes every training step."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise NotAvailable("the installed faiss has no GPU support (faiss-cpu)")
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

    res = faiss.StandardGpuResources()
    z, q = inp.z, inp.codebook

    def run_fg():
        return faiss.knn_gpu(res, z, q, 1)
    return Runner(run_fg, lambda o: {"idx": o[1][:, 0].long(), "dist": o[0][:, 0]})


register(Provider("matmul", "peer", ("fwd",), _matmul, devices=("cuda",),
                  device_note="the same-shape product is a ceiling on CUDA only (on CPU the "
                  "ceiling is a cache-resident tile)", materialising=True))
register(Provider("faiss-gpu", "peer", ("fwd",), _faiss_gpu, module="faiss",
                  pip="faiss-gpu-cu12", devices=("cuda",), modes=("fp32",),
                  device_note="faiss-gpu runs on CUDA only"))

# the GPU kernels that set the bar (flash-kmeans, flashlib): their own module
from . import gpu_peers  # noqa: E402,F401


# ------------------------------------------------------------- derived name lists

BACKEND_NAMES = tuple(n for n, p in PROVIDERS.items() if p.kind == "backend")
PEER_NAMES = tuple(n for n, p in PROVIDERS.items() if p.kind == "peer")
PEER_MODULES = {n: p.module for n, p in PROVIDERS.items() if p.kind == "peer" and p.module}
PROVIDER_OPS = {n: p.ops for n, p in PROVIDERS.items()}
# Providers whose forward builds the full N x K distance matrix.
MATERIALISING = tuple(n for n, p in PROVIDERS.items() if p.materialising)
# Forward rows whose % of the ceiling is measured side by side with the ceiling tile.
PAIRED_PROVIDERS = tuple(n for n, p in PROVIDERS.items() if p.paired)


def _peer_available(name: str) -> Optional[str]:
    """None if the peer can run here, else why not."""
    p = PROVIDERS[name]
    if p.module is not None and importlib.util.find_spec(p.module) is None:
        return f"{p.module} not installed (pip install {p.pip or p.module})"
    return None


def build_runner(provider: str, op: str, inp: Inputs) -> Runner:
    """The timed callable of ``provider`` for ``op`` on ``inp``."""
    p = PROVIDERS.get(provider)
    if p is None:
        raise ValueError(f"unknown provider {provider!r}")
    if op not in p.ops:
        raise ValueError(f"provider {provider!r} has no {op!r} op")
    return p.build(op, inp)


def skip_reason(provider: str, case, device, total_mem: int) -> Optional[str]:
    """Why ``provider`` does not run ``case`` here (None = it runs; "n/a" = not a row)."""
    s = case.shape
    p = PROVIDERS[provider]
    if case.op not in PROVIDER_OPS[provider] or case.mode not in p.modes:
        return "n/a"
    if p.kind == "backend" and case.mode != "fp32":
        import simvq_kernels as sk

        try:
            sk.select_backend(provider, device, getattr(torch, MODES[case.mode][0]))
        except sk.BackendUnavailableError as e:
            return f"skipped: {e}"
    inputs = 4 * (3 * s.n * s.d + s.k * (s.basis_dim + s.d))
    if inputs > 0.5 * total_mem:
        return f"skipped: inputs need {_gib(inputs)} of {_gib(total_mem)}"
    if provider in MATERIALISING:
        need = 3 * s.n * s.k * 4
        if need > MEMORY_FRACTION * total_mem:
            return (f"skipped: needs {_gib(need)} (> {MEMORY_FRACTION:.0%} of "
                    f"{_gib(total_mem)})")
    return None


def select_providers(backends, peers, device) -> tuple:
    """(providers to run, notes about the ones that cannot)."""
    import simvq_kernels as sk

    notes = []
    avail = sk.available_backends()
    chosen = []
    for b in backends:
        if b not in BACKEND_NAMES:
            raise SystemExit(f"unknown backend {b!r}; choose from {list(BACKEND_NAMES)}")
        if b not in avail:
            notes.append(f"backend {b}: not available ({sk.backend_status()[b]})")
            continue
        try:
            sk.select_backend(b, device, torch.float32)
        except sk.BackendUnavailableError as e:
            notes.append(f"backend {b}: {e}")
            continue
        chosen.append(b)
    for name in peers:
        if name not in PEER_NAMES:
            raise SystemExit(f"unknown peer {name!r}; choose from {list(PEER_NAMES)}")
        why = _peer_available(name)
        p = PROVIDERS[name]
        if why is None and torch.device(device).type not in p.devices:
            why = p.device_note or f"serves {', '.join(p.devices)} only"
        if why:
            notes.append(f"peer {name}: skipped, {why}")
            continue
        chosen.append(name)
    return chosen, notes
