"""The fixed-order product under the CPU backward and projection (csrc/cpu/fma_rows.h),
called directly through the test-only op ``torch.ops.simvq._fma_rows``.

    out[m, j] = init[j] + sum_t a[m, t] * rows[gather[t], j]     (one FMA chain per element)

The backward's dW (gathered, packed panels, a read in place with a_m == 1) and the
projection (no gather) use only part of what fma_rows accepts; these tests reach every
branch on every ISA the CPU runs: gathered or not, with and without init, a with unit
row stride or not (packed row panels), rows with a leading dimension wider than J, output
with padding columns (never written), token counts at and around the packing block
(128), M and J off every register block and panel edge, T = 0, and the double row sums.

- exact on small integers (every partial sum exact): equal to the int64 product;
- one FMA chain per element, in increasing t from init: integer data large enough that
  every step rounds, emulated exactly (float32 in float64; float64 in Python integers);
- the same bits on every path and ISA on random normal data.
"""
from __future__ import annotations

import json

import pytest
import torch

from simvq_kernels import _ext

ISAS = ["scalar", "avx2", "avx512"]
# (M, J, T): M and J off the register blocks (AVX2 float 4 x 24 and 6 x 16, AVX-512 float
# 4 x 64, doubles half as wide, scalar 4 x 4), T at and around the packing block of 128
SHAPES = [(1, 1, 1), (4, 24, 128), (6, 16, 129), (7, 25, 127), (13, 70, 300), (64, 64, 256),
          (65, 9, 3), (3, 130, 5), (5, 7, 0)]


def _native() -> str:
    if not _ext.available():
        pytest.fail(f"the compiled extension is unavailable: {_ext.error()}")
    return json.loads(torch.ops.simvq.cpu_kernel_config())["native_isa"]


def _runs_or_refuses(isa: str) -> bool:
    """True when this CPU runs `isa`; otherwise checks that the op refuses it clearly."""
    native = _native()
    if ISAS.index(isa) <= ISAS.index(native):
        return True
    with pytest.raises(RuntimeError, match="does not run it"):
        torch.ops.simvq._fma_rows(torch.ones(1, 1), torch.ones(1, 1), None, None, 0, False, isa)
    return False


