"""Distributed training on torch.distributed (gloo, CPU, 2 and 3 processes).

One spawn per world size runs every scenario on each rank and saves what it saw; the
tests compare that with the single-process run of the same global batch, computed here
in the test process:

- DDP: a small encoder -> SimVQ -> decoder model trained 3 SGD steps under
  DistributedDataParallel gives the same indices at every step (exactly) and the same
  gradients and parameters (within fp32 summation-order tolerance) as one process on the
  global batch; the frozen basis stays identical on every rank.
- usage: ``codebook_usage()`` of a ``track_usage=True`` layer and
  ``metrics.sync_codebook_usage`` equal the single-process counts of the global stream.
- sharded: ``ShardedSimVQ`` with uneven shards (one of them empty for 3 ranks) and
  uneven token counts (one rank with none) gives the single-process indices, outputs and
  distances, and gradients (summed over ranks) equal to the single-process ones; the
  same under DDP with the shards ignored by DDP; ``indices_to_codes`` and
  ``full_state_dict`` round-trip; ties across shards go to the lowest global index.
- K = 65,537 codes split unevenly over 2 processes: the sharded search's indices are
  identical to one process's (bare search and layer).

Processes are started with torch.multiprocessing's "spawn" on 127.0.0.1 only (a free
port), one CPU thread each; each world size has a 60 s budget and the process group is
destroyed in every worker.
"""
from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simvq_kernels as sk

from .oracle import check_nearest, first_of_duplicates

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")

TIMEOUT_S = 60

# --------------------------------------------------------------------- scenarios
# Every input below is a deterministic function of the world size, so the workers and
# the single-process reference in the test process draw the same tensors.

D_IN, D, K, R = 8, 16, 300, 12  # DDP model
STEPS, LR = 3, 0.5
KS, DS, RS = 1000, 16, 12  # sharded layer


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D_IN, D)
        self.vq = sk.SimVQ(D, K, basis_dim=R, track_usage=True)
        self.dec = nn.Linear(D, D_IN)

    def forward(self, x):
        out, idx, vq_loss = self.vq(self.enc(x))
        return F.mse_loss(self.dec(out), x) + vq_loss, idx


def _ddp_model():
    torch.manual_seed(1234)
    return _Model()


def _ddp_batch(step):
    return torch.randn(12, 10, D_IN, generator=_gen(100 + step))


def _token_split(world):
    return {2: [20, 30], 3: [20, 0, 30]}[world]


def _shard_split(world):
    return {2: [700, 300], 3: [450, 0, 550]}[world]


