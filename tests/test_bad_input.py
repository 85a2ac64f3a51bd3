"""Bad input: a table, one row per test, run on every available backend.

Each row must raise a clear error whose message names the offending argument (checked
with a regex), or follow a documented behaviour that the row tests:

- N = 0 is valid and returns empty results (design.md §2).
- d = 0 is valid: every code is at distance 0, so every token gets index 0 (the lowest
  index wins the tie) and distance 0.
- Non-finite values (NaN, +inf, -inf) anywhere in z, codebook, basis, weight or bias
  are detected by one O((N + K) d) pass before the search (``_validate``'s docstring):
  synchronously on CPU (ValueError naming the argument, nothing has run); on an
  accelerator as a queued device-side assert. ``check_finite=False`` (or
  ``SIMVQ_CHECK_FINITE=0``) turns the check off: then the call must still not crash and
  must return indices inside [0, K) (which ones is unspecified).
- K beyond what the fused CPU kernel indexes (2^31 - 1025 codes: it keeps a code's
  position inside a tile in 32 bits): a clear error naming `codebook`, checked before
  any memory is touched (tested with a stride-0 codebook, so it costs nothing). The
  pure-PyTorch backends index in int64 and are bounded by memory only.
- N beyond 32 bits: indices are int64 (checked on the meta device, shapes only; the
  real N*K > 2^31 arithmetic is tested in test_limits.py).

The layer rows also check that a failing call leaves the layer exactly as it was:
parameters and buffers bitwise equal, no gradient, the same ``last_backend``, and the
same usage statistics (no half-updated counts).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import simvq_kernels as sk
from simvq_kernels import backends as _backends

BACKENDS = [b for b in sk.available_backends()
            if _backends.BACKENDS[b].why_not(torch.device("cpu"), torch.float32) is None]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def Z(n=5, d=4, dtype=torch.float32):
    return torch.randn(n, d, generator=_g(1)).to(dtype)


def CB(k=7, d=4, dtype=torch.float32):
    return torch.randn(k, d, generator=_g(2)).to(dtype)


def B(k=7, r=3, dtype=torch.float32):
    return torch.randn(k, r, generator=_g(3)).to(dtype)


def W(d=4, r=3, dtype=torch.float32):
    return torch.randn(d, r, generator=_g(4)).to(dtype)


def BIAS(d=4, dtype=torch.float32):
    return torch.randn(d, generator=_g(5)).to(dtype)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# (id, call(backend), exception type, regex the message must match)
NEAREST_ROWS = [
    ("z_1d", lambda b: sk.nearest_code(torch.randn(4), CB(), backend=b), ValueError,
     r"`z` must be a 2-D tensor"),
    ("z_3d", lambda b: sk.nearest_code(torch.randn(2, 5, 4), CB(), backend=b), ValueError,
     r"`z` must be a 2-D tensor"),
    ("codebook_1d", lambda b: sk.nearest_code(Z(), torch.randn(4), backend=b), ValueError,
     r"`codebook` must be a 2-D tensor"),
    ("width_mismatch", lambda b: sk.nearest_code(Z(d=4), CB(d=5), backend=b), ValueError,
     r"width mismatch.*`z`.*d=4.*`codebook`.*d=5"),
    ("z_int64", lambda b: sk.nearest_code(Z().long(), CB(), backend=b), TypeError,
     r"`z` must be a floating-point tensor"),
    ("z_int32", lambda b: sk.nearest_code(Z().int(), CB(), backend=b), TypeError,
     r"`z` must be a floating-point tensor"),
    ("z_bool", lambda b: sk.nearest_code(Z() > 0, CB(), backend=b), TypeError,
     r"`z` must be a floating-point tensor"),
    ("z_complex", lambda b: sk.nearest_code(Z().to(torch.complex64), CB(), backend=b),
     TypeError, r"`z` must be a floating-point tensor"),
    ("codebook_int", lambda b: sk.nearest_code(Z(), CB().long(), backend=b), TypeError,
     r"`codebook` must be a floating-point tensor"),
    ("codebook_complex", lambda b: sk.nearest_code(Z(), CB().to(torch.complex128), backend=b),
     TypeError, r"`codebook` must be a floating-point tensor"),
    ("mixed_dtypes", lambda b: sk.nearest_code(Z(), CB().double(), backend=b), TypeError,
     r"`codebook` has dtype torch.float64 but `z` has dtype torch.float32"),
    ("mixed_dtypes_bf16", lambda b: sk.nearest_code(Z(dtype=torch.bfloat16), CB(), backend=b),
     TypeError, r"`codebook` has dtype .*float32.* but `z` has dtype .*bfloat16"),
    ("mixed_devices", lambda b: sk.nearest_code(Z(), CB().to("meta"), backend=b), ValueError,
     r"`codebook` is on meta but `z` is on cpu"),
    ("empty_codebook", lambda b: sk.nearest_code(Z(), CB(k=0), backend=b), ValueError,
     r"`codebook` is empty \(K=0\)"),
    ("z_not_a_tensor", lambda b: sk.nearest_code([[0.0] * 4], CB(), backend=b), TypeError,
     r"`z` must be a torch.Tensor, got list"),
    ("codebook_numpy", lambda b: sk.nearest_code(Z(), CB().numpy(), backend=b), TypeError,
     r"`codebook` must be a torch.Tensor, got ndarray"),
] + [
    (f"z_{name}", (lambda v: lambda b: sk.nearest_code(_with(Z(), (2, 1), v), CB(),
                                                       backend=b))(v),
     ValueError, r"`z` contains NaN or infinite values")
    for name, v in NONFINITE.items()
] + [
    (f"codebook_{name}", (lambda v: lambda b: sk.nearest_code(Z(), _with(CB(), (6, 3), v),
                                                              backend=b))(v),
     ValueError, r"`codebook` contains NaN or infinite values")
    for name, v in NONFINITE.items()
] + [
    ("z_nan_bf16", lambda b: sk.nearest_code(_with(Z(dtype=torch.bfloat16), (0, 0), math.nan),
                                             CB(dtype=torch.bfloat16), backend=b),
     ValueError, r"`z` contains NaN or infinite values"),
    ("codebook_inf_fp16", lambda b: sk.nearest_code(
        Z(dtype=torch.float16), _with(CB(dtype=torch.float16), (0, 0), math.inf), backend=b),
     ValueError, r"`codebook` contains NaN or infinite values"),
]

QUANTIZE_ROWS = [
    ("basis_requires_grad", lambda b: sk.simvq_quantize(Z(), B().requires_grad_(), W(), BIAS(),
                                                        backend=b),
     ValueError, r"`basis` requires grad.*frozen.*detach"),
    ("weight_wrong_shape", lambda b: sk.simvq_quantize(Z(), B(), W(d=5), BIAS(), backend=b),
     ValueError, r"`weight` must be \(d, r\) = \(4, 3\).*got shape \(5, 3\)"),
    ("weight_wrong_r", lambda b: sk.simvq_quantize(Z(), B(r=3), W(r=2), BIAS(), backend=b),
     ValueError, r"`weight` must be \(d, r\)"),
    ("weight_1d", lambda b: sk.simvq_quantize(Z(), B(), torch.randn(4), BIAS(), backend=b),
     ValueError, r"`weight` must be a 2-D tensor"),
    ("bias_wrong_size", lambda b: sk.simvq_quantize(Z(), B(), W(), BIAS(d=5), backend=b),
     ValueError, r"`bias` must have d=4 elements"),
    ("bias_2d", lambda b: sk.simvq_quantize(Z(), B(), W(), BIAS()[None], backend=b),
     ValueError, r"`bias` must be a 1-D tensor"),
    ("basis_1d", lambda b: sk.simvq_quantize(Z(), torch.randn(3), W(), BIAS(), backend=b),
     ValueError, r"`basis` must be a 2-D tensor"),
    ("basis_empty", lambda b: sk.simvq_quantize(Z(), B(k=0), W(), BIAS(), backend=b),
     ValueError, r"`basis` is empty \(K=0\)"),
    ("basis_int", lambda b: sk.simvq_quantize(Z(), B().long(), W(), BIAS(), backend=b),
     TypeError, r"`basis` must be a floating-point tensor"),
    ("weight_complex", lambda b: sk.simvq_quantize(Z(), B(), W().to(torch.complex64), BIAS(),
                                                   backend=b),
     TypeError, r"`weight` must be a floating-point tensor"),
    ("weight_dtype", lambda b: sk.simvq_quantize(Z(), B(), W().double(), BIAS(), backend=b),
     TypeError, r"`weight` has dtype torch.float64 but `z` has dtype torch.float32"),
    ("bias_dtype", lambda b: sk.simvq_quantize(Z(), B(), W(), BIAS().half(), backend=b),
     TypeError, r"`bias` has dtype torch.float16"),
    ("basis_device", lambda b: sk.simvq_quantize(Z(), B().to("meta"), W(), BIAS(), backend=b),
     ValueError, r"`basis` is on meta but `z` is on cpu"),
    ("z_3d", lambda b: sk.simvq_quantize(Z()[None], B(), W(), BIAS(), backend=b), ValueError,
     r"`z` must be a 2-D tensor"),
] + [
    (f"{arg}_{name}", (lambda arg, v: lambda b: sk.simvq_quantize(
        *[(_with(t, tuple([0] * t.dim()), v) if a == arg else t)
          for a, t in (("z", Z()), ("basis", B()), ("weight", W()), ("bias", BIAS()))],
        backend=b))(arg, v),
     ValueError, rf"`{arg}` contains NaN or infinite values")
    for arg in ("z", "basis", "weight", "bias") for name, v in NONFINITE.items()
]

BACKEND_ARG_ROWS = [
    ("backend_unknown", lambda b: sk.nearest_code(Z(), CB(), backend="fastest"), ValueError,
     r"unknown `backend` 'fastest'"),
    ("backend_not_str", lambda b: sk.nearest_code(Z(), CB(), backend=3), TypeError,
     r"`backend` must be a string"),
    ("backend_cannot_serve", lambda b: sk.nearest_code(Z(), CB(), backend="cuda"),
     sk.BackendUnavailableError, r"backend 'cuda' cannot serve float32 tensors on cpu: "),
]


def _run_row(call, backend, exc, pattern):
    with pytest.raises(exc) as info:
        call(backend)
    msg = str(info.value)
    assert re.search(pattern, msg, re.S), f"message {msg!r} does not match {pattern!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in NEAREST_ROWS])
def test_nearest_code_bad_input(row, backend):
    _, call, exc, pattern = row
    _run_row(call, backend, exc, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in QUANTIZE_ROWS])
def test_quantize_bad_input(row, backend):
    _, call, exc, pattern = row
    _run_row(call, backend, exc, pattern)


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in BACKEND_ARG_ROWS])
def test_backend_argument(row):
    _, call, exc, pattern = row
    _run_row(call, None, exc, pattern)


# ------------------------------------------------------------- documented behaviour

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16])
def test_empty_batch_is_valid(backend, dtype):
    idx, dist = sk.nearest_code(Z(n=0, dtype=dtype), CB(dtype=dtype), backend=backend)
    assert idx.shape == (0,) and idx.dtype == torch.int64
    assert dist.shape == (0,) and dist.dtype == (torch.float64 if dtype == torch.float64
                                                 else torch.float32)
    w = W(dtype=dtype).requires_grad_(True)
    zq, idx = sk.simvq_quantize(Z(n=0, dtype=dtype), B(dtype=dtype), w, BIAS(dtype=dtype),
                                backend=backend)
    assert zq.shape == (0, 4) and zq.dtype == dtype and idx.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_gives_index_zero(backend):
    idx, dist = sk.nearest_code(torch.empty(3, 0), torch.empty(5, 0), backend=backend)
    assert idx.tolist() == [0, 0, 0] and dist.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["z", "codebook"])
def test_check_finite_off_returns_indices_in_range(backend, where, monkeypatch):
    """With the check off, NaN/inf inputs give unspecified picks, but never a crash or an
    index outside [0, K)."""
    z = Z(n=300, d=16)
    q = CB(k=1100, d=16)
    if where == "z":
        z[3, 2], z[200, 0], z[5] = math.nan, math.inf, -math.inf
    else:
        q[7, 1], q[1099, 0], q[500] = math.nan, math.inf, -math.inf
    for kwargs in ({"check_finite": False}, {}):
        if not kwargs:
            monkeypatch.setenv("SIMVQ_CHECK_FINITE", "0")
        idx, dist = sk.nearest_code(z, q, backend=backend, **kwargs)
        assert idx.dtype == torch.int64 and idx.shape == (300,)
        assert bool(((idx >= 0) & (idx < 1100)).all()), idx[(idx < 0) | (idx >= 1100)]


def test_k_beyond_the_cpu_kernel_index_is_a_clear_error():
    """The fused kernel keeps a code's position in a tile in 32 bits: K >= 2^31 - 1024
    is refused up front, naming `codebook` and the limit. "auto" picks the CPU kernel
    for CPU tensors, so it gives the same error. Shapes that cost no memory: d = 0, and
    a stride-0 codebook with the finite check off (the check would allocate a K x d
    bool temporary for the expanded view)."""
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    k = 2 ** 31
    msg = r"`codebook` has K=2147483648 codes; at most 2\^31 - 1025 are supported"
    for backend in ("cpu", "auto"):
        with pytest.raises(RuntimeError, match=msg):
            sk.nearest_code(torch.zeros(2, 0), torch.zeros(k, 0), backend=backend)
        with pytest.raises(RuntimeError, match=msg):
            sk.nearest_code(torch.zeros(2, 3), torch.zeros(1, 3).expand(k, 3), backend=backend,
                            check_finite=False)


def test_k_just_below_the_cpu_kernel_limit_is_accepted_by_the_check():
    """The largest accepted K passes the argument check (run with d = 0: no memory, no
    work)."""
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled CPU backend is unavailable: {sk.backend_status()}")
    k = 2 ** 31 - 1025
    idx, dist = sk.nearest_code(torch.zeros(2, 0), torch.zeros(k, 0), backend="cpu")
    assert idx.tolist() == [0, 0]


@pytest.mark.parametrize("backend", [
    "reference",  # bug 07 regression: the tie remap is skipped on meta tensors
    "compiled_fake"])
def test_n_beyond_32_bits_gives_int64_indices(backend):
    """Shapes only, on the meta device: N = 2^31 + 5 tokens -> int64 (N,) indices."""
    n = 2 ** 31 + 5
    z = torch.empty(n, 4, device="meta")
    q = torch.empty(9, 4, device="meta")
    if backend == "reference":
        idx, dist = sk.nearest_code(z, q, backend="reference")
    else:
        if "cpu" not in BACKENDS:
            pytest.fail(f"the compiled backend is unavailable: {sk.backend_status()}")
        idx, dist = torch.ops.simvq.nearest_code(z, q)
    assert idx.shape == (n,) and idx.dtype == torch.int64
    assert dist.shape == (n,)


# ------------------------------------------------- the compiled ops called directly

def _ops_rows():
    return [
        ("nearest_1d", lambda: torch.ops.simvq.nearest_code(torch.randn(4), CB()),
         r"`z` must be a 2-D tensor"),
        ("nearest_int", lambda: torch.ops.simvq.nearest_code(Z().long(), CB().long()),
         r"`z` must be a floating-point tensor"),
        ("nearest_width", lambda: torch.ops.simvq.nearest_code(Z(d=4), CB(d=3)),
         r"width mismatch"),
        ("nearest_dtype", lambda: torch.ops.simvq.nearest_code(Z(), CB().double()),
         r"`z` has dtype Float but `codebook` has dtype Double"),
        ("nearest_empty", lambda: torch.ops.simvq.nearest_code(Z(), CB(k=0)),
         r"`codebook` is empty"),
        ("quantize_weight", lambda: torch.ops.simvq.quantize(Z(), B(), W(d=5), BIAS()),
         r"`weight` must be \(d, r\)"),
        ("quantize_bias", lambda: torch.ops.simvq.quantize(Z(), B(), W(), BIAS(d=2)),
         r"`bias` must have d=4"),
        ("backward_indices_dtype", lambda: torch.ops.simvq.quantize_backward(
            Z(), B(), torch.zeros(5, dtype=torch.int32), W()), r"`indices` must be int64"),
        ("backward_indices_len", lambda: torch.ops.simvq.quantize_backward(
            Z(), B(), torch.zeros(4, dtype=torch.long), W()), r"`indices` has 4 entries"),
        ("backward_indices_range", lambda: torch.ops.simvq.quantize_backward(
            Z(), B(k=7), torch.full((5,), 7, dtype=torch.long), W()), r"`indices` must lie in \[0, 7\)"),
        ("backward_indices_negative", lambda: torch.ops.simvq.quantize_backward(
            Z(), B(k=7), torch.full((5,), -1, dtype=torch.long), W()), r"`indices` must lie in \[0, 7\)"),
    ]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in _ops_rows()])
def test_compiled_ops_reject_bad_input_without_crashing(row):
    """torch.ops.simvq.* are reachable directly (torch.compile graphs call them): they
    check their own arguments (a crash here would take the whole test process down)."""
    if "cpu" not in BACKENDS:
        pytest.fail(f"the compiled backend is unavailable: {sk.backend_status()}")
    _, call, pattern = row
    with pytest.raises((RuntimeError, IndexError, ValueError, TypeError)) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


# ---------------------------------------------------------------- the layer's state

def _snapshot(layer):
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    grads = {n: (None if p.grad is None else p.grad.clone())
             for n, p in layer.named_parameters()}
    usage = None
    if getattr(layer, "track_usage", False) or any(
            getattr(m, "track_usage", False) for m in layer.modules()):
        got = layer.codebook_usage(sync=False)
        usage = [u.counts.clone() for u in (got if isinstance(got, list) else [got])]
    backends = [getattr(m, "last_backend", None) for m in layer.modules()]
    return state, grads, usage, backends, layer.training


def _assert_same_state(before, after):
    s0, g0, u0, b0, t0 = before
    s1, g1, u1, b1, t1 = after
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]) or (
            torch.isnan(s0[k]).any() and torch.equal(torch.nan_to_num(s0[k]),
                                                     torch.nan_to_num(s1[k]))), \
            f"{k} changed by a failing call"
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), f"{n}.grad appeared or vanished"
        if g0[n] is not None:
            assert torch.equal(g0[n], g1[n]), f"{n}.grad changed by a failing call"
    if u0 is not None:
        for a, b in zip(u0, u1):
            assert torch.equal(a, b), "usage statistics changed by a failing call " \
                f"(total {int(a.sum())} -> {int(b.sum())})"
    assert b0 == b1, f"last_backend changed by a failing call: {b0} -> {b1}"
    assert t0 == t1


def _layer(backend, channel_first=False, **kw):
    torch.manual_seed(0)
    layer = sk.SimVQ(8, 33, channel_first=channel_first, backend=backend, track_usage=True,
                     **kw)
    # one good forward first, so there are statistics and a last_backend to preserve
    z = torch.randn(2, 8, 5) if channel_first else torch.randn(2, 5, 8)
    layer(z)
    return layer


def _nan_param(name):
    def corrupt(layer):
        with torch.no_grad():
            getattr(layer, name).view(-1)[3] = math.nan
    return corrupt


LAYER_ROWS = [
    ("width_mismatch", False, None, lambda L: L(torch.randn(2, 5, 7)), ValueError,
     r"`z` must have shape \(\.\.\., 8\)"),
    ("channel_first_wrong_channels", True, None, lambda L: L(torch.randn(2, 7, 5)),
     ValueError, r"channel_first=True expects `z` of shape \(B, 8, \.\.\.\).*\(2, 7, 5\)"),
    ("channel_first_1d", True, None, lambda L: L(torch.randn(8)), ValueError,
     r"channel_first=True expects `z` of shape \(B, (8|dim), \.\.\.\).*\(8,\)"),
    ("z_int", False, None, lambda L: L(torch.ones(2, 5, 8, dtype=torch.long)), TypeError,
     r"`z` must be a floating-point tensor"),
    ("z_complex", False, None, lambda L: L(torch.ones(2, 5, 8, dtype=torch.complex64)),
     TypeError, r"`z`"),
    ("z_not_tensor", False, None, lambda L: L([[0.0] * 8]), TypeError,
     r"`z` must be a torch.Tensor"),
    ("z_nan", False, None, lambda L: L(_with(torch.randn(2, 5, 8), (1, 2, 3), math.nan)),
     ValueError, r"`z` contains NaN or infinite values"),
    ("z_inf_channel_first", True, None,
     lambda L: L(_with(torch.randn(2, 8, 5), (0, 7, 4), math.inf)),
     ValueError, r"`z` contains NaN or infinite values"),
    ("z_float64_into_float32_layer", False, None, lambda L: L(torch.randn(2, 5, 8).double()),
     TypeError, r"dtype"),
    ("z_other_device", False, None, lambda L: L(torch.randn(2, 5, 8, device="meta")),
     ValueError, r"is on (meta|cpu) but"),
    ("weight_nan", False, _nan_param("weight"), lambda L: L(torch.randn(2, 5, 8)), ValueError,
     r"`weight` contains NaN or infinite values"),
    ("bias_nan", False, _nan_param("bias"), lambda L: L(torch.randn(2, 5, 8)), ValueError,
     r"`bias` contains NaN or infinite values"),
    ("basis_nan", False, _nan_param("basis"), lambda L: L(torch.randn(2, 5, 8)), ValueError,
     r"`basis` contains NaN or infinite values"),
    ("basis_requires_grad", False, lambda L: L.basis.requires_grad_(True),
     lambda L: L(torch.randn(2, 5, 8)), ValueError, r"`basis` requires grad"),
    ("mask_wrong_shape", False, None,
     lambda L: L(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool)),
     (ValueError, TypeError), r"`mask`"),
    ("indices_out_of_range", False, None,
     lambda L: L.indices_to_codes(torch.tensor([0, 33])), ValueError, r"`indices` must lie in"),
    ("indices_negative", False, None,
     lambda L: L.indices_to_codes(torch.tensor([-2])), ValueError, r"`indices` must lie in"),
    ("indices_float", False, None,
     lambda L: L.indices_to_codes(torch.tensor([0.0])), TypeError, r"`indices`"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in LAYER_ROWS])
def test_layer_bad_input_leaves_state_unchanged(row, backend):
    _, channel_first, corrupt, call, exc, pattern = row
    layer = _layer(backend, channel_first)
    if corrupt is not None:
        corrupt(layer)
    before = _snapshot(layer)
    with pytest.raises(exc) as info:
        call(layer)
    assert re.search(pattern, str(info.value), re.S), \
        f"message {str(info.value)!r} does not match {pattern!r}"
    _assert_same_state(before, _snapshot(layer))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_training_step_after_an_error_matches_a_clean_layer(backend):
    """A rejected batch leaves no trace: the next step of a layer that saw it equals the
    same step of a fresh layer, bit for bit."""
    z = torch.randn(4, 6, 8, generator=_g(7))
    bad = _with(z, (0, 0, 0), math.nan)
    a, b = _layer(backend), _layer(backend)
    with pytest.raises(ValueError):
        a(bad)
    outs = []
    for layer in (a, b):
        out, idx, loss = layer(z)
        (loss + out.square().mean()).backward()
        outs.append((out, idx, loss, layer.weight.grad, layer.bias.grad,
                     layer.codebook_usage(sync=False).counts))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dim=0, codebook_size=4), r"`dim` must be a positive int"),
    (dict(dim=4, codebook_size=0), r"`codebook_size` must be a positive int"),
    (dict(dim=4, codebook_size=True), r"`codebook_size` must be a positive int"),
    (dict(dim=4.0, codebook_size=4), r"`dim` must be a positive int"),
    (dict(dim=4, codebook_size=4, basis_dim=-1), r"`basis_dim`"),
    (dict(dim=4, codebook_size=4, backend=3), r"`backend` must be a string"),
])
def test_layer_constructor_arguments(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        sk.SimVQ(**kwargs)


def test_residual_layer_failing_stage_leaves_earlier_stages_unchanged():
    """A later stage that rejects its input must not leave the earlier stages' usage
    counts (or last_backend) updated: the whole forward fails, so nothing is counted.
    (Regression test for bug 04, /tmp/issue8_bugs/04.md.)"""
    if not hasattr(sk, "ResidualSimVQ"):
        pytest.skip("ResidualSimVQ is not part of this version")
    torch.manual_seed(0)
    layer = sk.ResidualSimVQ(8, 17, num_quantizers=3, track_usage=True)
    layer(torch.randn(2, 5, 8))
    with torch.no_grad():
        layer.layers[2].weight[0, 0] = math.nan
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"`weight` contains NaN"):
        layer(torch.randn(2, 5, 8))
    _assert_same_state(before, _snapshot(layer))


def test_codebook_usage_update_rejects_bad_indices_without_counting():
    usage = sk.CodebookUsage(10)
    usage.update(torch.tensor([1, 2, 2]))
    before = usage.counts.clone()
    for bad, exc in ((torch.tensor([3, 10]), ValueError), (torch.tensor([-1]), ValueError),
                     (torch.tensor([1.0]), TypeError)):
        with pytest.raises(exc, match=r"`indices`"):
            usage.update(bad)
        assert torch.equal(usage.counts, before)
    with pytest.raises(ValueError, match=r"`mask`"):
        usage.update(torch.tensor([1, 2]), mask=torch.tensor([True]))
    assert torch.equal(usage.counts, before)
