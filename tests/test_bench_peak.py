"""The bench's physical-limit measurements and targets: the machine's FMA peak (the
extension's probe, its argument errors, ``python -m simvq_kernels.info``), the
side-by-side fraction with stand-in callables on a fake clock, the target rules on
synthetic rows, and the channel-first layer rows' layout. Seconds on a CPU."""
import time
import types

import pytest
import torch

from simvq_kernels import bench, peak
from simvq_kernels.bench import providers, targets, timing

needs_probe = pytest.mark.skipif(peak.unavailable() is not None,
                                 reason=f"no FMA peak probe: {peak.unavailable()}")


# ----------------------------------------------------------------- the probe


@needs_probe
def test_fma_peak_errors_name_the_argument():
    op = torch.ops.simvq.fma_peak
    with pytest.raises(RuntimeError, match=r"`isa`='sse9' is not one of: scalar, avx2, avx512"):
        op("sse9", 10)
    for bad in (0, -5):
        with pytest.raises(RuntimeError, match=rf"`iterations` must be positive, got {bad}"):
            op("scalar", bad)
    have = peak.isas()
    for isa in peak.VECTOR_ISAS:
        if isa not in have:  # an ISA this CPU lacks (none to test on an AVX-512 machine)
            with pytest.raises(RuntimeError, match=rf"`isa`={isa} but this CPU does not run"):
                op(isa, 10)
    # 12 chains, one lane, 2 flops per FMA, on every thread
    assert op("scalar", 10) == 10 * 12 * 2 * torch.get_num_threads()


@needs_probe
def test_probe_measures_every_vector_isa():
    have = peak.isas()
    assert have and all(i in peak.ISAS for i in have)
    call, flops = peak.probe(have[0], 0.005)
    assert flops > 0
    call()
    peaks = peak.measure(min_seconds=0.0, call_seconds=0.002, min_calls=2)
    assert set(peaks) == set(have) and all(g > 0 for g in peaks.values())


def test_best_isa_and_the_kernel_cap():
    peaks = {"avx512": 190.0, "avx2": 100.0}
    assert peak.best(peaks) == "avx512"
    assert peak.best(peaks, "avx2") == "avx2"  # SIMVQ_CPU_ISA=avx2: the AVX2 peak
    assert peak.best({"avx512": 90.0, "avx2": 100.0}) == "avx2"  # one 512-bit FMA unit
    assert peak.best({}) is None and peak.best(peaks, "scalar") is None


@needs_probe
def test_the_kernel_isa_limits_the_peak_compared_with():
    """SIMVQ_CPU_ISA=avx2 (here set_cpu_kernel_config, the same setting) on a CPU with
    AVX-512 stands in for an AVX2 CPU: the rows are judged against the AVX2 peak."""
    import json

    before = json.loads(torch.ops.simvq.cpu_kernel_config())
    if "avx2" not in peak.isas():
        pytest.skip("this CPU does not run AVX2")
    try:
        torch.ops.simvq.set_cpu_kernel_config("avx2", None, None)
        assert peak.kernel_isa_cap() == "avx2"
        torch.ops.simvq.set_cpu_kernel_config("auto", None, None)
        assert peak.kernel_isa_cap() is None
    finally:
        torch.ops.simvq.set_cpu_kernel_config(
            before["isa"] if before["isa_from"] != "native" else "auto", None, None)


@needs_probe
def test_info_prints_the_peak(capsys):
    from simvq_kernels import info

    t0 = time.perf_counter()
    p = info.fma_peak_now()
    took = time.perf_counter() - t0
    assert "error" not in p, p
    assert p["best"] in p["peaks"] and p["threads"] == torch.get_num_threads()
    assert took < 2.0, f"info's peak measurement took {took:.2f} s"
    assert info.main() == 0  # python -m simvq_kernels.info
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("fma peak"))
    assert "GFLOP/s fp32, measured now on all" in line and "the peak: " in line, line
    assert p["best"] in line


