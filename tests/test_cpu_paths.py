"""Every code path of the CPU kernel, forced one by one on the machine that runs the tests.

The CPU kernel picks its vector code (float32: the register-blocked GEMM + argmin; the
argmin of the BLAS-tile path for float64 and the scalar ISA) from the processor's
instruction set and its tile (tokens x codes) from the L2 cache;
``torch.ops.simvq.set_cpu_kernel_config`` (or SIMVQ_CPU_ISA / SIMVQ_CPU_TILE /
SIMVQ_CPU_L2) forces them. So a plain ``pytest`` on an AVX-512 machine also runs the
AVX2 and scalar paths, and every ISA runs with several tiles, including ones that do
not divide N or K, one-token tiles and a tile chosen for a 512 KiB L2.

For every ISA (scalar, avx2, avx512) x tile:
- picks and distances against the float64 oracle (design.md §3) on random inputs with
  small and large d (register-blocked path on AVX2/AVX-512, BLAS tiles on scalar), N
  and K not multiples of the tile, the block or the panel;
- exact duplicate codes (across tile and block edges) go to the lowest index, with
  exact index agreement on inputs with well-separated codes;
- bit-identical results across repeated calls and across torch.set_num_threads(1, 2)
  (the thread count only decides where the code range is split).
An ISA the CPU lacks is checked to fail with a clear error instead.
Also: the float32 vector path gives the same bits under AVX2 and AVX-512 (same FMAs in
the same order) and for any tile and L2 setting; exact ties on integer-valued data go to
the lowest index on every path; the environment variables are read, and bad values get an
error naming the variable (one subprocess). The backward's packed gathered product (every
ISA): exact on integer data at every panel and block edge, and the same bits as the
projection's unpacked FMA chains on random data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import oracle as O
import simvq_kernels as sk
from simvq_kernels import _ext

ISAS = ["scalar", "avx2", "avx512"]
TILES = ["auto", "1x64", "7x33", "64x1024", "256x1024", "33x250"]
# (N, K, d): small and large d; the register-blocked path (vector ISAs) or FMA tiles
# (scalar)
SHAPES = [(1, 300, 5), (257, 1031, 16), (130, 4099, 3), (300, 777, 17), (65, 2050, 64),
          (513, 300, 33), (40, 1100, 130), (9, 1, 8)]


def _require_extension():
    if not _ext.available():
        pytest.fail(f"the compiled extension is unavailable: {_ext.error()}")


def _config() -> dict:
    return json.loads(torch.ops.simvq.cpu_kernel_config())


def _set(isa=None, tile=None, l2=None) -> dict:
    return json.loads(torch.ops.simvq.set_cpu_kernel_config(isa, tile, l2))


@pytest.fixture
def restore():
    """Puts the kernel configuration and the thread count back as they were."""
    _require_extension()
    before = _config()
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    _set(isa=before["isa"] if before["isa_from"] != "native" else "auto",
         tile=(f"{before['tile_tokens']}x{before['tile_codes']}"
               if before["tile_from"] != "auto" else "auto"),
         l2=(str(before["l2_share_bytes"]) if before["l2_from"] in
             ("SIMVQ_CPU_L2", "set_cpu_kernel_config") else "auto"))


def _supported(isa: str) -> bool:
    native = _config()["native_isa"]
    return ISAS.index(isa) <= ISAS.index(native)


def _force_or_check_error(isa: str) -> bool:
    """Forces `isa`; where the CPU lacks it, checks the error and returns False."""
    if _supported(isa):
        assert _set(isa=isa)["isa"] == isa
        return True
    with pytest.raises(RuntimeError, match=r"`isa`=.* does not support"):
        _set(isa=isa)
    return False


def _problem(n, k, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(k, d, generator=g)
    z = torch.randn(n, d, generator=g) * 1.3 + 0.1
    return z.to(dtype), q.to(dtype)


def _run_twice_both_thread_counts(z, q):
    """nearest_code at 2 threads twice and at 1 thread; asserts identical bits."""
    torch.set_num_threads(2)
    i1, d1 = torch.ops.simvq.nearest_code(z, q)
    i2, d2 = torch.ops.simvq.nearest_code(z, q)
    torch.set_num_threads(1)
    i3, d3 = torch.ops.simvq.nearest_code(z, q)
    torch.set_num_threads(2)
    for i, dd, what in ((i2, d2, "a second run"), (i3, d3, "1 thread")):
        assert torch.equal(i1, i), f"indices differ with {what}"
        assert torch.equal(d1.view(torch.int32 if d1.dtype == torch.float32 else torch.int64),
                           dd.view(torch.int32 if dd.dtype == torch.float32 else torch.int64)), \
            f"distances differ (bits) with {what}"
    return i1, d1


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tile", TILES)
def test_random_inputs_against_oracle(isa, tile, restore):
    if not _force_or_check_error(isa):
        return
    cfg = _set(tile=tile)
    if tile != "auto":
        assert f"{cfg['tile_tokens']}x{cfg['tile_codes']}" == tile
    for s, (n, k, d) in enumerate(SHAPES):
        z, q = _problem(n, k, d, seed=100 + s)
        O.poison_heap(n, 2 * n)
        idx, dist = _run_twice_both_thread_counts(z, q)
        O.check_nearest(z, q, idx, dist, 0.0, what=f"{isa} tile {tile} {n}x{k}x{d}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tile", ["auto", "7x33", "16x16"])
@pytest.mark.parametrize("d", [4, 16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicates_go_to_lowest_index(isa, tile, d, dtype, restore):
    """Exact duplicate codes placed across tile edges (33, 16, whole panels), across and
    within the register-blocked path's panels (14 codes on AVX-512, 6 on AVX2) and the
    32-value groups of the tile path's one-pass argmin, some differing only in the sign
    of zero entries (-0.0 equals 0.0); tokens near a duplicated code must pick its first
    copy (well-separated codes: exact index agreement). No pass remaps duplicates: this
    rests on every value being formed the same way wherever its code sits."""
    if not _force_or_check_error(isa):
        return
    _set(tile=tile)
    k = 1100
    g = torch.Generator().manual_seed(7 + d)
    q = (torch.randn(k, d, generator=g) * 4.0).to(dtype)
    # (13, 14), (27, 28), (5, 6): across AVX-512 / AVX2 panel edges; (15, 16), (3, 11):
    # within a panel; (200, 208): one lane of two vectors of a 32-value argmin group
    pairs = [(0, 1), (5, 40), (15, 16), (31, 32), (32, 1099), (100, 133), (500, 1050),
             (16, 17), (16, 700), (3, 11), (16, 24), (200, 208), (13, 14), (27, 28),
             (5, 6), (41, 55)]
    for a, b in pairs:
        q[b] = q[a]
    # signed zeros: the copy holds -0.0 where its first copy holds 0.0 (and vice versa)
    for a, b in ((41, 55), (13, 14), (100, 133)):
        q[a, : d // 2] = 0.0
        q[b, : d // 2] = -0.0
        q[b, d // 2:] = q[a, d // 2:]
    first = O.first_of_duplicates(q)
    target = torch.tensor([b for _, b in pairs] + [a for a, _ in pairs] +
                          torch.randint(0, k, (60,), generator=g).tolist())
    z = q[target] + 1e-3 * torch.randn(target.numel(), d, generator=g)
    idx, dist = _run_twice_both_thread_counts(z, q)
    O.check_nearest(z, q, idx, dist, 0.0, expect_idx=first[target],
                    what=f"{isa} tile {tile} d={d}")
    # exact ties: tokens equal to a duplicated code (distance 0 to every copy)
    zt = q[torch.tensor([b for _, b in pairs])]
    it, dt = _run_twice_both_thread_counts(zt, q)
    assert torch.equal(it, torch.tensor([first[a].item() for a, _ in pairs])), it


@pytest.mark.parametrize("isa", ISAS)
def test_other_dtypes_and_quantize(isa, restore):
    """float64 (tiled path in double), bfloat16 (widened) and simvq_quantize on each ISA,
    with a tile that does not divide N or K."""
    if not _force_or_check_error(isa):
        return
    _set(tile="5x70")
    for dtype, (n, k, d) in ((torch.float64, (77, 300, 12)), (torch.float64, (33, 250, 40)),
                             (torch.bfloat16, (90, 400, 8)), (torch.bfloat16, (90, 400, 20))):
        z, q = _problem(n, k, d, seed=5, dtype=dtype)
        idx, dist = _run_twice_both_thread_counts(z, q)
        O.check_nearest(z, q, idx, dist, O.unit_roundoff(dtype), what=f"{isa} {dtype} d={d}")
    g = torch.Generator().manual_seed(11)
    basis = torch.randn(600, 12, generator=g) * 12 ** -0.5
    weight = torch.randn(10, 12, generator=g).requires_grad_(True)
    bias = torch.randn(10, generator=g).requires_grad_(True)
    z = torch.randn(200, 10, generator=g)
    out = sk.quantize(z, basis, weight, bias, backend="cpu")
    O.check_quantize(z, basis, weight, bias, out.zq, out.indices, out.distances, 0.0,
                     what=f"{isa} quantize")


@pytest.mark.parametrize("seed,shapes", [
    (3, ((300, 9000, 16), (5, 5000, 7), (1000, 600, 1))),
    (5, ((301, 5003, 17), (40, 2100, 64), (1000, 700, 33), (13, 999, 200)))],
    ids=["small-d", "large-d"])
def test_same_bits_on_every_isa_tile_and_l2(seed, shapes, restore):
    """Every path forms every (token, code) value as ||Q||^2 + sum_j z_j (-2 Q_j) with
    FMAs in j order, in whichever block, panel, lane, tile or task it falls: the
    register-blocked kernel (float32 on AVX-512 / AVX2; AVX2 runs the same FMAs on 8-lane
    halves) and the FMA tiles (float64, and float32 on the scalar ISA). So the indices and
    distances are bit-identical across ISAs (scalar included), tiles (set ones that cut
    blocks and panels, and automatic ones for several L2 sizes) and thread counts, at
    small d and large d alike, for float32 and float64."""
    isas = [i for i in ISAS if _supported(i)]
    g = torch.Generator().manual_seed(seed)
    for n, k, d in shapes:
        for dtype in (torch.float32, torch.float64):
            z = torch.randn(n, d, generator=g).to(dtype)
            q = torch.randn(k, d, generator=g).to(dtype)
            results = []
            for isa in isas:
                for tile, l2 in (("auto", "auto"), ("auto", "64K"), ("auto", "512K"),
                                 ("auto", "4M"), ("7x33", "auto"), ("100x1000", "auto")):
                    _set(isa=isa, tile=tile, l2=l2)
                    results.append(((isa, tile, l2), _run_twice_both_thread_counts(z, q)))
            (w0, (i0, d0)) = results[0]
            O.check_nearest(z, q, i0, d0, 0.0, what=f"{w0} {n}x{k}x{d} {dtype}")
            bits = torch.int32 if dtype == torch.float32 else torch.int64
            for w, (i, dd) in results[1:]:
                assert torch.equal(i0, i) and torch.equal(d0.view(bits), dd.view(bits)), \
                    f"{w} differs from {w0} at {n}x{k}x{d} {dtype}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [3, 24, 70])
def test_exact_ties_go_to_lowest_index(isa, d, restore):
    """0/1 vectors: every product and sum is exact in float32, so many codes tie
    exactly (distance = Hamming distance), and each token must get the lowest index among its exact minima (computed
    in int64 here), across blocks, panels, lanes and tiles."""
    if not _force_or_check_error(isa):
        return
    g = torch.Generator().manual_seed(13 + d)
    n, k = 301, 1500
    q = torch.randint(0, 2, (k, d), generator=g).float()
    z = torch.randint(0, 2, (n, d), generator=g).float()
    dist_exact = ((z.long()[:, None, :] - q.long()[None, :, :]) ** 2).sum(-1)  # n x k
    expect = (dist_exact == dist_exact.min(1, keepdim=True).values).int().argmax(1)
    ties = (dist_exact == dist_exact.min(1, keepdim=True).values).sum(1)
    assert (ties > 1).float().mean() > 0.3, "the data should tie often"
    for tile in ("auto", "7x33", "40x100"):
        _set(tile=tile)
        idx, dist = _run_twice_both_thread_counts(z, q)
        assert torch.equal(idx, expect), f"{isa} tile {tile} d={d}: " \
            f"{(idx != expect).sum().item()} tokens not on the lowest tied index"
        assert torch.equal(dist, dist_exact.min(1).values.float()), f"{isa} tile {tile} d={d}"
    # a few tokens: too few token tiles for the threads, so the code range is split and
    # the splits' ties are merged in code order
    _set(tile="100x40")
    idx, dist = _run_twice_both_thread_counts(z[:5], q)
    assert torch.equal(idx, expect[:5]), f"{isa} split code range d={d}: {idx} vs {expect[:5]}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [24, 40])
def test_ties_inside_a_lane_go_to_the_lower_code(isa, d, restore):
    """Codes 5, 13 and 21 are equally near the token and every other code is far: 13 is
    code 5's partner in the same lane of a 16-code panel (AVX2: two 8-lane halves), 21
    in a 32-code panel (AVX-512: two 16-lane vectors), so folding a panel's second
    vector before its first, or a '<=' anywhere, picks 13 or 21 instead of 5. Further
    equally near codes sit in later panels and tiles (37, 69, 133)."""
    if not _force_or_check_error(isa):
        return
    k = 200
    q = torch.full((k, d), 3.0)
    for code, dim in ((21, 0), (13, 1), (5, 2), (37, 3), (69, 4), (133, 5)):
        q[code] = 0.0
        q[code, dim] = 1.0  # distinct rows (no duplicate remapping), all at distance 1
    z = torch.zeros(3, d)
    for tile in ("auto", "1x16", "1x32", "7x33", "100x40"):
        _set(tile=tile)
        idx, dist = _run_twice_both_thread_counts(z, q)
        assert idx.tolist() == [5, 5, 5], f"{isa} tile {tile} d={d}: {idx.tolist()}"
        assert dist.tolist() == [1.0, 1.0, 1.0], f"{isa} tile {tile} d={d}: {dist.tolist()}"


def test_tile_choice_follows_l2(restore):
    """The tile is chosen from the L2 share: its fp32 output fits half of it; a set tile
    wins over the choice; 'auto' goes back to the choice."""
    for l2, most in (("256K", 128 * 1024), ("512K", 256 * 1024), ("1M", 512 * 1024),
                     ("2M", 1024 * 1024), ("8M", 1024 * 1024)):
        cfg = _set(tile="auto", l2=l2)
        assert cfg["tile_from"] == "auto" and cfg["l2_from"] == "set_cpu_kernel_config"
        assert cfg["tile_fp32_bytes"] == cfg["tile_tokens"] * cfg["tile_codes"] * 4
        assert most // 2 <= cfg["tile_fp32_bytes"] <= most, (l2, cfg)
    assert _set(tile="48x96")["tile_tokens"] == 48
    assert _set(l2="auto")["tile_codes"] == 96
    cfg = _set(tile="auto")
    assert cfg["tile_from"] == "auto", cfg
    assert cfg["l2_from"] in ("sysfs", "sysconf") or cfg["l2_from"].startswith("unknown"), cfg


def test_bad_settings_are_rejected_and_change_nothing(restore):
    before = _config()
    for kwargs, pattern in ((dict(isa="sse4"), r"`isa`='sse4' is not one of"),
                            (dict(tile="128"), r"`tile`='128' is not 'auto' or <tokens>x<codes>"),
                            (dict(tile="0x1024"), r"`tile`='0x1024': each side"),
                            (dict(tile="128x-4"), r"`tile`='128x-4' is not"),
                            (dict(l2="lots"), r"`l2`='lots' is not 'auto' or a cache size"),
                            (dict(l2="1K"), r"`l2`='1K'"),
                            (dict(isa="avx2", tile="bad"), r"`tile`='bad'")):
        with pytest.raises(RuntimeError, match=pattern):
            _set(**kwargs)
        assert _config() == before, f"{kwargs} changed the configuration"


def test_environment_variables():
    """SIMVQ_CPU_ISA / SIMVQ_CPU_TILE / SIMVQ_CPU_L2 are read on the kernel's first use; a
    bad value fails every call with an error naming the variable until it is fixed."""
    _require_extension()
    code = textwrap.dedent("""
        import json, os, torch
        from simvq_kernels import _ext
        assert _ext.load() is not None, _ext.error()
        z, q = torch.randn(5, 20), torch.randn(40, 20)
        def err():
            try:
                torch.ops.simvq.nearest_code(z, q)
            except RuntimeError as e:
                return str(e).splitlines()[0]
            return None
        out = {"isa": err()}
        os.environ["SIMVQ_CPU_ISA"] = "avx2"
        os.environ["SIMVQ_CPU_TILE"] = "12y7"
        out["tile"] = err()
        os.environ["SIMVQ_CPU_TILE"] = "12x70"
        os.environ["SIMVQ_CPU_L2"] = "huge"
        out["l2"] = err()
        os.environ["SIMVQ_CPU_L2"] = "512K"
        out["ok"] = err()
        out["config"] = json.loads(torch.ops.simvq.cpu_kernel_config())
        print(json.dumps(out))
    """)
    env = dict(os.environ, SIMVQ_CPU_ISA="sse9")
    env.pop("SIMVQ_CPU_TILE", None)
    env.pop("SIMVQ_CPU_L2", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "SIMVQ_CPU_ISA='sse9' is not one of: auto, scalar, avx2, avx512" in out["isa"]
    assert "SIMVQ_CPU_TILE='12y7'" in out["tile"]
    assert "SIMVQ_CPU_L2='huge'" in out["l2"]
    cfg = out["config"]
    if _supported("avx2"):
        assert out["ok"] is None, out["ok"]
        assert (cfg["isa"], cfg["isa_from"]) == ("avx2", "SIMVQ_CPU_ISA")
        assert (cfg["tile_tokens"], cfg["tile_codes"], cfg["tile_from"]) == \
            (12, 70, "SIMVQ_CPU_TILE")
        assert (cfg["l2_share_bytes"], cfg["l2_from"]) == (512 * 1024, "SIMVQ_CPU_L2")
    else:
        assert "SIMVQ_CPU_ISA=avx2 but this CPU does not support" in out["ok"]


# (N, d, r, K): the backward's gathered product packs the basis rows per block of 128
# tokens into panels of 16 / 24 columns (AVX2), 64 (AVX-512) or 4 (scalar) and the
# gradient into row panels of 4 or 6: N across block and 1024-token chunk edges, d and r
# off every panel width, one-token and one-column cases
BACKWARD_SHAPES = [(1, 1, 1, 3), (127, 6, 16, 50), (129, 7, 17, 40), (300, 13, 25, 1000),
                   (1030, 64, 64, 300), (2100, 33, 70, 90), (257, 65, 100, 7), (5, 130, 3, 2)]


def _ints(g, *shape, dtype):
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_gather_product_exact_on_integer_data(isa, dtype, restore):
    """grad_weight = g^T basis[idx] and grad_bias = sum g of both backward ops (the layer's
    and the fused step's, channel-last and channel-first) on small integers, where every
    partial sum is exact: equal to the int64 product, so a wrong row, column, token or
    padding value in the packed panels cannot hide behind a tolerance."""
    if not _force_or_check_error(isa):
        return
    for n, d, r, k in BACKWARD_SHAPES:
        g = torch.Generator().manual_seed(n * 131 + d * 7 + r)
        basis = _ints(g, k, r, dtype=dtype)
        grad = _ints(g, n, d, dtype=dtype)
        idx = torch.randint(0, k, (n,), generator=g)
        want_dw = grad.long().t() @ basis.long()[idx]
        want_db = grad.long().sum(0)
        weight = torch.zeros(d, r, dtype=dtype)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dw, db = torch.ops.simvq.quantize_backward(grad, basis, idx, weight)
            assert torch.equal(dw, want_dw.to(dtype)) and torch.equal(db, want_db.to(dtype)), \
                f"quantize_backward {isa} {dtype} N={n} d={d} r={r} at {threads} threads"
        # the fused step: diff = Q[idx] - z, dz = d_out - 0.5 diff, dW = diff^T basis[idx]
        codebook = _ints(g, k, d, dtype=dtype)
        z = _ints(g, n, d, dtype=dtype)
        d_out = _ints(g, n, d, dtype=dtype)
        diff = codebook.long()[idx] - z.long()
        want_dw = diff.t() @ basis.long()[idx]
        want_db, want_dz = diff.sum(0), d_out.double() - 0.5 * diff.double()
        for channel_first in (False, True):
            zz, oo = z, d_out
            if channel_first:  # (B, d, T) with T = n: one item, the tokens along T
                zz, oo = (t.t().contiguous().unsqueeze(0) for t in (z, d_out))
            dz, dw, db = torch.ops.simvq.quantize_train_backward(oo, zz, basis, codebook, idx,
                                                                 0.5, 1.0)
            if channel_first:
                dz = dz.squeeze(0).t()
            what = f"quantize_train_backward {isa} {dtype} N={n} d={d} r={r} cf={channel_first}"
            assert torch.equal(dw, want_dw.to(dtype)), what + ": grad_weight"
            assert torch.equal(db, want_db.to(dtype)), what + ": grad_bias"
            assert torch.equal(dz.double(), want_dz), what + ": grad_z"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_gather_product_keeps_the_projections_chains(isa, dtype, restore):
    """On random data, grad_weight of one token chunk (N <= 1024, so one partial, scaled
    by 1) is g^T basis[idx] with one FMA chain per element over the tokens in order: the
    very operations of the codebook projection (basis @ weight^T, one chain over r from
    +0, unpacked) with basis = g^T and weight = basis[idx]^T. Equal bits, so the packed
    panels cannot reorder a chain."""
    if not _force_or_check_error(isa):
        return
    for n, d, r in [(700, 13, 25), (1024, 64, 64), (129, 6, 16), (5, 7, 3)]:
        g = torch.Generator().manual_seed(n + d + r)
        basis = torch.randn(300, r, generator=g, dtype=dtype)
        grad = torch.randn(n, d, generator=g, dtype=dtype)
        idx = torch.randint(0, 300, (n,), generator=g)
        dw, _ = torch.ops.simvq.quantize_backward(grad, basis, idx,
                                                  torch.zeros(d, r, dtype=dtype))
        rows = basis[idx].t().contiguous()  # (r, n): the "weight" of the projection
        proj = torch.ops.simvq.quantize_train(torch.zeros(1, r, dtype=dtype),
                                              grad.t().contiguous(), rows, None)[4]
        assert proj.shape == dw.shape
        assert torch.equal(dw, proj), f"{isa} {dtype} N={n} d={d} r={r}: " \
            f"max diff {(dw - proj).abs().max().item():.3g}"
