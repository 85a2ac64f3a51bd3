"""The collapse demos (python/train_images.py, python/train_audio.py) in their tiny
--quick mode: each runs end to end in seconds into a temporary folder and writes its
table, CSV, JSON and figures. The claim itself (SimVQ keeps the codebook in use where
plain VQ collapses) is shown by the committed default-run results in python/results/,
not asserted here: a few dozen steps cannot show it.

Also checks the pieces the demos rely on: the plain-VQ baseline's loss, straight-through
estimator and gradients, the data split and determinism, and that importing
simvq_kernels imports neither the experiments nor matplotlib.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"images": ("train_images.py", ("skimage", "matplotlib"),
                       ("utilisation_vs_k.png", "utilisation_over_steps.png",
                        "recon_grid.png")),
            "audio": ("train_audio.py", ("matplotlib",),
                      ("utilisation_vs_k.png", "utilisation_over_steps.png",
                       "recon_examples.png"))}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_quick_run_writes_its_outputs(name, tmp_path):
    script, needs, pngs = PROGRAMS[name]
    for mod in needs:  # in the `test` extra: missing means a broken install, not a skip
        __import__(mod)
    from simvq_kernels.experiments.train import parse_markdown_table

    out = tmp_path / name
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", script), "--quick", "--no-progress",
         "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rows = parse_markdown_table((out / "results.md").read_text())
    assert {(r["K"], r["quantiser"]) for r in rows} == {
        (k, q) for k in ("64", "256") for q in ("plain VQ", "SimVQ")}
    metric = "PSNR (dB)" if name == "images" else "SNR (dB)"
    for r in rows:
        util = float(r["held-out utilisation"].rstrip("%"))
        assert 0 < util <= 100
        assert 1 <= int(r["codes used"]) <= int(r["K"])
        assert 1 <= float(r["perplexity"]) <= int(r["K"])
        assert math.isfinite(float(r["MSE"])) and float(r["MSE"]) >= 0
        assert math.isfinite(float(r[metric]))

    payload = json.loads((out / "results.json").read_text())
    assert payload["task"] == name and len(payload["results"]) == 4
    for r in payload["results"]:
        assert r["history"] and r["history"][-1]["step"] == payload["config"]["steps"]
        assert r["tokens_per_code"] >= 10  # full utilisation is possible
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("quantiser,codebook_size")
    for png in pngs:
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) < 300_000, png


def test_package_import_does_not_import_the_demos():
    code = ("import sys, simvq_kernels; "
            "bad = [m for m in ('simvq_kernels.experiments', 'matplotlib', 'skimage') "
            "if m in sys.modules]; print(bad); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and importing the experiments does not import matplotlib either (plots are lazy)
    code = ("import sys, simvq_kernels.experiments; "
            "assert 'matplotlib' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plain_vq_matches_simvq_loss_and_estimator():
    from simvq_kernels import nn as sk_nn
    from simvq_kernels.experiments.models import PlainVQ

    torch.manual_seed(0)
    q = PlainVQ(8, 16, channel_first=True)
    assert float(q.codebook.detach().abs().max()) <= 1 / 16  # taming's U(-1/K, 1/K)
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out, idx, loss = q(z)
    assert out.shape == z.shape and idx.shape == (2, 3, 5) and idx.dtype == torch.long
    flat = z.detach().movedim(1, -1).reshape(-1, 8)
    d = torch.cdist(flat.double(), q.codebook.detach().double())
    assert torch.equal(idx.reshape(-1), d.argmin(1))
    zq = q.codebook.detach()[idx.reshape(-1)]
    torch.testing.assert_close(loss, sk_nn.simvq_loss(flat, zq, 0.25, False))
    torch.testing.assert_close(out.detach().movedim(1, -1).reshape(-1, 8), zq)
    torch.testing.assert_close(q.indices_to_codes(idx), out.detach())
    (out.sum() + loss).backward()
    # straight-through: d out / d z = 1, plus the commitment term 2 beta (z - zq) / numel
    commit = (2 * 0.25 / flat.numel()) * (flat - zq)
    torch.testing.assert_close(z.grad.movedim(1, -1).reshape(-1, 8), 1 + commit)
    # only the picked codes get a gradient (why plain VQ collapses)
    used = torch.zeros(16, dtype=torch.bool)
    used[idx.reshape(-1)] = True
    g = q.embedding.weight.grad
    assert bool((g[~used] == 0).all()) and bool((g[used].abs().sum(1) > 0).all())


def test_same_encoder_decoder_for_both_quantisers():
    from simvq_kernels.experiments.models import build_autoencoder

    kw = dict(in_ch=1, dim=8, hidden=16, n_down=2, nd=1, seed=3)
    a = build_autoencoder("plain", 32, **kw)
    b = build_autoencoder("simvq", 32, **kw)
    for part in ("encoder", "decoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 1, 64)
    assert a(x)[0].shape == x.shape and b(x)[0].shape == x.shape


def test_synthetic_speech_is_deterministic():
    from simvq_kernels.experiments.data import synth_speech

    a = synth_speech(2, 0.25, seed=7)
    b = synth_speech(2, 0.25, seed=7)
    c = synth_speech(2, 0.25, seed=8)
    assert a.shape == (2, 4000) and a.dtype.name == "float32"
    assert (a == b).all() and not (a == c).all()
    assert 0.3 < float(abs(a).max()) < 0.6 and float(a.std()) > 0.01
    # utterance i is the same whatever the count: a longer held-out stream starts
    # with the shorter one
    assert (synth_speech(3, 0.25, seed=7)[:2] == a).all()


def test_heldout_crops_never_touch_training_pixels():
    from simvq_kernels.experiments.data import CropSource

    # one image whose columns are numbered: a crop's column values give its position
    w, h = 200, 40
    img = torch.arange(w, dtype=torch.float32).repeat(3, h, 1)
    src = CropSource([("cols", img)], crop=16)
    cut = src.split[0]
    gen = torch.Generator().manual_seed(0)
    train = src.train_batch(gen, 200)
    held = src.heldout_set(200, seed=1)
    assert float(train.max()) < cut <= float(held.min())
    assert torch.equal(held, src.heldout_set(200, seed=1))


def _tiny_task():
    from simvq_kernels.experiments.train import Task

    gen = torch.Generator().manual_seed(5)
    heldout = torch.rand(16, 1, 64, generator=gen)
    return Task(name="audio", in_ch=1, nd=1, n_down=2, dim=8, hidden=16, tokens_per_item=16,
                train_batch=lambda g, n: torch.rand(n, 1, 64, generator=g), heldout=heldout,
                recon_metric="snr")


@pytest.mark.parametrize("budget", ["cpu", "time", "steps"])
def test_training_budgets_and_heldout_evaluations(budget):
    from simvq_kernels.experiments.train import TrainConfig, run_one

    # budgets well above one step's cost; a warm-up run first pays the one-off set-up
    run_one(_tiny_task(), "simvq", 32, TrainConfig(steps=2, batch_size=4, window=5,
                                                    threads=1, progress=False))
    kw = {"cpu": {"cpu_budget": 1.5}, "time": {"time_budget": 1.5}, "steps": {}}[budget]
    cfg = TrainConfig(steps=40 if budget == "steps" else 10**6, batch_size=4, log_every=5,
                      window=5, threads=1, progress=False, heldout_evals=2, **kw)
    r = run_one(_tiny_task(), "simvq", 32, cfg)
    hist = r["history"]
    assert r["steps_done"] == hist[-1]["step"] and 1 <= r["steps_done"] < 10**6
    assert r["stopped_by"] == {"cpu": "CPU budget", "time": "time budget",
                               "steps": "steps"}[budget]
    if budget == "steps":
        assert r["steps_done"] == 40
    elif budget == "cpu":  # stops after the step that spends the budget
        assert 1.5 <= r["train_cpu_seconds"] < 30 and hist[-1]["train_cpu_seconds"] >= 1.5
    else:
        assert 1.5 <= r["train_seconds"] < 30 and hist[-1]["train_seconds"] >= 1.5
    # held-out evaluations during training: at most 2, at increasing steps, with counts
    # consistent with the utilisation; their time is not counted in the training time
    # (a wall-clock budget may be spent in one step on a loaded machine: no count there)
    mid = [h for h in hist if "heldout_utilisation" in h]
    assert len(mid) <= 2 and (budget == "time" or len(mid) >= 1)
    assert [h["step"] for h in mid] == sorted({h["step"] for h in mid})
    assert all(h["step"] < r["steps_done"] for h in mid)
    for h in mid:
        assert h["heldout_utilisation"] == h["heldout_used"] / 32
        assert 1 <= h["heldout_used"] <= 32 and math.isfinite(h["heldout_mse"])
    assert (r["heldout_evals_during_training_seconds"] > 0) == bool(mid)
    steps = [h["step"] for h in hist]
    assert steps == sorted(set(steps))


def test_large_k_report_collects_runs(tmp_path):
    from simvq_kernels.experiments.train import TrainConfig, environment, run_one

    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import large_k_report
    finally:
        sys.path.pop(0)
    task = _tiny_task()
    for kind, k, lr in (("simvq", 64, 2e-3), ("plain", 32, 1e-3), ("simvq", 32, 2e-3)):
        cfg = TrainConfig(steps=10**6, batch_size=4, lr=lr, log_every=5, window=5,
                          threads=1, progress=False, cpu_budget=0.1, heldout_evals=1)
        r = run_one(task, kind, k, cfg)
        d = tmp_path / "runs" / f"{kind}_{k}"
        d.mkdir(parents=True)
        from dataclasses import asdict
        (d / "results.json").write_text(json.dumps(
            {"task": "audio", "config": asdict(cfg), "task_notes": {},
             "environment": environment(), "results": [r], "argv": []}))
    rows = large_k_report.main(["--task", "audio", "--runs", str(tmp_path / "runs")])
    assert [(r["codebook_size"], r["quantiser"]) for r in rows] == [
        (32, "plain"), (32, "simvq"), (64, "simvq")]
    from simvq_kernels.experiments.train import parse_markdown_table

    # the first table (a second one lists the held-out evaluations during training)
    text = (tmp_path / "results.md").read_text()
    table = parse_markdown_table(text.split("Held-out utilisation during training")[0])
    assert [(t["K"], t["quantiser"], t["Adam lr"]) for t in table] == [
        ("32", "plain VQ", "0.001"), ("32", "SimVQ", "0.002"), ("64", "SimVQ", "0.002")]
    for t, r in zip(table, rows):
        assert t["codes used"] == str(r["used"]) and t["steps done"] == str(r["steps_done"])
        assert t["stopped by"] == "CPU budget"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["runs"]) == 3 and len(payload["results"]) == 3
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 4
    for png in ("utilisation_over_steps.png", "utilisation_vs_k.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------ extra quantisers (rotation trick)

def test_extra_quantisers_are_what_they_say():
    from simvq_kernels import nn as sk_nn
    from simvq_kernels.experiments.models import build_autoencoder

    kw = dict(in_ch=1, dim=8, hidden=16, n_down=2, nd=1, seed=3)
    ours = build_autoencoder("simvq", 32, **kw).quantiser
    rot = build_autoencoder("simvq_rot", 32, **kw).quantiser
    assert isinstance(rot, sk_nn.SimVQ) and rot.rotation_trick and not ours.rotation_trick
    assert torch.equal(rot.basis, ours.basis) and torch.equal(rot.weight, ours.weight)
    # the rotation trick sends z a different gradient than straight-through (same value)
    z = torch.randn(2, 8, 5, requires_grad=True)
    grads, outs = [], []
    for q in (ours, rot):
        out, _, _ = q(z)
        (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), z)
        grads.append(g)
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grads[0], grads[1])

    vqp = pytest.importorskip("vector_quantize_pytorch")
    for kind, rotates in (("vqp", True), ("vqp_ste", False)):
        q = build_autoencoder(kind, 32, **kw).quantiser
        assert isinstance(q, vqp.SimVQ) and q.rotation_trick is rotates and q.channel_first
        # drawn like ours: same frozen basis and projection under the same seed
        assert torch.equal(q.frozen_codebook, ours.basis)
        assert torch.equal(q.code_transform.weight, ours.weight)
        out, idx, loss = q(z)
        assert out.shape == z.shape and idx.shape == (2, 5) and loss.dim() == 0


def test_dense_search_quantisers_are_evaluated_in_capped_batches(monkeypatch):
    """vector-quantize-pytorch's search builds the tokens x K matrix: held-out batches
    shrink so that it stays under DENSE_EVAL_BYTES, with the same metrics as one batch;
    our layer keeps the full batch."""
    pytest.importorskip("vector_quantize_pytorch")
    from simvq_kernels.experiments import train
    from simvq_kernels.experiments.models import build_autoencoder

    task = _tiny_task()  # 16 items x 16 tokens
    kw = dict(in_ch=1, dim=8, hidden=16, n_down=2, nd=1, seed=3)
    for kind, cap, want in (("vqp", 4 * 16 * 32 * 5, 5), ("vqp_ste", 1, 1),
                            ("simvq", 1, 16)):
        model = build_autoencoder(kind, 32, **kw)
        full = train.evaluate(model, task, 32, eval_batch=16)
        seen = []
        hook = model.quantiser.register_forward_hook(
            lambda mod, args, out: seen.append(args[0].shape[0]))
        monkeypatch.setattr(train, "DENSE_EVAL_BYTES", cap)
        got = train.evaluate(model, task, 32, eval_batch=16)
        monkeypatch.undo()
        hook.remove()
        assert max(seen) == want and sum(seen) == 16, (kind, seen)
        assert got["used"] == full["used"] and got["perplexity"] == pytest.approx(
            full["perplexity"]) and got["mse"] == pytest.approx(full["mse"])


def test_sweep_skips_vq_pytorch_quantisers_without_the_package(monkeypatch):
    from simvq_kernels.experiments import models
    from simvq_kernels.experiments.train import TrainConfig, markdown_table, run_sweep

    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import fails
    assert "vector-quantize-pytorch" in models.unavailable_reason("vqp")
    assert models.unavailable_reason("simvq_rot") is None
    with pytest.raises(ImportError, match="vector-quantize-pytorch"):
        models.make_quantiser("vqp_ste", 8, 16)
    logs = []
    task = _tiny_task()
    cfg = TrainConfig(steps=3, batch_size=2, log_every=1, window=2, threads=1,
                      progress=False)
    res = run_sweep(task, cfg, [16], ["simvq_rot", "vqp", "vqp_ste"], log=logs.append)
    assert [r["quantiser"] for r in res] == ["simvq_rot"]
    assert sum("skipping vqp" in m and "vector-quantize-pytorch" in m for m in logs) == 2
    assert "SimVQ + rotation trick" in markdown_table(task, res)
    with pytest.raises(ValueError, match="unknown quantiser"):
        run_sweep(task, cfg, [16], ["nonsense"], log=logs.append)


# ------------------------------------------- utilisation over tokens per code

def test_expected_seen_fraction_exact_and_simulated():
    import itertools

    from simvq_kernels.experiments.curve import expected_seen_fraction

    # exact: enumerate every sequence of n draws from a 4-code histogram (one code dead)
    p = torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    for n in (1, 2, 3, 5):
        exact = 0.0
        for seq in itertools.product(range(4), repeat=n):
            exact += math.prod(float(p[s]) for s in seq) * len(set(seq)) / 4
        assert math.isclose(expected_seen_fraction(p, n), exact, rel_tol=1e-12), n
    # closed form for a uniform histogram, and the limits
    assert math.isclose(expected_seen_fraction(torch.full((10,), 0.1, dtype=torch.float64), 7),
                        1 - 0.9 ** 7, rel_tol=1e-12)
    assert expected_seen_fraction(p, 10**9) == pytest.approx(0.75)  # the dead code stays out
    assert expected_seen_fraction(torch.tensor([1.0, 0.0]), 3) == 0.5
    # simulated: a skewed histogram over 50 codes, 40 draws, 4000 trials
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(50, generator=gen, dtype=torch.float64) ** 4
    q /= q.sum()
    draws = torch.multinomial(q.expand(4000, 50), 40, replacement=True, generator=gen)
    seen = torch.zeros(4000, 50).scatter_(1, draws, 1.0).mean(1)
    sim, se = float(seen.mean()), float(seen.std()) / 4000 ** 0.5
    assert abs(expected_seen_fraction(q, 40) - sim) < 4 * se
    with pytest.raises(ValueError):
        expected_seen_fraction(torch.tensor([0.5, 0.4]), 3)  # not a distribution


def test_utilisation_curve_counts_prefixes():
    from simvq_kernels.experiments.curve import chao1, perplexity, utilisation_curve

    idx = torch.tensor([0, 1, 0, 2, 0, 3, 3, 1])  # K = 6: codes 4, 5 never picked
    cv = utilisation_curve(idx, 6, [2, 4, 8])
    assert [p["used"] for p in cv["points"]] == [2, 3, 4]
    assert [p["tokens_per_code"] for p in cv["points"]] == [2 / 6, 4 / 6, 8 / 6]
    assert cv["points"][0]["perplexity"] == pytest.approx(2.0)  # {0, 1} once each
    counts = torch.tensor([3, 2, 1, 2, 0, 0])
    assert perplexity(counts) == pytest.approx(
        math.exp(-sum(c / 8 * math.log(c / 8) for c in (3, 2, 1, 2))))
    full = cv["full"]
    assert full["used"] == 4 and full["singletons"] == 1 and full["doubletons"] == 2
    assert full["good_turing_unseen_mass"] == pytest.approx(1 / 8)
    assert full["chao1_codes"] == pytest.approx(4 + 1 / 4) == chao1(counts)
    # the expected fraction under the full histogram is the mean of 1 - (1 - p)^n
    p = counts.double() / 8
    assert cv["points"][1]["expected_seen"] == pytest.approx(
        float((1 - (1 - p) ** 4).mean()))
    with pytest.raises(ValueError):
        utilisation_curve(idx, 6, [9])


def _import_heldout_curve():
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import heldout_curve
    finally:
        sys.path.pop(0)
    return heldout_curve


def test_heldout_curve_program_with_kmeans(tmp_path):
    pytest.importorskip("skimage")
    from simvq_kernels.experiments import data
    from simvq_kernels.experiments.train import Task, TrainConfig, run_one

    src = data.CropSource(data.load_skimage_images(("camera",)), crop=16)
    task = Task(name="images", in_ch=3, nd=2, n_down=2, dim=8, hidden=16,
                tokens_per_item=16, train_batch=src.train_batch,
                heldout=src.heldout_set(4, seed=1), notes={"images": ["camera"], "crop": 16})
    cfg = TrainConfig(steps=3, batch_size=2, log_every=1, window=2, threads=1,
                      progress=False, save_models=str(tmp_path / "models"))
    r = run_one(task, "simvq", 32, cfg)
    assert os.path.exists(r["checkpoint"])
    heldout_curve = _import_heldout_curve()
    threads = torch.get_num_threads()
    try:
        payload = heldout_curve.main(["--checkpoint", r["checkpoint"], "--tokens-per-code",
                                      "1,3", "--kmeans-iters", "2",
                                      "--kmeans-tokens-per-code", "2", "--chunk", "4",
                                      "--out", str(tmp_path / "curve")])
    finally:
        torch.set_num_threads(threads)
    assert set(payload["curves"]) == {"SimVQ", "k-means"}
    for cv in payload["curves"].values():
        assert [p["tokens"] for p in cv["points"]] == [32, 96]
        used = [p["used"] for p in cv["points"]]
        assert 1 <= used[0] <= used[1] <= 32 and cv["full"]["used"] == used[1]
    assert len(payload["kmeans_history"]) == 2
    only = heldout_curve.main(["--checkpoint", r["checkpoint"], "--tokens-per-code", "1",
                               "--kmeans-iters", "1", "--kmeans-tokens-per-code", "2",
                               "--kmeans-only", "--out", str(tmp_path / "km")])
    assert set(only["curves"]) == {"k-means"}
    torch.set_num_threads(threads)
    lines = (tmp_path / "curve" / "curve.csv").read_text().strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("codebook,tokens")
    assert (tmp_path / "curve" / "utilisation_vs_tokens_per_code.png").read_bytes()[:4] \
        == b"\x89PNG"


def _tiny_audio_checkpoint(tmp_path, heldout_utterances):
    """A 3-step SimVQ audio model with K = 16 saved under tmp_path (utterances of 0.1 s:
    25 windows of 8 tokens each): (run_one's result, the held-out windows it was
    evaluated on)."""
    from simvq_kernels.experiments import data
    from simvq_kernels.experiments.train import Task, TrainConfig, run_one

    seconds, window = 0.1, 64
    src = data.WaveSource(data.synth_speech(2, seconds, seed=data.AUDIO_TRAIN_SEED),
                          window=window)
    held = data.WaveSource.windows(data.synth_speech(heldout_utterances, seconds,
                                                     seed=data.AUDIO_HELDOUT_SEED), window)
    task = Task(name="audio", in_ch=1, nd=1, n_down=3, dim=8, hidden=16,
                tokens_per_item=8, train_batch=src.train_batch, heldout=held,
                notes={"window": window, "hop": 8, "utterance_seconds": seconds,
                       "train_seconds_of_audio": 2 * seconds})
    cfg = TrainConfig(steps=3, batch_size=2, log_every=1, window=2, threads=1,
                      progress=False, save_models=str(tmp_path / "models"))
    return run_one(task, "simvq", 16, cfg), held


def test_heldout_curve_program_on_audio(tmp_path):
    from simvq_kernels.experiments import data

    r, held = _tiny_audio_checkpoint(tmp_path, heldout_utterances=2)
    heldout_curve = _import_heldout_curve()
    threads = torch.get_num_threads()
    try:
        payload = heldout_curve.main(["--checkpoint", r["checkpoint"], "--task", "audio",
                                      "--tokens-per-code", "10,20", "--kmeans-iters", "2",
                                      "--kmeans-tokens-per-code", "4", "--chunk", "8",
                                      "--out", str(tmp_path / "curve")])
        with pytest.raises(SystemExit):  # the training utterances' seed
            heldout_curve.main(["--checkpoint", r["checkpoint"], "--tokens-per-code", "1",
                                "--seed", str(data.AUDIO_TRAIN_SEED), "--out",
                                str(tmp_path / "bad")])
        with pytest.raises(SystemExit):  # not an image model
            heldout_curve.main(["--checkpoint", r["checkpoint"], "--task", "images",
                                "--tokens-per-code", "1", "--out", str(tmp_path / "bad")])
    finally:
        torch.set_num_threads(threads)
    assert payload["task"] == "audio" and payload["stream_seed"] == data.AUDIO_HELDOUT_SEED
    assert set(payload["curves"]) == {"SimVQ", "k-means"}
    for cv in payload["curves"].values():
        assert [p["tokens"] for p in cv["points"]] == [160, 320]
    # the stream is the held-out utterances' windows in order: its first 160 tokens
    # (20 windows) are the demo's held-out set's first windows
    model, _ = heldout_curve.load_model(r["checkpoint"])
    first = heldout_curve.latents(model, held[:20])
    import simvq_kernels as sk

    idx, _ = sk.nearest_code(first, model.quantiser.codebook.detach().float().contiguous())
    used = int(torch.unique(idx).numel())
    assert payload["curves"]["SimVQ"]["points"][0]["used"] == used
    assert "audio" in (tmp_path / "curve" / "curve.md").read_text().splitlines()[0]
    assert (tmp_path / "curve" / "utilisation_vs_tokens_per_code.png").exists()


def test_heldout_curve_resumes_from_its_state(tmp_path):
    """A run stopped part-way with --state and run again gives the points of a run made in
    one go, without fitting k-means again; a state from another run is refused."""
    r, _ = _tiny_audio_checkpoint(tmp_path, heldout_utterances=1)
    heldout_curve = _import_heldout_curve()
    args = ["--checkpoint", r["checkpoint"], "--tokens-per-code", "5,10,20",
            "--kmeans-iters", "2", "--kmeans-tokens-per-code", "4", "--chunk", "4"]
    state = str(tmp_path / "state.pt")
    threads = torch.get_num_threads()
    try:
        whole = heldout_curve.main(args + ["--out", str(tmp_path / "whole")])
        # 80 tokens are the first point; stop at 96 (3 batches of 32 tokens), then at 224
        assert heldout_curve.main(args + ["--out", str(tmp_path / "part"), "--state", state,
                                          "--stop-after-tokens", "96"]) is None
        first = json.loads((tmp_path / "part" / "curve.json").read_text())
        assert [p["tokens"] for p in first["curves"]["SimVQ"]["points"]] == [80]
        saved = torch.load(state, weights_only=False)
        assert saved["done"] == 96 and saved["idx"]["k-means"].shape == (96,)
        assert heldout_curve.main(args + ["--out", str(tmp_path / "part"), "--state", state,
                                          "--stop-after-tokens", "224"]) is None
        assert torch.load(state, weights_only=False)["done"] == 224
        # the k-means fit is not made again: its centres come from the state
        fits = []
        real_kmeans = heldout_curve.kmeans
        heldout_curve.kmeans = lambda *a, **kw: fits.append(1) or real_kmeans(*a, **kw)
        try:
            resumed = heldout_curve.main(args + ["--out", str(tmp_path / "part"),
                                                 "--state", state])
            again = heldout_curve.main(args + ["--out", str(tmp_path / "again"),
                                               "--state", state])  # complete: rewritten
        finally:
            heldout_curve.kmeans = real_kmeans
        assert fits == []
        with pytest.raises(SystemExit, match="tokens_per_code"):
            heldout_curve.main(["--checkpoint", r["checkpoint"], "--tokens-per-code",
                                "5,10", "--kmeans-iters", "2", "--kmeans-tokens-per-code",
                                "4", "--chunk", "4", "--out", str(tmp_path / "x"),
                                "--state", state])
        with pytest.raises(SystemExit, match="need --state"):
            heldout_curve.main(args + ["--out", str(tmp_path / "x"),
                                       "--stop-after-minutes", "1"])
    finally:
        torch.set_num_threads(threads)
    for got in (resumed, again):
        assert got["curves"] == whole["curves"]
        assert [{k: v for k, v in h.items() if k != "cpu_seconds"}
                for h in got["kmeans_history"]] == \
            [{k: v for k, v in h.items() if k != "cpu_seconds"} for h in whole["kmeans_history"]]
    assert [p["tokens"] for p in whole["curves"]["k-means"]["points"]] == [80, 160, 320]
    assert (tmp_path / "part" / "curve.csv").read_text() == \
        (tmp_path / "whole" / "curve.csv").read_text()


def test_rotation_trick_report_collects_runs(tmp_path):
    from simvq_kernels.experiments.train import (TrainConfig, parse_markdown_table,
                                                 run_one, write_results)

    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import rotation_trick_report
    finally:
        sys.path.pop(0)
    task = _tiny_task()
    task.name = "images"  # the report reads images/ and audio/ runs alike
    cfg = TrainConfig(steps=4, batch_size=2, log_every=1, window=2, threads=1,
                      progress=False)
    runs = {"compare_k32": (32, ["simvq_rot"]), "compare_k16": (16, ["simvq", "simvq_rot"]),
            "sweep/lr2e-3_beta1.0": (16, ["simvq_rot"])}
    for run, (k, kinds) in runs.items():
        res = [run_one(task, kind, k, cfg) for kind in kinds]
        write_results(str(tmp_path / "images" / "rotation_trick" / run), task, cfg, res)
    moved = tmp_path / "images" / "rotation_trick" / "compare_k32" / "results.json"
    payload = json.loads(moved.read_text())  # one run made on another CPU
    payload["environment"]["cpu_model"] = "Other CPU"
    moved.write_text(json.dumps(payload))
    rows = rotation_trick_report.main(["--root", str(tmp_path)])
    assert sorted((r["run"], r["quantiser"]) for r in rows) == [
        ("compare_k16", "simvq"), ("compare_k16", "simvq_rot"), ("compare_k32", "simvq_rot"),
        ("sweep/lr2e-3_beta1.0", "simvq_rot")]
    text = (tmp_path / "rotation_trick" / "results.md").read_text()
    compare, sweep = text.split("## Sweep")
    got = parse_markdown_table(compare)  # ordered by task, then K
    assert [(t["K"], t["quantiser"]) for t in got] == [
        ("16", "SimVQ"), ("16", "SimVQ + rotation trick"), ("32", "SimVQ + rotation trick")]
    by_run = {(r["run"], r["quantiser"]): r for r in rows}
    assert [t["codes used"] for t in got] == [
        str(by_run[k]["used"]) for k in (("compare_k16", "simvq"), ("compare_k16", "simvq_rot"),
                                         ("compare_k32", "simvq_rot"))]
    assert {t["held-out tokens per code"] for t in got} == {"16", "8"}  # 256 tokens
    assert parse_markdown_table(sweep)[0]["held-out utilisation at half the steps"] == "–"
    assert "Other CPU (images/compare_k32);" in text  # each CPU's runs are named
    assert len((tmp_path / "rotation_trick" / "results.csv").read_text().splitlines()) == 5
    assert (tmp_path / "rotation_trick" / "utilisation_over_steps.png").read_bytes()[:4] \
        == b"\x89PNG"
