"""Shared training / evaluation loop for the plain-VQ vs SimVQ collapse experiments.

One :class:`Task` (data + autoencoder shape) is trained once per (codebook size,
quantiser) with the same encoder/decoder initialisation, seed, batch order, optimiser
and number of steps; only the quantiser differs. After training, the model encodes a
held-out set with at least ``tokens_per_code`` tokens per code of the largest codebook
(so that 100% utilisation is possible) and we report codebook utilisation, perplexity
and reconstruction error there.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..metrics import CodebookUsage
from .models import LABELS, QUANTISERS, build_autoencoder, unavailable_reason


@dataclass
class TrainConfig:
    """Defaults: the image program's default run."""

    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    beta: float = 0.25
    seed: int = 0
    plain_init: str = "uniform"
    log_every: int = 25
    #: training-utilisation curve: fraction of codes picked in the last `window` steps
    window: int = 200
    eval_batch: int = 1024
    threads: int = 2
    progress: bool = True
    #: wall-clock training budget per run in seconds (None: train all ``steps``); the
    #: held-out evaluations during training do not count against it
    time_budget: Optional[float] = None
    #: CPU-time training budget per run in seconds (this process's CPU time, so it does
    #: not depend on what else the machine runs); None: no CPU budget
    cpu_budget: Optional[float] = None
    #: held-out evaluations during training, evenly spaced over the steps (or over the
    #: time budget); 0: only the final one
    heldout_evals: int = 0
    #: folder to save each trained model's state dict in ({task}_{quantiser}_{K}.pt);
    #: None: not saved
    save_models: Optional[str] = None


@dataclass
class Task:
    """What differs between the image and the audio experiment."""

    name: str
    in_ch: int
    nd: int  # 2: images (B, C, H, W); 1: audio (B, C, T)
    n_down: int  # downsampling 2**n_down per axis
    dim: int
    hidden: int
    tokens_per_item: int
    train_batch: Callable[[torch.Generator, int], torch.Tensor]
    heldout: torch.Tensor  # (M, C, ...) held-out items
    recon_metric: str = "psnr"  # "psnr" (signals in [0, 1]) or "snr"
    #: items whose reconstructions are kept for the figures
    examples: Optional[torch.Tensor] = None
    notes: dict = field(default_factory=dict)


def _progress(total, desc, enabled):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                        mininterval=1.0)
        except ImportError:
            pass
    return None


def recon_db(mse: float, task: Task, signal_power: float) -> float:
    """PSNR for [0, 1] images (peak 1), SNR = 10 log10(E[x^2] / MSE) for audio."""
    if mse <= 0:
        return float("inf")
    if task.recon_metric == "psnr":
        return 10 * math.log10(1.0 / mse)
    return 10 * math.log10(signal_power / mse)