def test_info_says_why_without_the_probe(monkeypatch):
    from simvq_kernels import info

    monkeypatch.setattr(peak, "unavailable", lambda: "the compiled extension is not loaded")
    p = info.fma_peak_now()
    assert p == {"error": "the compiled extension is not loaded"}
    assert info.format_fma_peak(p).startswith("not measured: the compiled extension")


# ------------------------------------------------ side by side, on a fake clock


class _Clock:
    t = 0.0

    @classmethod
    def perf_counter(cls):
        return cls.t


def _advance(seconds):
    def call():
        _Clock.t += seconds()
    return call


def test_paired_fraction_is_the_median_of_per_pair_flop_rates(monkeypatch):
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=_Clock.perf_counter))
    # the op: 2e6 flops in 2 ms (1 GFLOP/s); the limit: 4e6 flops in 1 ms (4 GFLOP/s)
    op_times = iter([0.002] * 6 + [0.02] + [0.002] * 100)  # one slow op call: a drift
    run = _advance(lambda: next(op_times))
    tile = _advance(lambda: 0.001)
    f = timing.paired_fraction(run, 2e6, tile, 4e6, "cpu", op_s=0.002, budget=1.0, pairs=9)
    assert f == pytest.approx(0.25)
    # the same op twice as fast is twice the fraction: the measurement can fail a target
    fast = _advance(lambda: 0.001)
    assert timing.paired_fraction(fast, 2e6, tile, 4e6, "cpu", op_s=0.001,
                                  budget=1.0) == pytest.approx(0.5)


def test_paired_peak_fraction_pairs_with_the_probe(monkeypatch):
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=_Clock.perf_counter))
    asked = {}

    def fake_probe(isa, seconds):
        asked["isa"], asked["seconds"] = isa, seconds
        return _advance(lambda: 0.001), 8e6  # 8 GFLOP/s

    monkeypatch.setattr(peak, "probe", fake_probe)
    shape = bench.Shape(1000, 1000, 2)  # 4e6 search flops
    f = timing.paired_peak_fraction(_advance(lambda: 0.004), shape, "cpu", op_s=0.004,
                                    budget=1.0, isa="avx2")
    assert f == pytest.approx(0.125)  # 1 GFLOP/s of 8
    assert asked == {"isa": "avx2", "seconds": timing.PEAK_CALL_S[0]}  # not shorter


# ------------------------------------------------------------------ target rules


def _row(provider, shape, op, ms, **kw):
    return bench.Row(provider, shape, op, times=[ms / 1e3], check="pass", **kw)


def _result(rows, peaks=None, isa=None):
    return bench.BenchResult(bench.PRESETS["tiny"], "cpu", rows, {}, {"torch threads": 2},
                             [], "cpu", peaks=peaks or {}, peak_isa=isa)


