"""The CUDA kernels' index arithmetic and launch plans, checked on the CPU.

csrc/cuda/plan.h holds them as plain functions that the kernels (shared-memory
addresses, ldmatrix rows), the launchers (grid, shared memory) and this test use alike:
tests/cuda_plan_harness.cpp includes the same header, is compiled here with the host
C++ compiler and answers queries on stdin. The checks:

- the search grid's code splits give whole waves, or close, on tables of (SMs, N, K)
  (132 SMs as an H100, 108 as an A100, 78 as a small GPU; edge N and K), never worse
  than the earlier rule ceil(2 SMs / token tiles), and the split search finds its own
  cost model's minimum;
- every shared-memory access pattern of the tile layout (cp.async writes, ldmatrix
  reads of A and B, the backward's transposed 32-bit stores and its bias-sum loads) is
  bank-conflict-free under the hardware's wavefront rule, and the checker itself finds
  the conflicts of the earlier padded layout (so it can fail);
- ldmatrix delivers exactly the mma.sync fragments (PTX ISA: m16n8k16 bf16/fp16 and
  m16n8k8 tf32, which coincide in 32-bit words) from the swizzled layout;
- the search's shared-memory plan stays within the budget that keeps its blocks per SM
  and keeps the whole token tile resident whenever it fits;
- the backward needs one column tile at r = 127 and 128, two at 129.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 128
BANKS = 32


class Harness:
    def __init__(self, exe: str):
        self.exe = exe

    def ask(self, lines: list[str]) -> list[str]:
        out = subprocess.run([self.exe], input="".join(l + "\n" for l in lines),
                             capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    def splits(self, cases):
        """[(splits, per)] for [(slots, N, K)] (tile 128)."""
        out = self.ask([f"splits {s} {n} {k} {TILE}" for s, n, k in cases])
        return [tuple(map(int, line.split())) for line in out]

    def layout(self, name):
        """[(width, [32 word offsets])] of one access pattern, one per warp request."""
        out = self.ask([f"layout {name}"])
        assert out[-1] == "end", out[-5:]
        reqs = []
        for line in out[:-1]:
            v = list(map(int, line.split()))
            reqs.append((v[0], v[1:]))
        assert reqs, name
        return reqs


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the plan harness")
    exe = str(tmp_path_factory.mktemp("plan") / "harness")
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "cuda_plan_harness.cpp"), "-o", exe],
                   check=True, capture_output=True, text=True)
    return Harness(exe)


# ------------------------------------------------------------------ bank conflicts


def wavefronts(width: int, addrs: list[int]) -> int:
    """Shared-memory wavefronts of one warp request: 32 banks of 4 bytes; 16-byte
    accesses (and ldmatrix, whose 4 matrices take 8 row addresses each) go in 4 phases
    of 8 lanes, 8-byte in 2 phases of 16, 4-byte in one of 32; within a phase a bank
    serves one distinct word per wavefront (the same word is broadcast)."""
    words = width // 4
    lanes_per_phase = 32 * 4 // max(width, 4) if width > 4 else 32
    total = 0
    for p0 in range(0, 32, lanes_per_phase):
        per_bank: dict[int, set] = {}
        for a in addrs[p0:p0 + lanes_per_phase]:
            for w in range(words):
                per_bank.setdefault((a + w) % BANKS, set()).add(a + w)
        total += max(len(v) for v in per_bank.values())
    return total


def ideal(width: int) -> int:
    return max(1, 32 * width // 128)


PATTERNS = ("cp_async", "ldsm_a", "ldsm_b", "backward_store", "bias_load")


@pytest.mark.parametrize("name", PATTERNS)
def test_shared_memory_patterns_are_conflict_free(harness, name):
    for width, addrs in harness.layout(name):
        assert width in (4, 16)
        if width == 16:
            assert all(a % 4 == 0 for a in addrs), "16-byte accesses must be aligned"
        assert wavefronts(width, addrs) == ideal(width), (name, width, addrs)


def test_the_checker_finds_the_old_padded_layout_conflicts():
    # rows padded to 20 words, cp.async piece q -> row q / 4, segment q % 4: a warp
    # store took 8 wavefronts (4 ideal); the backward's stores (row cl + 16 e, word
    # p, cl = tid % 16, p = tid / 16) were 2-way conflicted; the scalar fragment loads
    # (A rows g / g + 8, word t / t + 4) were conflict-free but 24 per 16 MMAs
    for w in range(8):
        addrs = [(q >> 2) * 20 + (q & 3) * 4 for q in range(32 * w, 32 * w + 32)]
        assert wavefronts(16, addrs) == 8
        for e in range(8):
            old = [(((32 * w + l) & 15) + 16 * e) * 20 + ((32 * w + l) >> 4) for l in range(32)]
            assert wavefronts(4, old) == 2
    # and an unswizzled 16-word row breaks ldmatrix (rows r and r + 2 share banks)
    plain = [((l & 7) + ((l >> 3) & 1) * 8) * 16 + (l >> 4) * 4 for l in range(32)]
    assert wavefronts(16, plain) > 4


def test_layout_is_a_permutation_of_each_row(harness):
    out = harness.ask([f"word {r} {w}" for r in range(TILE) for w in range(16)])
    offs = list(map(int, out))
    assert sorted(offs) == list(range(TILE * 16))
    for r in range(TILE):  # a row stays within its own 16 words, segments stay whole
        row = offs[16 * r:16 * r + 16]
        assert sorted(row) == list(range(16 * r, 16 * r + 16))
        for s in range(4):
            seg = row[4 * s:4 * s + 4]
            assert seg[0] % 4 == 0 and seg == list(range(seg[0], seg[0] + 4))


def _logical(harness):
    """physical word offset -> (row, word)"""
    out = harness.ask([f"word {r} {w}" for r in range(TILE) for w in range(16)])
    return {int(o): (i // 16, i % 16) for i, o in enumerate(out)}


def test_copies_and_stores_cover_the_tile_once(harness):
    logical = _logical(harness)
    seen = [logical[a + w] for _, addrs in harness.layout("cp_async") for a in addrs
            for w in range(4)]
    assert sorted(seen) == sorted(logical.values())
    seen = [a for _, addrs in harness.layout("backward_store") for a in addrs]
    assert sorted(seen) == list(range(TILE * 16))
    # the bias loads read every word of the tile once (each row: two halves)
    seen = [a + w for _, addrs in harness.layout("bias_load") for a in addrs for w in range(4)]
    assert sorted(seen) == list(range(TILE * 16))


def _ldsm(addrs, lane, reg):
    """ldmatrix: lane `lane`'s register `reg` is word lane % 4 of the row whose address
    lane 8 reg + lane / 4 gave (32-bit words: b16 pairs stay together)."""
    return addrs[8 * reg + lane // 4] + lane % 4


def test_ldmatrix_gives_the_mma_fragments(harness):
    # PTX ISA, mma.sync m16n8k16 (.bf16/.f16) and m16n8k8 (.tf32), in 32-bit words of
    # the reduction dimension (ks: 8 words): g = lane / 4, t = lane % 4;
    # A regs: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); B regs: (n g, t), (n g, t + 4)
    logical = _logical(harness)
    reqs = iter(harness.layout("ldsm_a"))
    for wm in range(2):
        for mf in range(4):
            for ks in range(2):
                _, addrs = next(reqs)
                r0 = wm * 64 + mf * 16
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    want = [(r0 + g, 8 * ks + t), (r0 + g + 8, 8 * ks + t),
                            (r0 + g, 8 * ks + t + 4), (r0 + g + 8, 8 * ks + t + 4)]
                    got = [logical[_ldsm(addrs, lane, i)] for i in range(4)]
                    assert got == want, (wm, mf, ks, lane)
    reqs = iter(harness.layout("ldsm_b"))
    for wn in range(4):
        for np_ in range(2):
            for ks in range(2):
                _, addrs = next(reqs)
                n0 = wn * 32 + np_ * 16
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    # registers: b[nf][0], b[nf][1], b[nf + 1][0], b[nf + 1][1]
                    want = [(n0 + g, 8 * ks + t), (n0 + g, 8 * ks + t + 4),
                            (n0 + 8 + g, 8 * ks + t), (n0 + 8 + g, 8 * ks + t + 4)]
                    got = [logical[_ldsm(addrs, lane, i)] for i in range(4)]
                    assert got == want, (wn, np_, ks, lane)


# ------------------------------------------------------------------ search grid

SLOTS = {"H100 (132 SMs)": 132, "A100 (108 SMs)": 108, "small (78 SMs)": 78}
NS = (1, 127, 128, 129, 1000, 1500, 4096, 8192, 16383, 16384, 16385, 65536, 100_000,
      262_144, 1_000_000)
KS = (1, 127, 128, 129, 1000, 1024, 4096, 4097, 8192, 65536, 100_000, 262_144, 1_000_000)


def _table():
    return [(sms * bps, n, k) for sms in SLOTS.values() for bps in (1, 2) for n in NS
            for k in KS]


def _old_rule(slots, n, k):
    tm, tk = math.ceil(n / TILE), math.ceil(k / TILE)
    s = min(tk, max(1, math.ceil(slots / tm)))
    per = math.ceil(tk / s)
    return math.ceil(tk / per), per * TILE


def _time(slots, n, k, splits, per, overhead=1):
    """waves x (code tiles per block + a block's fixed cost), in code tiles"""
    tm = math.ceil(n / TILE)
    return math.ceil(tm * splits / slots) * (per // TILE + overhead)


def test_splits_are_valid(harness):
    cases = _table()
    for (slots, n, k), (s, per) in zip(cases, harness.splits(cases)):
        assert per % TILE == 0 and per > 0
        assert 1 <= s <= 65535
        assert s * per >= k and (s - 1) * per < k, (slots, n, k, s, per)  # no empty split


def test_issue_shapes_fill_one_wave_on_h100(harness):
    # 2 blocks per SM x 132 SMs = 264 slots; the earlier rule made 384, 320 and 288
    # blocks (1.45, 1.21, 1.09 waves)
    cases = [(264, 16384, 262144), (264, 8192, 8192), (264, 4096, 65536)]
    for (slots, n, k), (s, per) in zip(cases, harness.splits(cases)):
        blocks = math.ceil(n / TILE) * s
        assert 0.9 * slots <= blocks <= slots, (n, k, s, blocks)
        old = _old_rule(slots, n, k)
        assert math.ceil(n / TILE) * old[0] > slots  # (the earlier rule spilled over)
        assert _time(slots, n, k, s, per) < _time(slots, n, k, *old)


def test_splits_never_worse_than_the_old_rule(harness):
    cases = _table()
    for (slots, n, k), (s, per) in zip(cases, harness.splits(cases)):
        assert _time(slots, n, k, s, per) <= _time(slots, n, k, *_old_rule(slots, n, k)), \
            (slots, n, k, s, per)


def test_splits_keep_the_waves_busy(harness):
    # with enough work (>= 64 code tiles per token tile and >= 8 block slots' worth),
    # the busy fraction of the launched waves, token tiles x code tiles over slots x
    # waves x code tiles per block, stays >= 0.75 (granularity: a block is whole code
    # tiles and a fixed cost of about one more); typical shapes are >= 0.95
    cases = _table()
    worst = 1.0
    for (slots, n, k), (s, per) in zip(cases, harness.splits(cases)):
        tm, tk = math.ceil(n / TILE), math.ceil(k / TILE)
        if tk < 64 or tm * tk < 8 * slots:
            continue
        busy = tm * tk / (slots * math.ceil(tm * s / slots) * (per // TILE))
        worst = min(worst, busy)
        assert busy >= 0.75, (slots, n, k, s, per, busy)
        if n in (16384, 262_144) and k in (65536, 262_144):
            assert busy >= 0.95, (slots, n, k, s, per, busy)
    assert worst < 1.0


def test_split_search_finds_its_cost_minimum(harness):
    cases = [(slots, n, k) for slots in (264, 216, 156, 108, 78)
             for n in (128, 1000, 16384, 65536) for k in (4097, 65536, 262144)]
    for (slots, n, k), (s, per) in zip(cases, harness.splits(cases)):
        # the documented search range: up to about 8 waves of blocks, at least 4 splits
        tm, tk = math.ceil(n / TILE), math.ceil(k / TILE)
        tries = range(1, min(tk, max(math.ceil(8 * slots / tm), 4)) + 1)
        costs = list(map(int, harness.ask([f"cost {slots} {n} {k} {TILE} {t}" for t in tries])))
        best = min(costs)
        assert int(harness.ask([f"cost {slots} {n} {k} {TILE} {s}"])[0]) == best, \
            (slots, n, k, s)


# ------------------------------------------------------------------ shared memory


# (per SM, per block opt-in, reserved per block): cudaDevAttr values of the cards
DEVICES = {"A100": (167936, 166912, 1024), "H100": (233472, 232448, 1024)}


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("bps", (1, 2))
def test_search_smem_plan_fits_and_keeps_the_token_tile(harness, device, bps):
    per_sm, optin, reserved = DEVICES[device]
    budget = int(harness.ask([f"budget {per_sm} {optin} {reserved} {bps}"])[0])
    assert bps * (budget + reserved) <= per_sm and budget <= optin
    tile_bytes = TILE * 64
    for chunks in range(1, 65):  # row widths 64 B .. 4 KiB (bf16 d = 32 .. 2048)
        res, stream_a, nbytes = map(int, harness.ask([f"smem {chunks} {budget}"])[0].split())
        assert nbytes <= budget
        assert nbytes == (res + 2 * (2 if stream_a else 1)) * tile_bytes
        if (chunks + 2) * tile_bytes <= budget:
            assert (res, stream_a) == (chunks, 0)  # loaded once, nothing re-streamed
        else:
            assert stream_a == 1 and 0 <= res < chunks
            assert (res + 1 + 4) * tile_bytes > budget  # as many as fit
    # bf16 d = 128 (4 chunks) is resident on both cards at 2 blocks per SM
    if bps == 2:
        assert harness.ask([f"smem 4 {budget}"])[0].split()[:2] == ["4", "0"]


# ------------------------------------------------------------------ backward


def test_backward_column_tiles(harness):
    # the bias gradient is a column sum, not an extra column of ones: r = 128 is one tile
    rs = (0, 1, 127, 128, 129, 255, 256, 257)
    got = list(map(int, harness.ask([f"coltiles {r}" for r in rs])))
    assert got == [1, 1, 1, 1, 2, 2, 2, 3]
