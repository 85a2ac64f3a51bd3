#!/usr/bin/env python
"""Collects the large-codebook runs of python/run_large_k.sh into one report per task.

Each run (one quantiser, one K) wrote its own results.json under RUNS/<quantiser>_<K>/;
this writes RUNS/../results.{md,csv,json} (table, metrics, configs, environments and
training curves of every run) and the figures utilisation_over_steps.png and
utilisation_vs_k.png.

    python python/large_k_report.py --task images      # -> python/results/images/large_k/
    python python/large_k_report.py --task audio
"""
import argparse
import csv
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from simvq_kernels.experiments import plots  # noqa: E402
from simvq_kernels.experiments.train import format_percent  # noqa: E402

NAMES = {"plain": "plain VQ", "simvq": "SimVQ"}


def load_runs(runs_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "results.json"))):
        with open(path) as f:
            payload = json.load(f)
        if len(payload["results"]) != 1:
            raise ValueError(f"{path}: expected one run, found {len(payload['results'])}")
        runs.append((os.path.relpath(os.path.dirname(path), runs_dir), payload))
    if not runs:
        raise FileNotFoundError(f"no */results.json under {runs_dir}")
    tasks = {p["task"] for _, p in runs}
    if len(tasks) != 1:
        raise ValueError(f"runs of several tasks under {runs_dir}: {sorted(tasks)}")
    runs.sort(key=lambda r: (r[1]["results"][0]["codebook_size"],
                             r[1]["results"][0]["quantiser"] != "plain"))
    return runs


