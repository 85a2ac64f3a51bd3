"""The GPU acceptance command's CPU-side logic, without a GPU: `python -m
simvq_kernels.bench --preset gpu` (simvq_kernels/bench/gpu.py) and the one-call device
script benchmarks/gpu/run.sh.

What runs here: the preset's shapes and defaults, the accuracy sweep (the 'cpu' backend
standing in for a GPU backend, and 'triton' under TRITON_INTERPRET=1) catching wrong
results, the GPU targets and reports on a synthetic CUDA result, the CLI's dry run end to
end, run.sh in its dry-run mode, and sanitize_ops.py's logic with a CPU backend. Tiny
shapes: seconds each on 2 cores."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from simvq_kernels import bench
from simvq_kernels.bench import gpu, gpu_peers, gpu_summary, providers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_INS = os.path.join(ROOT, "benchmarks", "gpu", "standins")


def test_gpu_preset_covers_the_acceptance_shapes():
    p = bench.PRESETS["gpu"]
    assert p.device == "cuda" and p.dry_run == "gpu-dry" and not p.hidden
    sw = p.sweep
    assert (sw.n, sw.ks, sw.ds) == (16384, (1024, 16384, 262144), (32, 128, 512))
    assert 0 < sw.budget <= 240  # leaves the timed rows their time in a 10-minute call
    assert set(sw.modes) == {"bf16", "tf32", "fp32"} and sw.layer
    ops = {(c.op, c.mode) for c in p.cases}
    assert {("fwd", "bf16"), ("fwd", "tf32"), ("fwd", "fp32"), ("layer", "bf16"),
            ("layer", "fp32")} <= ops
    big = [c for c in p.cases if c.memory_check]
    assert len(big) == 1 and (big[0].shape.n, big[0].shape.k, big[0].shape.d) == \
        (262144, 262144, 128) and big[0].mode == "bf16"
    assert set(big[0].providers) == {"cuda", "triton"}  # the reference would need 256 GiB
    peers = set().union(*(c.providers for c in p.cases if c.op == "fwd"))
    assert {"cuda", "triton", "reference", "cdist", "vq-pytorch", "flash-kmeans",
            "flashlib", "faiss-gpu", "matmul"} <= peers
    assert dict(p.defaults)["quiet_wait"] == 0  # a GPU run does not wait for quiet CPUs


def test_gpu_preset_runs_the_headline_shapes_first_then_the_peers():
    """The order rows run in (a run cut short by its deadline loses the tail): the
    headline shapes for our backends and cuBLAS, then for the kernel peers on the same
    shapes; then our other rows; the peers' other rows last. The kernel peers run on
    every bf16 forward shape of ours."""
    cases = bench.PRESETS["gpu"].cases
    head, big = bench.Shape(16384, 262144, 128), bench.Shape(262144, 262144, 128)
    first = [(c.shape, set(c.providers), c.mode) for c in cases[:4]]
    assert first == [(head, {"cuda", "triton", "matmul"}, "bf16"),
                     (big, {"cuda", "triton"}, "bf16"),
                     (head, {"flash-kmeans", "flashlib"}, "bf16"),
                     (big, {"flash-kmeans", "flashlib"}, "bf16")]
    ours = [i for i, c in enumerate(cases) if set(c.providers) & {"cuda", "triton"}]
    peers = [i for i, c in enumerate(cases) if i > 3 and not set(c.providers) & {"cuda",
                                                                               "triton"}]
    assert max(ours) < min(peers)
    bf16_fwd = {c.shape for c in cases if c.op == "fwd" and c.mode == "bf16"
                and "triton" in c.providers}
    kernel_peer_shapes = {c.shape for c in cases if "flashlib" in c.providers}
    assert bf16_fwd == kernel_peer_shapes and len(bf16_fwd) == 6
    assert all(c.mode == "bf16" for c in cases if "flashlib" in c.providers)


_PEER_PACKAGES = ("flash_kmeans", "flashlib", "_peer_stand_in")


def _peer_modules():
    return [n for n in sys.modules if n.split(".")[0] in _PEER_PACKAGES]


@pytest.fixture
def stand_ins(monkeypatch):
    """The stand-ins first on sys.path (as run.sh's dry run puts them), imported afresh;
    the modules imported before are back afterwards."""
    saved = {n: sys.modules.pop(n) for n in _peer_modules()}
    monkeypatch.syspath_prepend(STAND_INS)
    monkeypatch.setenv(gpu_peers.STAND_INS_ENV, "1")
    yield
    for n in _peer_modules():
        del sys.modules[n]
    sys.modules.update(saved)


@pytest.mark.parametrize("peer", ["flash-kmeans", "flashlib"])
def test_gpu_peer_code_paths_with_stand_ins(peer, stand_ins):
    """The peers' builders (imports, argument shapes and dtypes, precomputed norms,
    output conversion) on CPU tensors through the stand-ins, which check their arguments
    as the real wrappers do."""
    for mode in ("bf16", "tf32"):
        inp = bench.make_inputs(bench.Shape(70, 33, 16), mode=mode)
        r = providers.build_runner(peer, "fwd", inp)
        out = r.output(r.run())
        assert out["idx"].dtype == torch.int64 and out["dist"] is None
        res = bench.check_output("fwd", inp, out, u=2.0**-8, check_rows=70)
        assert res.ok, res.detail


def _import_fresh(module, path_first=None):
    """``module`` imported afresh (with ``path_first`` at the head of sys.path, and
    without the stand-ins otherwise); sys.modules and sys.path are as before after."""
    import importlib

    saved_mods = {n: sys.modules.pop(n) for n in _peer_modules()}
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != STAND_INS]
    if path_first:
        sys.path.insert(0, path_first)
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
    finally:
        sys.path[:] = saved_path
        for n in _peer_modules():
            del sys.modules[n]
        sys.modules.update(saved_mods)


@pytest.mark.parametrize("module", ["flash_kmeans.assign_euclid_triton",
                                    "flashlib.primitives.kmeans.triton.assign"])
def test_stand_ins_have_the_real_signatures(module):
    """Where the real package is installed (the GPU machine, or a developer's), its
    euclid_assign_triton takes the same arguments as the stand-in's."""
    import inspect

    real = _import_fresh(module)
    if real is None:
        pytest.skip(f"{module} (the real package) is not installed")
    assert not getattr(real, "STAND_IN", False)
    stand_in = _import_fresh(module, STAND_INS)
    assert stand_in.STAND_IN
    assert str(inspect.signature(stand_in.euclid_assign_triton)) == \
        str(inspect.signature(real.euclid_assign_triton))


def test_gpu_summary_side_by_side(tmp_path):
    """The side-by-side table: TFLOP/s per shape and mode for our backends, the
    same-shape cuBLAS product and the peers; a row that did not run says so."""
    s = bench.Shape(16384, 262144, 128)
    rows = [_row("cuda", s, "fwd", s.search_flops / 600e12 * 1e3),
            _row("triton", s, "fwd", s.search_flops / 300e12 * 1e3),
            _row("matmul", s, "fwd", s.search_flops / 500e12 * 1e3),
            _row("flash-kmeans", s, "fwd", s.search_flops / 400e12 * 1e3),
            _row("reference", s, "fwd", 5.0)]
    skipped = _row("flashlib", s, "fwd", 1.0)
    skipped.status, skipped.times = "skipped", []
    rows.append(skipped)
    res = bench.BenchResult(bench.PRESETS["gpu"], "cuda:0", rows, {}, bench.machine_info("cpu"),
                            [], ("cuda", "triton"), None)
    path = tmp_path / "gpu.csv"
    bench.write_csv(res, str(path))
    md = gpu_summary.summary_markdown(str(path))
    assert "| cuda | triton | cuBLAS same shape | flash-kmeans (Triton) | flashlib (Triton) |" \
        in md
    assert "| 16384x262144x128 | bf16 | 600.0 | 300.0 | 500.0 | 400.0 | skipped |" in md
    assert "reference" not in md.split("|---")[0]
    assert "issue" not in md.lower()


def test_gpu_preset_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        bench.main(["--preset", "gpu"])


def test_providers_modes_and_devices():
    assert "bf16" not in providers.PROVIDERS["cdist"].modes
    for peer in ("flash-kmeans", "flashlib"):
        assert providers.PROVIDERS[peer].devices == ("cuda",)
        assert "fp32" not in providers.PROVIDERS[peer].modes  # their fp32 dot is tf32
    s = bench.Shape(8, 4, 2)
    assert providers.skip_reason("cdist", bench.Case(s, "fwd", mode="bf16"), "cpu",
                                 2**34) == "n/a"
    assert providers.skip_reason("cpu", bench.Case(s, "fwd", mode="bf16"), "cpu",
                                 2**34) is None
    # the same-shape product: a ceiling row, nothing to check, its output preallocated
    inp = bench.make_inputs(bench.Shape(16, 8, 4))
    r = providers.PROVIDERS["matmul"].build("fwd", inp)
    res = bench.check_output("fwd", inp, r.output(r.run()), u=0.0, check_rows=64)
    assert res.ok and res.label == "n/a"


@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_inputs_in_each_mode(mode):
    inp = bench.make_inputs(bench.Shape(32, 16, 8), mode=mode)
    want = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}[mode]
    assert inp.z.dtype == want and inp.codebook.dtype == want
    assert inp.weight.dtype == torch.float32  # layer rows run under autocast
    assert (inp.autocast is not None) == (mode == "bf16")
    assert float(inp.z.float().abs().sum()) > 0


