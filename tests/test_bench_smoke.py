"""Smoke test of `python -m simvq_kernels.bench`: the hidden 'tiny' preset end to end
(child processes, correctness column, table, CSV, markdown), plus the check itself
catching wrong picks and wrong distances. Seconds on a CPU."""
import csv
import subprocess
import sys

import pytest
import torch

from simvq_kernels import bench, peak


def test_tiny_preset_end_to_end(tmp_path):
    out_csv = tmp_path / "tiny.csv"
    out_md = tmp_path / "tiny.md"
    proc = subprocess.run(
        [sys.executable, "-m", "simvq_kernels.bench", "--preset", "tiny",
         "--peers", "cdist,faiss", "--repeat", "3", "--min-time", "0", "--quiet-wait", "0",
         "--contention-retries", "0", "--no-progress", "--csv", str(out_csv),
         "--markdown", str(out_md)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "provider" in out and "GFLOP/s" in out and "check" in out
    assert "matmul ceiling (GFLOP/s): d=16" in out
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    ran = [r for r in rows if r["status"] == "ok"]
    providers = {r["provider"] for r in ran}
    assert {"reference", "chunked", "cdist"} <= providers
    assert {r["op"] for r in ran} <= {"fwd", "layer fwd+bwd", "layer fwd+bwd channel-first"}
    assert {"fwd", "layer fwd+bwd"} <= {r["op"] for r in ran}
    for r in ran:
        assert r["check"] == "pass", r
        assert int(r["runs"]) == 3
        assert float(r["median_s"]) > 0 and float(r["gflops"]) > 0
        assert float(r["peak_mib"]) >= 0
    ref = [r for r in ran if r["provider"] == "reference"]
    assert all(abs(float(r["vs_reference"]) - 1) < 1e-9 for r in ref)
    md = out_md.read_text()
    assert "| provider |" in md and "% peak" in out and "| % peak |" in md
    if peak.unavailable() is None:  # the physical limit: every CPU row gets a % of it
        assert "FMA peak (fp32, measured on all" in out and "% peak is against" in out
        assert "% peak is against" in md
        for r in ran:
            assert float(r["peak_gflops"]) > 0 and r["peak_isa"] in peak.ISAS, r
            assert 0 < float(r["frac_peak"]) < 1.5, r
            paired = r["op"] == "fwd" and r["provider"] in ("cpu", "faiss")
            assert r["frac_peak_method"] == ("paired" if paired else "run peak"), r
        assert "% of the physical FMA peak at 512x256x16" in out
        assert "faiss-cpu at 512x256x16" in out or "faiss" not in {r["provider"] for r in ran}
    if "cpu" in providers:  # the training step over the bare search, channel-first too
        assert "fused layer fwd+bwd / the forward search alone at 512x256x16" in out
        cf = [r for r in ran if r["op"] == "layer fwd+bwd channel-first"]
        assert {r["provider"] for r in cf} == {"reference", "cpu"}
        assert "fused layer fwd+bwd channel-first / the forward search alone" in out
        layer = [r for r in ran if r["op"].startswith("layer")]
        assert all(float(r["vs_search_paired"]) > 0 for r in layer if r["provider"] == "cpu")
        assert all(r["vs_search_paired"] == "" for r in layer if r["provider"] != "cpu")


def test_list_presets(capsys):
    assert bench.main(["--list-presets"]) == 0
    text = capsys.readouterr().out
    for name in ("quick", "core", "image", "audio", "small-d", "cpu"):
        assert name in text
    assert "tiny" not in text  # hidden


def test_core_preset_has_the_core_shapes():
    shapes = {(s.n, s.k, s.d) for s in bench.PRESETS["core"].shapes()}
    assert {(16384, 1024, 64), (16384, 8192, 64), (8192, 65536, 32),
            (4096, 16384, 256), (16384, 262144, 32)} <= shapes


def test_check_catches_wrong_results():
    inp = bench.make_inputs(bench.Shape(300, 200, 8), seed=3)
    codes = bench._codes64_from_codebook(inp.codebook)
    d64 = torch.cdist(inp.z.double(), inp.codebook.double()) ** 2
    best = d64.argmin(1)
    dist = d64.gather(1, best[:, None])[:, 0].float()
    assert bench.check_nearest(inp.z, codes, 200, best, dist).ok
    worst = d64.argmax(1)
    res = bench.check_nearest(inp.z, codes, 200, worst, None)
    assert not res.ok and "outside eps" in res.detail
    res = bench.check_nearest(inp.z, codes, 200, best, dist * 1.01 + 1e-3)
    assert not res.ok and "distances" in res.detail
    assert not bench.check_nearest(inp.z, codes, 200, best.int(), None).ok
    assert not bench.check_nearest(inp.z, codes, 200, best + 200, None).ok
    # a subset of rows, tiled over K, still sees the error
    rows = torch.arange(0, 300, 7)
    assert not bench.check_nearest(inp.z, codes, 200, worst, None, rows=rows, tile_k=64).ok


def test_grad_check_catches_wrong_gradients():
    inp = bench.make_inputs(bench.Shape(64, 32, 8), seed=1)
    idx = torch.cdist(inp.z, inp.codebook).argmin(1)
    ref = bench.oracle_layer_grads(inp, idx)
    good = {k: v.float() for k, v in ref.items()}
    assert bench.check_grads(good, ref).ok
    bad = dict(good, weight=good["weight"] * 1.01)
    assert not bench.check_grads(bad, ref).ok


@pytest.mark.parametrize("provider", ["reference", "cdist"])
def test_build_runner_matches_oracle_in_process(provider):
    inp = bench.make_inputs(bench.Shape(100, 50, 4))
    r = bench.build_runner(provider, "fwd", inp)
    res = bench.check_output("fwd", inp, r.output(r.run()), u=0.0, check_rows=1024)
    assert res.ok, res.detail


def test_peer_blas_environment_is_fair(monkeypatch):
    """Peers run without the environment's OpenBLAS overrides; an OpenBLAS that falls
    back to an SSE-era kernel on an AVX2/AVX-512 CPU gets the widest kernel the CPU runs."""
    from simvq_kernels.bench import blas

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    removed = {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    env, note = blas.peer_env("detect")
    assert env == removed and "removed OPENBLAS_CORETYPE=Haswell" in note
    assert blas.peer_env("inherit")[0] is None
    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    fell_back = [{"api": "openblas", "kernel": "Barcelona", "library": "libopenblas.so"}]
    native = [{"api": "openblas", "kernel": "Zen", "library": "libopenblas.so"}]
    env, note = blas.peer_env("auto", fell_back, avx512)
    assert env == dict(removed, OPENBLAS_CORETYPE="SkylakeX") and "Barcelona" in note
    assert blas.peer_env("auto", fell_back, {"avx2", "fma"})[0]["OPENBLAS_CORETYPE"] == \
        "Haswell"
    assert blas.peer_env("auto", native, avx512)[0] == removed  # its own pick stands
    assert blas.peer_env("auto", fell_back, {"sse2"})[0] == removed  # nothing better
    assert blas.peer_env("auto", None, avx512)[0] == removed  # probe failed
    assert blas.peer_env("SkylakeX")[0]["OPENBLAS_CORETYPE"] == "SkylakeX"


def test_apply_env_in_child_only(monkeypatch):
    """apply_env is what a peer's child runs before its BLAS loads: it removes and sets."""
    import os

    from simvq_kernels.bench import blas

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    blas.apply_env({"OPENBLAS_CORETYPE": "SkylakeX", "OPENBLAS_L2_SIZE": None})
    assert os.environ["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert "OPENBLAS_L2_SIZE" not in os.environ
    blas.apply_env(None)  # inherit: nothing changes
    assert os.environ["OPENBLAS_CORETYPE"] == "SkylakeX"


def test_machine_names_cpu_isa_caches_and_blas():
    from simvq_kernels.bench import machine

    info = machine.machine_info("cpu")
    for key in ("cpu", "cpu isa", "cpu caches", "torch blas", "openblas environment",
                "git commit"):
        assert info.get(key), key
    assert machine.cpu_isa({"avx2", "fma"}) == "AVX2, FMA"
    assert machine.cpu_isa({"avx512f", "avx512bw", "avx2"}).startswith("AVX-512F BW")


def test_no_issue_numbers_in_user_facing_text():
    text = bench.list_presets(show_hidden=True)
    row = bench.Row("cpu", bench.Shape(64, 32, 8), "fwd", times=[1e-3], check="pass",
                    vs_reference=5.0, ceiling=10.0)
    res = bench.BenchResult(bench.PRESETS["tiny"], "cpu", [row], {8: 10.0},
                            bench.machine_info("cpu"), [], "cpu")
    text += bench.format_report(res) + bench.format_markdown(res)
    assert "issue" not in text.lower()
    assert "targets (fused backend 'cpu'" in text


def test_deadline_skips_rows_but_still_reports(capsys):
    """--deadline 0: no row starts, every row says why, and the report is still written."""
    code = bench.main(["--preset", "tiny", "--peers", "none", "--backends", "reference",
                       "--deadline", "0", "--quiet-wait", "0", "--contention-retries", "0",
                       "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("skipped: --deadline reached") == 3  # fwd, layer, layer channel-first
    assert "not measured (--deadline reached)" in out


def test_serving_rows_are_paired_with_the_bare_search():
    """encode and the eval-mode forward are timed alternately with the bare search in one
    process; the target reads that ratio."""
    s = bench.Shape(64, 256, 16)
    preset = bench.Preset("serve-test", "", tuple(
        bench.Case(s, op, providers=("cpu",)) for op in ("fwd", "eval", "encode")))
    res = bench.run_benchmark(preset, backends=["cpu"], peers=[], device="cpu", repeat=2,
                              min_time=0.0, quiet_wait=0.0, contention_retries=0,
                              progress=False)
    rows = {r.op: r for r in res.rows}
    assert set(rows) == {"fwd", "eval", "encode"}
    assert all(r.check == "pass" for r in rows.values()), [r.check_detail for r in res.rows]
    assert rows["fwd"].paired_vs_search is None
    for op in ("eval", "encode"):
        assert rows[op].paired_vs_search is not None and rows[op].paired_vs_search > 0
    t = {name: (v, ok) for name, v, ok in bench.evaluate_targets(res)}
    key = "fused encode <= 1.25x the bare search over a precomputed codebook at 64x256x16"
    assert key in t and t[key][0].endswith("(paired)")
    assert rows["encode"].first_s is not None