def test_peak_faiss_and_training_step_targets():
    s64a, s64b = bench.Shape(16384, 1024, 64), bench.Shape(16384, 8192, 64)
    s32, s256, s16 = (bench.Shape(8192, 65536, 32), bench.Shape(4096, 16384, 256),
                      bench.Shape(512, 256, 16))
    rows = [
        _row("cpu", s64a, "fwd", 1, paired_peak=0.86, vs_faiss=1.21, paired_frac=0.97),
        _row("cpu", s64b, "fwd", 1, paired_peak=0.84, vs_faiss=1.19),
        _row("cpu", s32, "fwd", 1, paired_peak=0.76, vs_faiss=1.2),
        _row("cpu", s256, "fwd", 1, paired_peak=0.74, vs_faiss=1.0),
        _row("cpu", s16, "fwd", 1, paired_peak=0.30, vs_faiss=0.99),
        _row("cpu", s64a, "layer", 1, paired_vs_search=1.19),
        _row("cpu", s64b, "layer", 1, paired_vs_search=1.21),
        _row("cpu", s64a, "layer_cf", 1, paired_vs_search=1.1, vs_reference=3.0),
        _row("cpu", s16, "layer_cf", 1, paired_vs_search=2.0),
    ]
    t = {name: (v, verdict) for name, v, verdict in
         bench.evaluate_targets(_result(rows, {"avx512": 200.0, "avx2": 100.0}, "avx512"))}
    peak_t = "fused fwd >= {}% of the physical FMA peak at {}"
    assert t[peak_t.format(85, s64a.label)] == ("86.0% (paired with the avx512 peak)", "met")
    assert t[peak_t.format(85, s64b.label)][1] == "MISSED"
    assert t[peak_t.format(75, s32.label)][1] == "met"
    assert t[peak_t.format(85, s256.label)][1] == "MISSED"
    assert t[f"fused fwd, % of the physical FMA peak at {s16.label} (no target below "
             "d = 32)"][1] == "info"
    assert t[f"fused fwd >= 1.2x faiss-cpu at {s64a.label}"] == ("1.21x", "met")
    assert t[f"fused fwd >= 1.2x faiss-cpu at {s64b.label}"] == ("1.19x", "MISSED")
    assert t[f"fused fwd >= 1.2x faiss-cpu at {s32.label}"][1] == "met"
    assert t[f"fused fwd >= 1x faiss-cpu at {s256.label}"] == ("1.00x", "met")
    assert t[f"fused fwd >= 1.2x faiss-cpu at {s16.label}"][1] == "MISSED"
    ceil = f"fused fwd, % of the matmul ceiling (torch.mm of a cache-resident tile; not a " \
           f"target) at {s64a.label}"
    assert t[ceil] == ("97.0% (paired)", "info")
    layer_t = "fused {} <= 1.2x the forward search alone at {}"
    assert t[layer_t.format("layer fwd+bwd", s64a.label)] == ("1.19x (paired)", "met")
    assert t[layer_t.format("layer fwd+bwd", s64b.label)] == ("1.21x (paired)", "MISSED")
    assert t[layer_t.format("layer fwd+bwd channel-first", s64a.label)][1] == "met"
    assert t[f"fused layer fwd+bwd channel-first / the forward search alone at "
             f"{s16.label}"] == ("2.00x (paired)", "info")
    assert t[f"layer fwd+bwd channel-first >= 2x reference layer at {s64a.label}"][1] == "met"


def test_peak_targets_without_a_paired_measurement_use_the_run_peak():
    s = bench.Shape(16384, 1024, 64)
    r = _row("cpu", s, "fwd", s.search_flops / 100e9 * 1e3)  # 100 GFLOP/s
    res = _result([r], {"avx2": 200.0}, "avx2")
    r.peak = res.peak
    assert r.frac_peak == pytest.approx(0.5)
    t = {name: (v, verdict) for name, v, verdict in bench.evaluate_targets(res)}
    assert t[f"fused fwd >= 85% of the physical FMA peak at {s.label}"] == \
        ("50.0% (of the run's avx2 peak, 200 GFLOP/s)", "MISSED")


def test_report_header_names_the_peak_and_its_isa():
    from simvq_kernels.bench.reports import COLUMNS, row_cells

    s = bench.Shape(16384, 1024, 64)
    rows = [_row("cpu", s, "fwd", 1, paired_peak=0.5, peak=200.0),
            _row("cpu", s, "layer", s.search_flops / 72e9 * 1e3, peak=200.0)]
    res = _result(rows, {"avx512": 200.0, "avx2": 110.0}, "avx512")
    res.machine = bench.machine_info("cpu")
    text = bench.format_report(res)
    assert "GFLOP/s: avx512 200.0, avx2 110.0; % peak is against avx512's 200.0 (the " \
           "machine's peak: avx512 set it)" in text
    header = next(x for x in text.splitlines() if x.startswith("provider"))
    assert header.index("% ceil") < header.index("% peak") < header.index("check")
    col = COLUMNS.index("% peak")
    assert row_cells(rows[0])[col] == "50"  # paired
    assert row_cells(rows[1])[col] == "36"  # layer rows: the search's flops over the peak
    md = bench.format_markdown(res)
    assert "**% peak is against avx512's 200.0**" in md and "| % peak |" in md
    capped = _result(rows, {"avx512": 200.0, "avx2": 110.0}, "avx2")
    capped.peak_cap, capped.machine = "avx2", res.machine
    assert "% peak is against avx2's 110.0 (the CPU kernel runs avx2 here" in \
        bench.format_report(capped)