def flat_result(name, payload):
    r = dict(payload["results"][0])
    cfg = payload["config"]
    r.update({"run": name, "lr": cfg["lr"], "batch_size": cfg["batch_size"],
              "time_budget_minutes": None if cfg.get("time_budget") is None
              else cfg["time_budget"] / 60,
              "cpu_budget_minutes": None if cfg.get("cpu_budget") is None
              else cfg["cpu_budget"] / 60, "util_window": cfg["window"]})
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("images", "audio"), required=True)
    p.add_argument("--runs", default=None,
                   help="folder of the runs (default python/results/TASK/large_k/runs)")
    p.add_argument("--out", default=None,
                   help="output folder (default: the parent of --runs)")
    args = p.parse_args(argv)
    runs_dir = args.runs or os.path.join(HERE, "results", args.task, "large_k", "runs")
    out = args.out or os.path.dirname(os.path.abspath(runs_dir))
    runs = load_runs(runs_dir)
    task = runs[0][1]["task"]
    metric = "psnr" if task == "images" else "snr"
    results = [flat_result(n, p) for n, p in runs]
    # several runs of one quantiser at one K (e.g. a longer budget): label them by budget
    seen = {}
    for r in results:
        seen.setdefault((r["codebook_size"], r["quantiser"]), []).append(r)
    for group in seen.values():
        if len(group) > 1:
            for i, r in enumerate(group):
                budget = (f"{r['cpu_budget_minutes']:g} CPU-min" if r["cpu_budget_minutes"]
                          else f"{r['steps_done']} steps")
                r["label"] = f"{NAMES.get(r['quantiser'], r['quantiser'])}, {budget}, lr {r['lr']:g}"
                r["linestyle"] = ("-", "--", ":", "-.")[i % 4]
    # runs made before the environment was recorded as a dict hold a one-line string
    run_envs = {n: (p["environment"] if isinstance(p["environment"], dict) else {})
                for n, p in runs}
    envs = {e.get("cpu_model") for e in run_envs.values() if e}
    env0 = next((e for e in run_envs.values() if e), {})
    commits = sorted({e.get("git_commit") or "not recorded" for e in run_envs.values()})

    os.makedirs(out, exist_ok=True)
    payload = {"task": task, "results": results,
               "runs": [{"run": n, "argv": p.get("argv"), "config": p["config"],
                         "task_notes": p["task_notes"], "environment": p["environment"],
                         "total_seconds": p.get("total_seconds")} for n, p in runs]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    cols = ["quantiser", "codebook_size", "lr", "batch_size", "cpu_budget_minutes",
            "time_budget_minutes", "steps_done", "stopped_by", "train_seconds", "train_cpu_seconds", "utilisation",
            "used", "perplexity", "mse", metric, "heldout_tokens", "tokens_per_code",
            "eval_seconds", "eval_cpu_seconds", "heldout_evals_during_training_seconds",
            "backend"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([r.get(c) for c in cols])

    m = metric.upper()
    head = ["K", "quantiser", "run", "CPU", "Adam lr", "steps done", "train CPU (min)",
            "train wall (min)", "stopped by", "held-out utilisation", "codes used", "perplexity", "MSE",
            f"{m} (dB)", "held-out tokens per code", "final evaluation (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            str(r["codebook_size"]), NAMES.get(r["quantiser"], r["quantiser"]), r["run"],
            run_envs[r["run"]].get("cpu_model") or "not recorded", f"{r['lr']:g}",
            str(r["steps_done"]), f"{r['train_cpu_seconds'] / 60:.1f}",
            f"{r['train_seconds'] / 60:.1f}", r["stopped_by"], format_percent(r["utilisation"]),
            str(r["used"]), f"{r['perplexity']:.1f}", f"{r['mse']:.5f}", f"{r[metric]:.2f}",
            f"{r['tokens_per_code']:.1f}", f"{r['eval_seconds']:.0f}"]) + " |")
    curve = ["| K | quantiser | run | step | train CPU (min) | held-out utilisation | "
             "codes used |", "|---|---|---|---|---|---|---|"]
    for r in results:
        pts = [h for h in r["history"] if "heldout_utilisation" in h]
        if not pts:
            continue
        for h in pts:
            curve.append(f"| {r['codebook_size']} | {NAMES.get(r['quantiser'])} | {r['run']} "
                         f"| {h['step']} "
                         f"| {h['train_cpu_seconds'] / 60:.1f} | "
                         f"{format_percent(h['heldout_utilisation'])} | {h['heldout_used']} |")
        curve.append(f"| {r['codebook_size']} | {NAMES.get(r['quantiser'])} | {r['run']} | "
                     f"{r['steps_done']} (end) | {r['train_cpu_seconds'] / 60:.1f} | "
                     f"{format_percent(r['utilisation'])} | {r['used']} |")
    cfg0 = runs[0][1]["config"]
    lrs = {q: sorted({r["lr"] for r in results if r["quantiser"] == q}) for q in NAMES}
    lr_text = ", ".join(f"{NAMES[q]} Adam lr {'/'.join(f'{x:g}' for x in v)}"
                        for q, v in lrs.items() if v)
    budgets = sorted({(r["codebook_size"], r["cpu_budget_minutes"], r["time_budget_minutes"])
                      for r in results})
    budget_text = "; ".join(
        f"K = {k}: {c:g} CPU-min" + (f" (wall-clock cap {t:g} min)" if t else "")
        if c else f"K = {k}: {t:g} min" for k, c, t in budgets)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# {task}: plain VQ vs SimVQ at large codebooks\n\n")
        f.write(
            f"Same model, data, seed and batch order as the default run "
            f"(batch {cfg0['batch_size']}, beta {cfg0['beta']}, d = 32); per K, plain VQ "
            f"and SimVQ trained side by side (two processes, one torch thread each) for the "
            f"same training budget ({budget_text}; the held-out evaluations during training "
            f"are not counted), then encoded a held-out set of >= 10 tokens per code. "
            f"{lr_text}. Runs that share a K and a budget ran side by side; a longer "
            f"budget for one quantiser is a separate run, labelled by its budget. CPU (per "
            f"run in the table): {', '.join(sorted(e for e in envs if e)) or 'not recorded'} "
            f"({env0.get('cpu_count')} cores, shared with other jobs, runs at nice 19), torch "
            f"{env0.get('torch')}. Code: {'; '.join(commits)}.\n\n")
        f.write("\n".join(lines) + "\n\n")
        if len(curve) > 2:
            f.write("Held-out utilisation during training (evaluations made during the "
                    "run; their time is not counted in the training budget):\n\n")
            f.write("\n".join(curve) + "\n")
    if len(envs) > 1:
        print(f"warning: runs on different CPUs: {sorted(envs)}", file=sys.stderr)

    windows = sorted({r["util_window"] for r in results})
    wlabel = (str(windows[0]) if len(windows) == 1 else
              " / ".join(f"{w}" for w in windows))
    title = (f"{task}: plain VQ vs SimVQ, the same training budget per K"
             if not any("label" in r for r in results) else
             f"{task}: plain VQ vs SimVQ; pairs share a budget, other runs are labelled")
    plots.plot_utilisation_over_steps(results, os.path.join(out, "utilisation_over_steps.png"),
                                      wlabel, title)
    if len({r["codebook_size"] for r in results}) > 1:  # one K: nothing to plot against
        plots.plot_utilisation_vs_k(results, os.path.join(out, "utilisation_vs_k.png"),
                                    title, metric)
    print(open(os.path.join(out, "results.md")).read())
    return results


if __name__ == "__main__":
    main()