def _gathered_case(M, J, T, g, make):
    """a (M, T), a table of rows (R, J), and gather (T,) into it, with repeats."""
    R = max(1, T // 2 + 3)
    a = make(M, T)
    table = make(R, J)
    gather = torch.randint(0, R, (T,), generator=g)
    return a, table, gather


def _all_calls(a, table, gather, init, isa):
    """Every way of asking fma_rows for init + a @ table[gather] (gathered and packed, and
    not gathered on the pre-gathered rows), each with and without padding columns in out
    and with the row sums: [(what, out (M, J), sums, out's padding)]."""
    M = a.shape[0]
    J = table.shape[1]
    pre = table[gather].contiguous()
    table_wide = torch.empty(table.shape[0], J + 5, dtype=table.dtype)
    table_wide[:, :J] = table
    a_cm = a.t().contiguous().t()
    wide = torch.empty(a.shape[1], M + 3, dtype=a.dtype)
    wide[:, :M] = a.t()
    a_cm_pad = wide[:, :M].t()
    res = []
    for a_v, a_what in ((a, "a_m=T"), (a_cm, "a_m=1"), (a_cm_pad, "a_m=1,a_t=M+3")):
        for rows, gth, r_what in ((table, gather, "gathered"),
                                  (table_wide[:, :J], gather, "gathered,ld=J+5"),
                                  (pre, None, "not gathered")):
            for pad in (0, 3):
                out, sums = torch.ops.simvq._fma_rows(a_v, rows, gth, init, pad, True, isa)
                res.append((f"{isa} {a_what} {r_what} pad={pad} init={init is not None}",
                            out[:, :J], sums, out[:, J:]))
    return res


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_rows_exact_on_integer_data(isa, dtype):
    """Small integers, so every partial sum is exact: every path equals the int64 product
    (and the double row sums the int64 sums), and no column of out past J is written."""
    if not _runs_or_refuses(isa):
        return
    for M, J, T in SHAPES:
        g = torch.Generator().manual_seed(M * 1000 + J * 10 + T)
        make = lambda *s: torch.randint(-4, 5, s, generator=g).to(dtype)  # noqa: E731
        a, table, gather = _gathered_case(M, J, T, g, make)
        for init in (None, make(J)):
            want = a.long() @ table.long()[gather]
            if init is not None:
                want = want + init.long()
            want_sums = a.long().sum(1)
            for what, out, sums, pad in _all_calls(a, table, gather, init, isa):
                what = f"{what} {dtype} M={M} J={J} T={T}"
                assert torch.equal(out, want.to(dtype)), what
                assert torch.equal(sums, want_sums.double()), what + ": sums"
                assert pad.isnan().all(), what + ": a column past J was written"


def _emulate_chains(a, rows, init, dtype):
    """init[j] + sum_t a[m, t] rows[t, j] as one fused multiply-add chain per element in
    increasing t, each step rounded once to `dtype`: exactly, for integer-valued data
    (float32: the step's exact value fits a double; float64: Python integers, and float()
    of an int rounds to nearest even)."""
    M, T = a.shape
    J = rows.shape[1]
    if dtype == torch.float32:
        acc = torch.zeros(M, J, dtype=torch.float64) if init is None else \
            init.double().expand(M, J).clone()
        ad, rd = a.double(), rows.double()
        for t in range(T):
            acc = (acc + ad[:, t:t + 1] * rd[t:t + 1, :]).float().double()  # one rounding
        return acc.float()
    al, rl = a.long().tolist(), rows.long().tolist()
    il = [0] * J if init is None else init.long().tolist()
    out = []
    for m in range(M):
        row = []
        for j in range(J):
            acc = il[j]
            for t in range(T):
                acc = int(float(acc + al[m][t] * rl[t][j]))  # exact product, one rounding
            row.append(float(acc))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_rows_is_one_fma_chain_per_element(isa, dtype):
    """Integers wide enough that every step of a chain rounds (float32: 12-bit factors,
    float64: 28-bit): each element must be the chain fma(a[m, t], row_t[j], acc) from
    init (or +0) in increasing t, emulated exactly. Another order of the tokens, a split
    chain, or a multiply and an add rounded apart give other bits."""
    if not _runs_or_refuses(isa):
        return
    bits = 12 if dtype == torch.float32 else 28
    shapes = [(7, 25, 300), (6, 16, 129), (4, 24, 130), (3, 5, 1)]
    if dtype == torch.float64:  # the emulation runs in Python: fewer elements
        shapes = [(7, 9, 300), (6, 5, 129), (2, 17, 131), (3, 5, 1)]
    for M, J, T in shapes:
        g = torch.Generator().manual_seed(M + J + T + bits)
        make = lambda *s: torch.randint(-(1 << bits), 1 << bits, s, generator=g).to(dtype)  # noqa: E731
        a, table, gather = _gathered_case(M, J, T, g, make)
        for init in (None, make(J)):
            want = _emulate_chains(a, table[gather], init, dtype).to(dtype)
            exact = a.long() @ table.long()[gather]
            # the data does make the chains round (else this test could not see an order)
            assert not torch.equal(want.double(), exact.double() if init is None
                                   else exact.double() + init.double()) or T <= 1
            for what, out, _, _ in _all_calls(a, table, gather, init, isa):
                assert torch.equal(out, want), f"{what} {dtype} M={M} J={J} T={T}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_rows_same_bits_on_every_path_and_isa(dtype):
    """Random normal data: every layout, gathered or not, on every ISA the CPU runs, gives
    the bits of the scalar ISA's unpacked product (std::fma per element)."""
    native = _native()
    isas = ISAS[:ISAS.index(native) + 1]
    for M, J, T in SHAPES:
        g = torch.Generator().manual_seed(7 * M + J + T)
        make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        a, table, gather = _gathered_case(M, J, T, g, make)
        for init in (None, make(J)):
            ref, ref_sums = torch.ops.simvq._fma_rows(a, table[gather].contiguous(), None, init,
                                                      0, True, "scalar")
            close = a.double() @ table.double()[gather]
            if init is not None:
                close = close + init.double()
            tol = 1e-4 if dtype == torch.float32 else 1e-12
            assert torch.allclose(ref.double(), close, rtol=tol, atol=tol * max(T, 1) ** 0.5)
            for isa in isas:
                for what, out, sums, _ in _all_calls(a, table, gather, init, isa):
                    what = f"{what} {dtype} M={M} J={J} T={T}"
                    assert torch.equal(out, ref), what
                    assert torch.equal(sums, ref_sums), what + ": sums"


def test_fma_rows_bad_arguments():
    _native()
    a, rows = torch.ones(3, 4), torch.ones(4, 5)
    op = torch.ops.simvq._fma_rows
    with pytest.raises(RuntimeError, match="`isa`='sse' is not one of"):
        op(a, rows, None, None, 0, False, "sse")
    with pytest.raises(RuntimeError, match="`a` and `rows` must both be float32"):
        op(a, rows.double(), None, None, 0, False, "scalar")
    with pytest.raises(RuntimeError, match="`gather` must be contiguous int64"):
        op(a, rows, torch.zeros(3, dtype=torch.long), None, 0, False, "scalar")
    with pytest.raises(RuntimeError, match="`gather` must index the 4 rows"):
        op(a, rows, torch.tensor([0, 1, 2, 4]), None, 0, False, "scalar")
    with pytest.raises(RuntimeError, match="without `gather`, `rows` needs 4 rows"):
        op(a, rows[:3], None, None, 0, False, "scalar")
    with pytest.raises(RuntimeError, match="`init` must be contiguous, shape \\(5,\\)"):
        op(a, rows, None, torch.ones(4), 0, False, "scalar")
    with pytest.raises(RuntimeError, match="unit column stride"):
        op(a, rows.t().contiguous().t(), None, None, 0, False, "scalar")
    with pytest.raises(RuntimeError, match="`out_pad` must be >= 0"):
        op(a, rows, None, None, -1, False, "scalar")