def _sharded_inputs(world):
    n = sum(_token_split(world))
    g = _gen(7)
    z = torch.randn(n, DS, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    up = torch.randn(n, DS, generator=g)
    return z, mask, up


def _sharded_single():
    torch.manual_seed(99)
    return sk.SimVQ(DS, KS, basis_dim=RS, track_usage=True)


def _tie_codebook():
    # 64 codes; codes 40..63 duplicate codes 0..23 (they sit on a higher shard for both
    # splits below), and the tokens are exactly those codes
    g = _gen(5)
    cb = torch.randn(64, 8, generator=g)
    cb[40:] = cb[:24]
    z = torch.cat([cb[40:], cb[:24]])
    return z, cb


def _tie_split(world):
    return {2: [32, 32], 3: [20, 20, 24]}[world]


BIG_K, BIG_SPLIT, BIG_TOKENS = 65537, [40000, 25537], [300, 212]


def _big_inputs():
    g = _gen(11)
    z = torch.randn(sum(BIG_TOKENS), 32, generator=g)
    cb = torch.randn(BIG_K, 32, generator=g)
    return z, cb


def _big_layer():
    torch.manual_seed(3)
    return sk.SimVQ(32, BIG_K)


def _chunk(t, sizes, rank):
    lo = sum(sizes[:rank])
    return t[lo: lo + sizes[rank]]


# ------------------------------------------------------------------- the worker

def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    res = {}
    try:
        res["ddp"] = _scenario_ddp(rank, world)
        res["usage"] = _scenario_usage(rank, world)
        res["sharded"] = _scenario_sharded(rank, world)
        res["sharded_ddp"] = _scenario_sharded_ddp(rank, world)
        res["ties"] = _scenario_ties(rank, world)
        if world == 2:
            res["big"] = _scenario_big(rank, world)
    except BaseException:
        res["error"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _scenario_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _ddp_model()
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    basis0 = model.vq.basis.clone()
    out = {"idx": [], "grads": [], "loss": []}
    for step in range(STEPS):
        x = _ddp_batch(step).chunk(world)[rank]
        opt.zero_grad()
        loss, idx = ddp(x)
        loss.backward()
        out["idx"].append(idx)
        out["loss"].append(loss.detach())
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["basis_unchanged"] = torch.equal(basis0, model.vq.basis)
    out["basis"] = model.vq.basis.clone()
    out["counts_local"] = model.vq._usage_counts.clone()
    out["counts_synced"] = model.vq.codebook_usage().counts
    return out


def _scenario_usage(rank, world):
    from simvq_kernels.metrics import sync_codebook_usage

    idx = torch.randint(0, 50, (7 + 5 * rank,), generator=_gen(rank))
    u = sk.CodebookUsage(50).update(idx)
    synced = sync_codebook_usage(u)
    return {"idx": idx, "synced": synced.counts, "local_after": u.counts.clone()}


def _scenario_sharded(rank, world):
    from simvq_kernels.distributed import ShardedSimVQ, sharded_nearest_code

    single = _sharded_single()
    layer = ShardedSimVQ.from_simvq(single, shard_sizes=_shard_split(world))
    z, mask, up = _sharded_inputs(world)
    split = _token_split(world)
    n_total = z.shape[0]
    zl = _chunk(z, split, rank).clone().requires_grad_(True)
    ml = _chunk(mask, split, rank)
    upl = _chunk(up, split, rank)
    out, idx, loss, dist_ = layer(zl, ml, return_distances=True)
    n_valid = int(mask.sum())
    # the rank's share of the global objective: loss is a mean over its real tokens
    obj = loss * (int(ml.sum()) / n_valid) + (out * upl).sum() / n_total
    obj.backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    torch.distributed.all_reduce(gw)
    torch.distributed.all_reduce(gb)
    # decoding is a collective with per-rank indices (masked -1 replaced by 0)
    codes = layer.indices_to_codes(idx.clamp_min(0))
    full = layer.full_state_dict()
    # the bare search on the projected shard, with the offsets found by all_gather
    cb_shard = layer.codebook.detach()
    bare_idx, bare_dist = sharded_nearest_code(zl.detach(), cb_shard)
    counts = layer.codebook_usage().counts
    # under autocast the shards search in bf16 like the single-process layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp, idx_amp, _, dist_amp = layer(zl.detach(), ml, return_distances=True)
    return dict(out=out.detach(), idx=idx, loss=loss.detach(), dist=dist_, dz=zl.grad,
                idx_amp=idx_amp, dist_amp=dist_amp, out_amp=out_amp,
                dW=gw, db=gb, codes=codes.detach(), full=full,
                counts=counts, backend=layer.last_backend,
                bare_idx=bare_idx, bare_dist=bare_dist,
                shard=(layer.shard_start, layer.shard_end))


def _scenario_sharded_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from simvq_kernels.distributed import ShardedSimVQ, ddp_ignore_shards

    single = _sharded_single()
    layer = ShardedSimVQ.from_simvq(single, shard_sizes=_shard_split(world))
    ignored = ddp_ignore_shards(layer)
    ddp = DDP(layer)
    z, _, up = _sharded_inputs(world)
    n = z.shape[0] - z.shape[0] % world
    zl = z[:n].chunk(world)[rank]
    upl = up[:n].chunk(world)[rank]
    out, idx, loss = ddp(zl)
    (loss + (out * upl).sum() / zl.shape[0]).backward()
    return dict(idx=idx, dW=layer.weight.grad.clone(), db=layer.bias.grad.clone(),
                ignored=ignored, shard=layer.basis_shard.clone())


def _scenario_ties(rank, world):
    from simvq_kernels.distributed import sharded_nearest_code

    z, cb = _tie_codebook()
    idx, _ = sharded_nearest_code(_chunk(z, [len(z) // world] * (world - 1) +
                                         [len(z) - (world - 1) * (len(z) // world)], rank),
                                  _chunk(cb, _tie_split(world), rank))
    return dict(idx=idx)


def _scenario_big(rank, world):
    from simvq_kernels.distributed import ShardedSimVQ, sharded_nearest_code

    z, cb = _big_inputs()
    zl = _chunk(z, BIG_TOKENS, rank)
    t0 = time.perf_counter()
    idx, dist_ = sharded_nearest_code(zl, _chunk(cb, BIG_SPLIT, rank))
    t_bare = time.perf_counter() - t0
    layer = ShardedSimVQ.from_simvq(_big_layer(), shard_sizes=BIG_SPLIT)
    _, lidx, _ = layer(zl)
    return dict(idx=idx, dist=dist_, layer_idx=lidx, t_bare=t_bare)


# ------------------------------------------------------------------- the runner

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS: dict = {}


def _run(world, tmp_path_factory):
    if world in _RUNS:
        return _RUNS[world]
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp(f"dist{world}"))
    t0 = time.monotonic()
    ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir), nprocs=world,
                             join=False, start_method="spawn")
    deadline = t0 + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-process run exceeded {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(5)
    elapsed = time.monotonic() - t0
    results = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
               for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    _RUNS[world] = (results, elapsed)
    return _RUNS[world]


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def run(request, tmp_path_factory):
    results, elapsed = _run(request.param, tmp_path_factory)
    assert elapsed <= TIMEOUT_S
    return request.param, results


# -------------------------------------------------------------------- the tests

def test_ddp_trains_like_one_process(run):
    world, results = run
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x = _ddp_batch(step)
        opt.zero_grad()
        loss, idx = model(x)
        loss.backward()
        got_idx = torch.cat([res["ddp"]["idx"][step] for res in results])
        assert torch.equal(got_idx, idx), f"step {step}: indices differ from one process"
        # the mean of the ranks' losses is the global loss (equal per-rank batches)
        mean_loss = torch.stack([res["ddp"]["loss"][step] for res in results]).mean()
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-7)
        for name, p in model.named_parameters():
            for r, res in enumerate(results):
                torch.testing.assert_close(res["ddp"]["grads"][step][name], p.grad,
                                           rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"step {step} rank {r} {name}: {m}")
        opt.step()
    for name, p in model.named_parameters():
        for res in results:
            torch.testing.assert_close(res["ddp"]["params"][name], p.detach(), rtol=1e-4,
                                       atol=1e-6)
    for res in results:
        assert res["ddp"]["basis_unchanged"]
        assert torch.equal(res["ddp"]["basis"], model.vq.basis)
    # usage: per-rank counts differ, the synchronised ones are the global counts
    counts = model.vq.codebook_usage(sync=False).counts
    assert torch.equal(sum(res["ddp"]["counts_local"] for res in results), counts)
    for res in results:
        assert torch.equal(res["ddp"]["counts_synced"], counts)


def test_usage_statistics_are_synchronised(run):
    world, results = run
    all_idx = torch.cat([res["usage"]["idx"] for res in results])
    want = torch.bincount(all_idx, minlength=50)
    for res in results:
        assert torch.equal(res["usage"]["synced"], want)
        assert torch.equal(res["usage"]["local_after"],
                           torch.bincount(res["usage"]["idx"], minlength=50))


def test_sharded_matches_one_process(run):
    world, results = run
    single = _sharded_single()
    z, mask, up = _sharded_inputs(world)
    z = z.clone().requires_grad_(True)
    out, idx, loss, dist_ = single(z, mask, return_distances=True)
    (loss + (out * up).sum() / z.shape[0]).backward()
    split = _token_split(world)
    cat = lambda key: torch.cat([res["sharded"][key] for res in results])  # noqa: E731
    assert torch.equal(cat("idx"), idx)
    assert torch.equal(cat("bare_idx")[mask], idx[mask])
    torch.testing.assert_close(cat("out"), out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cat("dist"), dist_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cat("dz"), z.grad, rtol=1e-5, atol=1e-7)
    # the picks meet the design.md §3 criterion on the full projected codebook
    check_nearest(z.detach()[mask], single.codebook.detach(), cat("idx")[mask],
                  cat("dist")[mask], u=0.0, what=f"sharded {world}")
    # each rank's loss is the mean over its own real tokens
    for r, res in enumerate(results):
        ml = _chunk(mask, split, r)
        if ml.any():
            zl, il = _chunk(z.detach(), split, r)[ml], idx[_chunk(torch.arange(len(z)),
                                                                  split, r)][ml]
            q = single.codebook.detach()[il]
            want = 0.25 * ((q - zl) ** 2).mean() + ((q - zl) ** 2).mean()
            torch.testing.assert_close(res["sharded"]["loss"], want, rtol=1e-5, atol=1e-7)
        assert res["sharded"]["backend"] == "cpu"
    for res in results:
        torch.testing.assert_close(res["sharded"]["dW"], single.weight.grad, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(res["sharded"]["db"], single.bias.grad, rtol=1e-4,
                                   atol=1e-6)
        assert torch.equal(res["sharded"]["counts"], single.codebook_usage().counts)
        full = res["sharded"]["full"]
        assert torch.equal(full["basis"], single.basis)
        assert torch.equal(full["weight"], single.weight.detach())
    # shards tile [0, K) in rank order, as asked
    sizes = _shard_split(world)
    for r, res in enumerate(results):
        lo = sum(sizes[:r])
        assert res["sharded"]["shard"] == (lo, lo + sizes[r])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp, idx_amp, _, dist_amp = single(z.detach(), mask, return_distances=True)
    assert torch.equal(cat("idx_amp"), idx_amp)
    assert cat("out_amp").dtype == torch.float32
    torch.testing.assert_close(cat("out_amp"), out_amp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cat("dist_amp"), dist_amp, rtol=1e-5, atol=1e-5)
    # decoding (a collective) applies the projection to the owners' rows
    codes = single.indices_to_codes(idx.clamp_min(0))
    torch.testing.assert_close(cat("codes"), codes.detach(), rtol=1e-5, atol=1e-6)


def test_sharded_under_ddp(run):
    world, results = run
    single = _sharded_single()
    z, _, up = _sharded_inputs(world)
    n = z.shape[0] - z.shape[0] % world
    out, idx, loss = single(z[:n])
    (loss + (out * up[:n]).sum() / (n // world)).backward()
    assert torch.equal(torch.cat([res["sharded_ddp"]["idx"] for res in results]), idx)
    sizes = _shard_split(world)
    for r, res in enumerate(results):
        assert res["sharded_ddp"]["ignored"] == ["basis_shard"]
        # DDP did not overwrite the shard with rank 0's
        assert torch.equal(res["sharded_ddp"]["shard"], _chunk(single.basis, sizes, r))
        # DDP averages the ranks' gradients; with equal per-rank batches the mean of
        # the ranks' losses is the global loss (out carries no gradient to W or b)
        torch.testing.assert_close(res["sharded_ddp"]["dW"], single.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["sharded_ddp"]["db"], single.bias.grad,
                                   rtol=1e-4, atol=1e-6)


def test_sharded_ties_go_to_lowest_global_index(run):
    world, results = run
    z, cb = _tie_codebook()
    idx = torch.cat([res["ties"]["idx"] for res in results])
    want = first_of_duplicates(cb)[sk.nearest_code(z, cb)[0]]
    assert torch.equal(idx, want)
    assert bool((idx < 40).all())  # never the duplicate on the higher shard
    assert torch.equal(idx, sk.nearest_code(z, cb)[0])


def test_sharded_search_65537_codes_uneven_split_two_processes(tmp_path_factory):
    results, elapsed = _run(2, tmp_path_factory)
    z, cb = _big_inputs()
    idx, dist_ = sk.nearest_code(z, cb)
    got = torch.cat([res["big"]["idx"] for res in results])
    assert torch.equal(got, idx), "sharded indices differ from one process"
    assert torch.equal(torch.cat([res["big"]["dist"] for res in results]), dist_)
    _, lidx, _ = _big_layer()(z)
    assert torch.equal(torch.cat([res["big"]["layer_idx"] for res in results]), lidx)
    assert elapsed <= TIMEOUT_S


def test_sharded_needs_a_process_group():
    from simvq_kernels.distributed import ShardedSimVQ

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedSimVQ(8, 10)