def _tiny_sweep(**kw):
    return gpu.Sweep(**dict(dict(n=48, ks=(7, 33), ds=(5, 16), modes=("bf16", "fp32"),
                                 rows=24), **kw))


def test_sweep_passes_a_correct_backend():
    spec = {"provider": "cpu", "device": "cpu", "seed": 3,
            "sweep": vars(_tiny_sweep())}
    out = gpu.sweep_in_child(spec)
    recs = out["records"]
    assert len(recs) == 2 * 2 * 2 * 2  # K x d x mode x (search, layer)
    assert all(r["ok"] for r in recs), [r for r in recs if not r["ok"]]
    assert {r["what"] for r in recs} == {"fwd", "layer"}


def test_sweep_catches_wrong_picks_and_gradients(monkeypatch):
    """A backend that returns the worst code, or a scaled gradient, fails the sweep."""
    real = providers.build_runner

    def wrong(provider, op, inp):
        r = real(provider, op, inp)
        if op == "fwd":
            def bad_out(o):
                d = torch.cdist(inp.z.double(), inp.codebook.double())
                return {"idx": d.argmax(1), "dist": o[1]}
            return providers.Runner(r.run, bad_out)

        def bad_grads(o):
            out = r.output(o)
            out["grads"] = dict(out["grads"], weight=out["grads"]["weight"] * 1.5)
            return out
        return providers.Runner(r.run, bad_grads)

    monkeypatch.setattr(providers, "build_runner", wrong)
    res = gpu.SweepResult(_tiny_sweep(ks=(33,), ds=(16,), modes=("fp32",)))
    res.records = gpu.sweep_in_child({"provider": "cpu", "device": "cpu", "seed": 0,
                                      "sweep": vars(res.sweep)})["records"]
    res.backends = ["cpu"]
    assert [r["ok"] for r in res.records] == [False, False]
    (target,) = res.targets()
    assert target[2] == "MISSED" and target[1] == "0/2 checks"
    assert "FAIL cpu fwd fp32" in res.text() and "**FAIL**" in res.markdown()