# ------------------------------------------------------ channel-first layer rows


@pytest.mark.parametrize("n", [512, 100])
def test_channel_first_layout_round_trips(n):
    z = torch.randn(n, 8)
    x = providers.to_channel_first(z)
    if n % 256 == 0:
        assert x.shape == (n // 256, 8, 16, 16)
        b, h, w = 1, 3, 5
        assert torch.equal(x[b, :, h, w], z[b * 256 + 16 * h + w])
    else:
        assert x.shape == (1, 8, n)
    assert x.is_contiguous() and x.data_ptr() != z.data_ptr()
    assert torch.equal(providers.to_channel_last(x), z)


def test_channel_first_layer_rows_pass_the_oracle_and_a_wrong_layout_fails():
    inp = bench.make_inputs(bench.Shape(512, 64, 8), seed=2)
    r = bench.build_runner("reference", "layer_cf", inp)
    out = r.output(r.run())
    res = bench.check_output("layer_cf", inp, out, u=0.0, check_rows=1024)
    assert res.ok and "grads vs float64 autograd" in res.detail, res.detail
    # dz read in the channel-first memory order instead of token order: caught
    raw = providers.to_channel_first(out["grads"]["z"]).reshape(512, 8)
    wrong = dict(out, grads=dict(out["grads"], z=raw))
    assert not bench.check_output("layer_cf", inp, wrong, u=0.0, check_rows=1024).ok


def test_presets_time_the_training_step_channel_first():
    for name in ("quick", "core"):
        cases = {(c.shape.n, c.shape.k, c.shape.d, c.op): c for c in bench.PRESETS[name].cases}
        for s in ((16384, 1024, 64), (16384, 8192, 64)):
            assert cases[s + ("layer_cf",)].providers == ("reference", "cpu"), name
            assert (s + ("layer",)) in cases, name
    assert targets.LAYER_SEARCH_TARGET == 1.2


def test_compare_builds_runs_two_builds_side_by_side(tmp_path):
    """benchmarks/compare_builds.py, with this checkout as both builds on a tiny shape:
    one row per shape, both builds timed, the ratio near 1 only if the times agree."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.md"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "compare_builds.py"),
                          str(root), str(root), "--shapes", "40x70x8,33x14x3", "--rounds", "1",
                          "--repeat", "1", "--threads", "1", "--markdown", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 40 ") or
            line.startswith("| 33 ")]
    assert len(rows) == 2, out.read_text()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        a_ms, b_ms, ratio = float(cells[1]), float(cells[3]), float(cells[5].rstrip("×"))
        assert a_ms > 0 and b_ms > 0 and _ratio_matches(ratio, a_ms, b_ms)


def _ratio_matches(printed, a_ms, b_ms):
    """The table's A / B cell (one round, so a / b itself) against the times it prints:
    within 2% (the times have 4 significant digits), or half a unit of the cell's last
    digit (it has two decimals: a round where the machine stalled one build 100x prints
    0.01 for 0.0067)."""
    return abs(printed - a_ms / b_ms) < 0.02 * printed + 0.005


def _compare_builds_rows(tmp_path, op):
    """compare_builds.py --op `op` with this checkout as both builds on 512 x 70 x 8 (one
    round, one call, one thread): the table's rows by name, the cells as numbers; and the
    same op on 300 tokens, which must be refused (not whole 16 x 16 images)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = str(root / "benchmarks" / "compare_builds.py")
    out = tmp_path / f"{op}.md"
    res = subprocess.run([sys.executable, script, str(root), str(root), "--op", op,
                          "--shapes", "512x70x8", "--rounds", "1", "--repeat", "1",
                          "--threads", "1", "--markdown", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in out.read_text().splitlines():
        if line.startswith("| 512 "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[1]] = [float(c.rstrip("×%")) for c in cells[2:]]
    bad = subprocess.run([sys.executable, script, str(root), str(root), "--op", op,
                          "--shapes", "300x70x8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "multiple of 256" in bad.stderr, bad.stderr[-2000:]
    return rows


def test_compare_builds_times_the_training_step(tmp_path):
    """compare_builds.py --op step: per shape a search row and the channel-last and
    channel-first step rows, each with both builds' times, their step / search ratios and
    the A / B ratio consistent with those times; N must fill whole 16 x 16 images."""
    rows = _compare_builds_rows(tmp_path, "step")
    assert sorted(rows) == ["search", "step, channel-first", "step, channel-last"], rows
    search = rows["search"]
    assert search[1] == search[3] == 1.0
    for name, (a_ms, a_rel, b_ms, b_rel, ratio) in rows.items():
        assert a_ms > 0 and b_ms > 0 and _ratio_matches(ratio, a_ms, b_ms), name
        assert abs(a_rel - a_ms / search[0]) < 0.01 + 0.02 * a_rel, name
        assert abs(b_rel - b_ms / search[2]) < 0.01 + 0.02 * b_rel, name


def test_compare_builds_times_the_backward_ops(tmp_path):
    """compare_builds.py --op backward: per shape the layer's backward op and the fused
    step's, channel-last and channel-first, each with both builds' times, a % of peak
    in [0, 150] and the A / B ratio consistent with the times."""
    rows = _compare_builds_rows(tmp_path, "backward")
    assert sorted(rows) == ["quantize_backward", "quantize_train_backward, channel-first",
                            "quantize_train_backward, channel-last"], rows
    for name, (a_ms, a_pct, b_ms, b_pct, ratio) in rows.items():
        assert a_ms > 0 and b_ms > 0 and _ratio_matches(ratio, a_ms, b_ms), name
        assert 0 <= a_pct <= 150 and 0 <= b_pct <= 150, name


def test_search_breakdown_splits_a_call_into_its_parts(tmp_path):
    """benchmarks/search_breakdown.py on tiny shapes: one row per shape whose parts are
    consistent with one another (the full call from its % of peak, the per-token time
    from its share), and the header names the CPU, the commit and the command."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bd.md"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "search_breakdown.py"),
                          "--shapes", "64x700x8,40x300x33", "--rounds", "1", "--repeat", "1",
                          "--threads", "1", "--markdown", str(out)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "needs AVX2 or AVX-512" in res.stdout + res.stderr:
        pytest.skip("this CPU runs the scalar search: no register panel to break down")
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "- **cpu**:" in text and "**git commit**" in text and "--shapes 64x700x8" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 64 ", "| 40 "))]
    assert len(rows) == 2, text
    peaks = [float(p) for p in text.split("FMA peak: ")[1].split(" GFLOP/s")[0].split(", ")]
    for row, (n, k, d), peak in zip(rows, ((64, 700, 8), (40, 300, 33)), peaks):
        cells = [c.strip().rstrip("%") for c in row.strip("|").split("|")]
        full_ms, full_pct, token_share, token_ns = (float(cells[1]), float(cells[2]),
                                                    float(cells[4]), float(cells[5]))
        assert full_ms > 0 and 0 < full_pct < 150
        # the peak is printed rounded: allow its rounding and the table's
        assert full_pct == pytest.approx(2 * n * k * d / (full_ms * 1e6) / peak * 100,
                                         rel=0.05, abs=0.2)
        assert token_ns == pytest.approx(token_share / 100 * full_ms * 1e6 / n, rel=0.05, abs=1)