def train_model(model, task: Task, cfg: TrainConfig, codebook_size: int, desc: str = "",
                info: Optional[dict] = None):
    """Adam on reconstruction MSE + the quantiser's loss. Returns the history: every
    ``log_every`` steps, the mean training MSE and VQ loss since the last log and the
    fraction of codes picked by training batches in the last ``window`` steps.

    With ``cfg.time_budget`` (wall clock) or ``cfg.cpu_budget`` (this process's CPU time)
    training stops after the step that spends one of them (or after ``cfg.steps``); with ``cfg.heldout_evals`` the held-out set is evaluated that many
    times during training (history points with ``heldout_utilisation``). ``info``, if
    given, receives ``steps_done``, ``stopped_by`` and the seconds spent in those
    evaluations."""
    info = {} if info is None else info
    gen = torch.Generator().manual_seed(cfg.seed)  # same batches for every run
    budget, cpu_budget = cfg.time_budget, cfg.cpu_budget
    n_evals = max(0, int(cfg.heldout_evals))
    # evaluation points: fractions i/(n+1) of the steps or of the time budget
    eval_marks = [(i + 1) / (n_evals + 1) for i in range(n_evals)]
    eval_s, eval_cpu = 0.0, 0.0
    t_start, c_start = time.perf_counter(), time.process_time()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    last_used = torch.full((codebook_size,), -10**9, dtype=torch.long)
    hist = []
    acc = {"rec": 0.0, "vq": 0.0, "n": 0}
    bar = _progress(cfg.steps, desc, cfg.progress)
    model.train()
    step = 0
    stopped_by = "steps"
    for step in range(1, cfg.steps + 1):
        x = task.train_batch(gen, cfg.batch_size)
        x_hat, idx, vq_loss = model(x)
        rec = torch.mean((x_hat - x) ** 2)
        loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        last_used[idx.reshape(-1)] = step
        acc["rec"] += rec.item()
        acc["vq"] += vq_loss.item()
        acc["n"] += 1
        spent = time.perf_counter() - t_start - eval_s
        cpu = time.process_time() - c_start - eval_cpu
        out_of_time = ((budget is not None and spent >= budget)
                       or (cpu_budget is not None and cpu >= cpu_budget))
        progress = max(step / cfg.steps, 0 if budget is None else spent / budget,
                       0 if cpu_budget is None else cpu / cpu_budget)
        do_eval = bool(eval_marks) and progress >= eval_marks[0] and not out_of_time \
            and step < cfg.steps
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time or do_eval:
            util = float((last_used > step - cfg.window).float().mean())
            hist.append({"step": step, "train_mse": acc["rec"] / acc["n"],
                         "vq_loss": acc["vq"] / acc["n"], "window_utilisation": util,
                         "train_seconds": spent, "train_cpu_seconds": cpu})
            acc = {"rec": 0.0, "vq": 0.0, "n": 0}
            if bar is not None:
                bar.set_postfix(mse=f"{hist[-1]['train_mse']:.4f}", util=f"{util:.1%}")
        if do_eval:
            while eval_marks and progress >= eval_marks[0]:
                eval_marks.pop(0)
            e0, c0 = time.perf_counter(), time.process_time()
            m = evaluate(model, task, codebook_size, cfg.eval_batch)
            eval_s += time.perf_counter() - e0
            eval_cpu += time.process_time() - c0
            hist[-1].update({"heldout_utilisation": m["utilisation"], "heldout_used": m["used"],
                             "heldout_perplexity": m["perplexity"], "heldout_mse": m["mse"]})
            if not cfg.progress:
                print(f"  {desc} step {step}: held-out utilisation "
                      f"{format_percent(m['utilisation'])} ({m['used']}/{codebook_size}), "
                      f"train {spent:.0f} s", flush=True)
        if bar is not None:
            bar.update(1)
        if out_of_time:
            stopped_by = ("time budget" if budget is not None and spent >= budget
                          else "CPU budget")
            break
    if bar is not None:
        bar.close()
    info.update({"steps_done": step, "stopped_by": stopped_by,
                 "heldout_evals_seconds": eval_s, "heldout_evals_cpu_seconds": eval_cpu})
    return hist


#: held-out batches of a quantiser that builds the tokens x K distance matrix are cut so
#: that the matrix stays under this many bytes
DENSE_EVAL_BYTES = 1 << 30