def test_sweep_runs_k_by_k_within_its_budget(monkeypatch):
    """Every backend's small-K part runs before any large-K part, and no part starts
    once the budget is spent: those are reported as not run, not as failures."""
    from simvq_kernels.bench import child

    calls, clock = [], [0.0]

    def fake_child(spec, timeout):
        calls.append((spec["provider"], spec["sweep"]["ks"][0]))
        clock[0] += 10.0  # each part takes 10 s
        return {"status": "ok", "records": []}

    monkeypatch.setattr(child, "run_in_child", fake_child)
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: clock[0])
    sw = gpu.Sweep(n=8, ks=(7, 33, 99), ds=(4,), modes=("fp32",), rows=4, budget=25.0)
    res = sw.run(["cpu", "triton"], "cpu", case_timeout=60.0)
    assert calls == [("cpu", 7), ("triton", 7), ("cpu", 33)]
    assert res.errors == [] and res.backends == ["cpu", "triton"]
    assert len(res.skipped) == 3 and "triton K=33: not run" in res.skipped[0]
    assert "Not run:" in res.markdown() and "not run" in res.text()


def test_sweep_under_the_triton_interpreter(tmp_path):
    """The sweep's triton path on CPU tensors (TRITON_INTERPRET=1 must be set before
    triton is imported: a fresh process)."""
    code = ("from simvq_kernels.bench import gpu; import json, sys; "
            "sw = gpu.Sweep(n=40, ks=(9,), ds=(16,), modes=('bf16', 'fp32'), rows=16); "
            "out = gpu.sweep_in_child({'provider': 'triton', 'device': 'cpu', 'seed': 1, "
            "'sweep': vars(sw)}); print(json.dumps(out['records']))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    recs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(recs) == 4 and all(r["ok"] for r in recs), recs


def _row(provider, shape, op, ms, mode="bf16", **kw):
    return bench.Row(provider, shape, op, times=[ms / 1e3], check="pass", mode=mode, **kw)


def test_gpu_targets_and_reports(tmp_path):
    """A synthetic CUDA result: % of the bf16 ceiling, x the same-shape product and the
    peers, memory, the sweep; every report names its targets by what they are."""
    s = bench.Shape(16384, 16384, 128)
    big = bench.Shape(262144, 262144, 128)
    flops = s.search_flops
    rows = [_row("cuda", s, "fwd", flops / 600e12 * 1e3),  # 600 TFLOP/s
            _row("triton", s, "fwd", flops / 300e12 * 1e3),
            _row("matmul", s, "fwd", flops / 500e12 * 1e3),
            _row("flash-kmeans", s, "fwd", flops / 400e12 * 1e3),
            _row("reference", s, "fwd", 5.0),
            _row("cuda", s, "layer", 2.0), _row("reference", s, "layer", 9.0),
            _row("cuda", big, "fwd", 40.0, memory_check=True, peak_bytes=64 * 2**20)]
    rows[2].check = "n/a"
    for r in rows:
        r.ceiling = 800e3  # GFLOP/s, bf16 8192^3
    from simvq_kernels.bench.run import _fill_ratios

    _fill_ratios(rows)
    sweep = gpu.SweepResult(_tiny_sweep(), records=[
        {"backend": "cuda", "n": 48, "k": 7, "d": 5, "mode": "bf16", "what": w, "ok": True,
         "detail": "ok", "seconds": 0.1} for w in ("fwd", "layer")], backends=["cuda"])
    machine = dict(bench.machine_info("cpu"), gpu="NVIDIA H200", driver="580.0")
    res = bench.BenchResult(bench.PRESETS["gpu"], "cuda:0", rows, {"bf16": 800e3}, machine,
                            [], ("cuda", "triton"), sweep)
    t = {name: (v, ok) for name, v, ok in bench.evaluate_targets(res)}
    key = "cuda fwd bf16 >= 60% of the bf16 tensor-core ceiling (cuBLAS 8192^3) at " \
          "16384x16384x128"
    assert t[key] == ("75.0%", "met")
    assert t[key.replace("cuda", "triton", 1)] == ("37.5%", "MISSED")
    same = "the same-shape cuBLAS product (which writes N x K) at 16384x16384x128"
    assert t[f"cuda fwd bf16 >= 1.0x {same}"] == ("1.20x", "met")
    assert t["triton fwd bf16 >= 1.0x flash-kmeans at 16384x16384x128"] == ("0.75x",
                                                                         "MISSED")
    assert t["cuda layer fwd+bwd bf16 >= 2x reference layer at 16384x16384x128"] == \
        ("4.50x", "met")
    assert t["cuda fwd bf16 peak memory < 256 MiB above inputs at 262144x262144x128"] == \
        ("64.0 MiB", "met")
    assert any(k.startswith("cuda: accuracy sweep") and v == ("2/16 checks", "MISSED")
               for k, v in t.items())
    text = bench.format_report(res)
    md = bench.format_markdown(res)
    assert "bf16 8192x8192x8192: 800000.0" in text and "Accuracy sweep" in md
    assert "issue" not in (text + md).lower()
    bench.write_csv(res, str(tmp_path / "gpu.csv"))
    with open(tmp_path / "gpu.csv") as f:
        got = list(csv.DictReader(f))
    assert got[0]["mode"] == "bf16" and float(got[0]["vs_matmul"]) == pytest.approx(1.2)
    bench.write_plot(res, str(tmp_path / "gpu.png"))
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_run_sh_dry_run(tmp_path):
    """benchmarks/gpu/run.sh in its dry-run mode, which runs `--preset gpu --dry-run` (the
    preset's logic on tiny shapes on the CPU): stages, budget, files, summary, and the
    sweep, precision modes, memory case, ceilings and reports of the bench."""
    out = tmp_path / "dev"
    # a generous budget: the stage logic is under test, not this machine's speed
    env = dict(os.environ, OUT=str(out), DRY_RUN="1", BUDGET="1000", CAP_BENCH="900",
               DRY_BACKENDS="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh")],
                          capture_output=True, text=True, env=env, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("run.log", "gpu.md", "gpu.csv", "gpu.png", "gpu-accuracy.csv"):
        assert (out / f).stat().st_size > 0, f
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    summary = proc.stdout[proc.stdout.index("GPU acceptance summary"):]
    for stage in ("build", "bench", "tests", "sanitize"):
        assert stage in summary
    assert "FAILED" not in summary and "Accuracy sweep" not in summary  # md not echoed
    with open(out / "gpu-accuracy.csv") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 2 * 2 * 3 * 2 and all(r["ok"] == "True" for r in recs)
    with open(out / "gpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"bf16", "tf32", "fp32"}
    assert all(r["check"] == "pass" for r in rows if r["status"] == "ok")
    # the peers ran through their stand-ins, on every bf16 forward shape of ours
    ours = {(r["n"], r["k"], r["d"]) for r in rows
            if r["provider"] == "cpu" and r["mode"] == "bf16" and r["op"] == "fwd"}
    for peer in ("flash-kmeans", "flashlib"):
        got = {(r["n"], r["k"], r["d"]) for r in rows if r["provider"] == peer
               and r["status"] == "ok" and r["check"] == "pass"}
        assert got == ours, (peer, got, ours)
    log = (out / "run.log").read_text()
    assert "accuracy sweep" in log and "targets (fused backend 'cpu'" in log
    md = (out / "gpu.md").read_text()
    assert "## Accuracy sweep" in md and "## Targets" in md
    assert "## GPU kernels side by side" in md and "stand-ins" in md
    side = summary[summary.index("GPU kernels side by side"):summary.index("targets (from")]
    assert "flash-kmeans (Triton)" in side and "flashlib (Triton)" in side
    assert "| 64x40x16 | bf16 |" in side
    targets = summary[summary.index("targets (from"):]
    assert "flash-kmeans (Triton)" not in targets


def test_run_sh_rejects_an_unknown_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"),
                           "nonsense"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "unknown stage 'nonsense'" in proc.stdout


def test_sanitize_ops_logic_on_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu",
                                                        "sanitize_ops.py"),
                           "--device", "cpu", "--backends", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 wrong result(s)" in proc.stdout and "layer fwd+bwd" in proc.stdout
