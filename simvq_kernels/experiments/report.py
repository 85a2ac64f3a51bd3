"""The part both demo programs share after building their task: run the sweep, write
results.{md,csv,json} and the two figures every task has. Each program then adds its
own example figure (image grid, audio waveforms)."""
from __future__ import annotations

import os
import sys
import time

import torch

from . import plots, train


def sweep_and_report(task: train.Task, cfg: train.TrainConfig, args, argv, t_start: float,
                     items: str):
    """Trains every (K, quantiser) of ``args``, writes the results and the utilisation
    figures to ``args.out``. ``items`` names a training item in the titles ("crops").
    Returns (results, paths of the written tables, seconds since ``t_start``)."""
    quantisers = [q.strip() for q in args.quantisers.split(",") if q.strip()]
    results = train.run_sweep(task, cfg, args.codebook_sizes, quantisers)
    total = time.perf_counter() - t_start
    extra = {"total_seconds": total, "argv": sys.argv[1:] if argv is None else list(argv),
             "environment": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                            f"{args.threads} threads"}
    paths = train.write_results(args.out, task, cfg, results, extra)
    title = (f"{task.name}: {cfg.steps} steps x {cfg.batch_size} {items}, Adam lr "
             f"{cfg.lr:g}, d={args.dim}")
    plots.plot_utilisation_vs_k(results, os.path.join(args.out, "utilisation_vs_k.png"),
                                title, task.recon_metric)
    plots.plot_utilisation_over_steps(results, os.path.join(args.out,
                                      "utilisation_over_steps.png"), cfg.window, title)
    return results, paths, total