@torch.no_grad()
def evaluate(model, task: Task, codebook_size: int, eval_batch: int = 1024) -> dict:
    """Held-out codebook utilisation, perplexity, MSE and PSNR/SNR over ``task.heldout``."""
    model.eval()
    usage = CodebookUsage(codebook_size)
    se, n, power = 0.0, 0, 0.0
    if type(model.quantiser).__module__.startswith("vector_quantize_pytorch"):
        # vector-quantize-pytorch's search builds the tokens x K distance matrix: keep it
        # under DENSE_EVAL_BYTES per batch (16 GiB at 1024 crops x 64 tokens x 65,536)
        eval_batch = max(1, min(eval_batch,
                                DENSE_EVAL_BYTES // (4 * task.tokens_per_item * codebook_size)))
    for i in range(0, task.heldout.shape[0], eval_batch):
        x = task.heldout[i:i + eval_batch]
        x_hat, idx, _ = model(x)
        usage.update(idx)
        se += float(torch.sum((x_hat.double() - x.double()) ** 2))
        power += float(torch.sum(x.double() ** 2))
        n += x.numel()
    mse = se / n
    s = usage.summary()
    out = {"utilisation": s["utilisation"], "perplexity": s["perplexity"],
           "used": s["used"], "heldout_tokens": s["tokens"],
           "tokens_per_code": s["tokens"] / codebook_size, "mse": mse,
           task.recon_metric: recon_db(mse, task, power / n)}
    model.train()
    return out


def run_one(task: Task, kind: str, codebook_size: int, cfg: TrainConfig) -> dict:
    model = build_autoencoder(kind, codebook_size, in_ch=task.in_ch, dim=task.dim,
                              hidden=task.hidden, n_down=task.n_down, nd=task.nd,
                              seed=cfg.seed, beta=cfg.beta, plain_init=cfg.plain_init)
    info = {}
    t0, c0 = time.perf_counter(), time.process_time()
    hist = train_model(model, task, cfg, codebook_size, desc=f"{kind:>5} K={codebook_size}",
                       info=info)
    t1, c1 = time.perf_counter(), time.process_time()
    metrics = evaluate(model, task, codebook_size, cfg.eval_batch)
    t2, c2 = time.perf_counter(), time.process_time()
    mid_s, mid_cpu = info.pop("heldout_evals_seconds"), info.pop("heldout_evals_cpu_seconds")
    res = {"quantiser": kind, "codebook_size": codebook_size, **metrics,
           "train_seconds": t1 - t0 - mid_s, "eval_seconds": t2 - t1,
           "train_cpu_seconds": c1 - c0 - mid_cpu, "eval_cpu_seconds": c2 - c1,
           "heldout_evals_during_training_seconds": mid_s, **info, "history": hist,
           "backend": getattr(model.quantiser, "last_backend", None)}
    if cfg.save_models:
        os.makedirs(cfg.save_models, exist_ok=True)
        path = os.path.join(cfg.save_models, f"{task.name}_{kind}_{codebook_size}.pt")
        torch.save({"state_dict": model.state_dict(), "kind": kind,
                    "codebook_size": codebook_size, "config": asdict(cfg),
                    "model": {"in_ch": task.in_ch, "dim": task.dim, "hidden": task.hidden,
                              "n_down": task.n_down, "nd": task.nd},
                    "task": task.name, "task_notes": task.notes,
                    "steps_done": info.get("steps_done"),
                    "heldout_utilisation": metrics["utilisation"]}, path)
        res["checkpoint"] = path
    if task.examples is not None:
        with torch.no_grad():
            model.eval()
            res["examples"] = model(task.examples)[0].clamp(-1e3, 1e3)
    return res


def run_sweep(task: Task, cfg: TrainConfig, codebook_sizes, quantisers=QUANTISERS,
              log=print) -> list[dict]:
    """Every (K, quantiser) pair, K ascending, in the order of ``quantisers``. A quantiser
    that cannot be built here (vector-quantize-pytorch's without that package) is skipped
    with a message. Returns the result dicts."""
    torch.set_num_threads(cfg.threads)
    results = []
    runnable = []
    for kind in quantisers:
        why = unavailable_reason(kind)
        if why is None:
            runnable.append(kind)
        elif kind in LABELS:  # a known quantiser that needs a missing package
            log(f"[{task.name}] skipping {kind}: {why}")
        else:
            raise ValueError(why)
    for k in sorted(codebook_sizes):
        for kind in runnable:
            r = run_one(task, kind, k, cfg)
            results.append(r)
            log(f"[{task.name}] {kind:>5} K={k:>6}: held-out utilisation "
                f"{format_percent(r['utilisation']):>6} ({r['used']}/{k}), perplexity "
                f"{r['perplexity']:.0f}, MSE {r['mse']:.5f}, {task.recon_metric.upper()} "
                f"{r[task.recon_metric]:.2f} dB  [train {r['train_seconds']:.0f} s, eval "
                f"{r['eval_seconds']:.0f} s]")
    return results


# ------------------------------------------------------------------------ outputs

def format_percent(fraction: float) -> str:
    """98.1%, 0.93%, 0.047%: enough digits to tell a small utilisation from zero."""
    pct = 100 * fraction
    if pct == 0 or pct >= 10:
        return f"{pct:.1f}%"
    digits = max(1, 1 - math.floor(math.log10(pct)))
    return f"{pct:.{digits}f}%"


def markdown_table(task: Task, results: list[dict]) -> str:
    metric = task.recon_metric.upper()
    head = ["K", "quantiser", "held-out utilisation", "codes used", "perplexity", "MSE",
            f"{metric} (dB)", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name = LABELS.get(r["quantiser"], r["quantiser"])
        lines.append("| " + " | ".join([
            f"{r['codebook_size']}", name, format_percent(r["utilisation"]),
            f"{r['used']}", f"{r['perplexity']:.1f}", f"{r['mse']:.5f}",
            f"{r[task.recon_metric]:.2f}", f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def parse_markdown_table(text: str) -> list[dict]:
    """Rows of the first markdown table in ``text`` as dicts (header -> cell)."""
    rows = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(rows) < 2:
        raise ValueError("no markdown table found")
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    head, body = cells[0], cells[2:]
    if not all(set(c) <= set("-: ") for c in cells[1]):
        raise ValueError("second table row is not a separator")
    for row in body:
        if len(row) != len(head):
            raise ValueError(f"row {row} has {len(row)} cells, header has {len(head)}")
    return [dict(zip(head, row)) for row in body]


def _git_commit() -> str | None:
    import subprocess
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (as lscpu prints it), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "git_commit": _git_commit() or os.environ.get("SIMVQ_GIT_COMMIT")}


def write_results(out_dir: str, task: Task, cfg: TrainConfig, results: list[dict],
                  extra: dict | None = None) -> dict:
    """results.json (config, environment, metrics, training curves), results.csv and
    results.md (the table). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(task, results)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "csv": os.path.join(out_dir, "results.csv"),
             "md": os.path.join(out_dir, "results.md")}
    clean = [{k: v for k, v in r.items() if k != "examples"} for r in results]
    extra = dict(extra or {})
    summary = extra.pop("environment", None)  # a one-line summary for the table's header
    payload = {"task": task.name, "config": asdict(cfg), "task_notes": task.notes,
               "environment": environment(), "results": clean, **extra}
    if summary is not None:
        payload["environment_summary"] = summary
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1)
    cols = ["quantiser", "codebook_size", "utilisation", "used", "perplexity", "mse",
            task.recon_metric, "heldout_tokens", "tokens_per_code", "train_seconds",
            "eval_seconds", "backend", "steps_done", "train_cpu_seconds", "eval_cpu_seconds"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in clean:
            w.writerow([r[c] for c in cols])
    with open(paths["md"], "w") as f:
        kinds = list(dict.fromkeys(r["quantiser"] for r in results))
        f.write(f"# {task.name}: {' vs '.join(LABELS.get(q, q) for q in kinds)}\n\n")
        described = extra if summary is None else {**extra, "environment": summary}
        f.write(describe_run(task, cfg, results, described) + "\n\n")
        f.write("Held-out utilisation: the fraction of the K codes picked at least once "
                "when the trained model encodes the held-out set; perplexity: exp of the "
                "entropy of the held-out code histogram.\n\n")
        f.write(table)
    return paths


def describe_run(task: Task, cfg: TrainConfig, results, extra=None) -> str:
    tok = results[0]["heldout_tokens"] if results else 0
    kmax = max(r["codebook_size"] for r in results) if results else 0
    limits = [f"{cfg.steps} steps"]
    if cfg.time_budget is not None:
        limits.append(f"{cfg.time_budget / 60:g} min of training")
    if cfg.cpu_budget is not None:
        limits.append(f"{cfg.cpu_budget / 60:g} CPU-min of training")
    steps = (limits[0] if len(limits) == 1 else
             f"up to {' or '.join(limits)} per run (steps done: "
             f"{', '.join(str(r.get('steps_done')) for r in results)})")
    s = (f"{steps} x batch {cfg.batch_size}, Adam lr {cfg.lr}, beta {cfg.beta}, "
         f"seed {cfg.seed}, plain-VQ init {cfg.plain_init}; latent d={task.dim}, "
         f"{task.tokens_per_item} tokens per item; held-out set: "
         f"{task.heldout.shape[0]} items = {tok} tokens "
         f"({tok / max(kmax, 1):.1f} per code at K={kmax}).")
    if extra and "total_seconds" in extra:
        s += f" Total run time {extra['total_seconds'] / 60:.1f} min"
        if "environment" in extra:
            s += f" ({extra['environment']})"
        s += "."
    return s


# ---------------------------------------------------------------------- the CLIs

def parse_sizes(text: str) -> list[int]:
    """'1024,8192,65536' or '1k,8k,64k' -> [1024, 8192, 65536]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        out.append(int(part.rstrip("k")) * mult)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"bad codebook sizes {text!r}")
    return out


def common_parser(description: str, defaults: dict):
    """The flags both programs share; ``defaults`` holds the default-run values."""
    import argparse
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=defaults["steps"],
                   help="training steps per run (the same for every run)")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--codebook-sizes", type=parse_sizes, default=defaults["codebook_sizes"],
                   help="comma-separated K values, e.g. 1k,8k,64k")
    p.add_argument("--seed", type=int, default=0,
                   help="model initialisation and batch order (shared by all runs)")
    p.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3), help="Adam lr")
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--dim", type=int, default=defaults.get("dim", 32), help="latent width d")
    p.add_argument("--hidden", type=int, default=defaults.get("hidden", 64),
                   help="conv channels")
    p.add_argument("--plain-init", choices=("uniform", "normal"), default="uniform",
                   help="plain-VQ codebook init: U(-1/K, 1/K) (taming-transformers) or "
                        "N(0, 1) (nn.Embedding default)")
    p.add_argument("--heldout-tokens-per-code", type=float, default=10.0,
                   help="held-out set size, in tokens per code of the largest K")
    p.add_argument("--quantisers", default="plain,simvq",
                   help="comma-separated subset of plain,simvq,simvq_rot (our layer with "
                        "rotation_trick=True),vqp (vector-quantize-pytorch's SimVQ, its "
                        "defaults: rotation trick),vqp_ste (the same, rotation_trick=False); "
                        "vqp* are skipped with a message without vector-quantize-pytorch")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="save each trained model's state dict in DIR "
                        "({task}_{quantiser}_{K}.pt)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 2; 1 with --quick, whose tiny "
                        "tensors gain nothing from a second thread)")
    p.add_argument("--out", default=defaults["out"], help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="tiny CI-sized run (seconds): overrides steps, sizes and data size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock training budget per run; training stops when it is "
                        "spent or after --steps, whichever comes first (default: no budget)")
    p.add_argument("--cpu-budget", type=float, default=None, metavar="MINUTES",
                   help="CPU-time training budget per run (this process's CPU time); "
                        "training stops when it or --time-budget is spent")
    p.add_argument("--heldout-evals", type=int, default=0,
                   help="held-out evaluations during training, evenly spaced over the "
                        "steps or the time budget (the final one is always made)")
    p.add_argument("--util-window", type=int, default=None, metavar="STEPS",
                   help="training-utilisation curve: codes picked in the last STEPS "
                        "steps (default min(200, steps/5))")
    return p


def config_from_args(args) -> TrainConfig:
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    log_every = max(1, min(25, args.steps // 20))
    window = args.util_window if args.util_window else max(1, min(200, args.steps // 5))
    budget = None if args.time_budget is None else 60.0 * args.time_budget
    if budget is not None and budget <= 0:
        raise ValueError(f"--time-budget must be positive, got {args.time_budget}")
    cpu_budget = None if args.cpu_budget is None else 60.0 * args.cpu_budget
    if cpu_budget is not None and cpu_budget <= 0:
        raise ValueError(f"--cpu-budget must be positive, got {args.cpu_budget}")
    if args.heldout_evals < 0:
        raise ValueError(f"--heldout-evals must be >= 0, got {args.heldout_evals}")
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       beta=args.beta, seed=args.seed, plain_init=args.plain_init,
                       log_every=log_every, window=window, threads=args.threads,
                       progress=not args.no_progress, time_budget=budget,
                       cpu_budget=cpu_budget,
                       heldout_evals=args.heldout_evals, save_models=args.save_models)


def heldout_items(tokens_per_code: float, codebook_sizes, tokens_per_item: int,
                  minimum: int = 1) -> int:
    return max(minimum, math.ceil(tokens_per_code * max(codebook_sizes) / tokens_per_item))
