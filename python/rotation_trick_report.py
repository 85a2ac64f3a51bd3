#!/usr/bin/env python
"""Collects the rotation-trick runs of python/run_rotation_trick.sh into one table.

Reads every results.json under ``<root>/{images,audio}/rotation_trick/`` (the
side-by-side comparisons and the sweep) and writes ``<root>/rotation_trick/``:
results.md (the tables), results.csv, results.json and utilisation_over_steps.png.

    python python/rotation_trick_report.py            # root: python/results
"""
import argparse
import csv
import glob
import json
import os

from simvq_kernels.experiments.models import LABELS
from simvq_kernels.experiments.train import format_percent

HERE = os.path.dirname(os.path.abspath(__file__))


def collect(root):
    rows = []
    for task in ("images", "audio"):
        pattern = os.path.join(root, task, "rotation_trick", "**", "results.json")
        for path in sorted(glob.glob(pattern, recursive=True)):
            run = os.path.relpath(os.path.dirname(path), os.path.join(root, task,
                                                                      "rotation_trick"))
            payload = json.load(open(path))
            cfg, env = payload["config"], payload["environment"]
            for r in payload["results"]:
                metric = "psnr" if "psnr" in r else "snr"
                mid = [h for h in r["history"] if "heldout_utilisation" in h]
                rows.append({
                    "task": task, "run": run, "quantiser": r["quantiser"],
                    "label": LABELS.get(r["quantiser"], r["quantiser"]),
                    "codebook_size": r["codebook_size"], "lr": cfg["lr"],
                    "beta": cfg["beta"], "batch_size": cfg["batch_size"],
                    "steps": r.get("steps_done") or cfg["steps"],
                    "utilisation": r["utilisation"], "used": r["used"],
                    "perplexity": r["perplexity"], "recon_metric": metric,
                    "recon_db": r[metric], "mse": r["mse"],
                    "tokens_per_code": r["tokens_per_code"],
                    "train_cpu_seconds": r.get("train_cpu_seconds"),
                    "train_seconds": r["train_seconds"],
                    "mid_step": mid[0]["step"] if mid else None,
                    "mid_utilisation": mid[0]["heldout_utilisation"] if mid else None,
                    "cpu_model": env.get("cpu_model"), "threads": env.get("threads"),
                    "git_commit": env.get("git_commit"), "history": r["history"],
                    "window": cfg["window"]})
    return rows


def table(rows, with_mid=False):
    head = ["task", "K", "quantiser", "Adam lr", "β", "steps x batch", "held-out utilisation",
            "codes used", "perplexity", "held-out tokens per code", "PSNR/SNR (dB)",
            "train CPU-s"]
    if with_mid:
        head.insert(7, "held-out utilisation at half the steps")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], str(r["codebook_size"]), r["label"], f"{r['lr']:g}",
                 f"{r['beta']:g}", f"{r['steps']} x {r['batch_size']}",
                 format_percent(r["utilisation"]), str(r["used"]), f"{r['perplexity']:.1f}",
                 f"{r['tokens_per_code']:.0f}", f"{r['recon_db']:.2f}",
                 f"{r['train_cpu_seconds']:.0f}"]
        if with_mid:
            cells.insert(7, "–" if r["mid_utilisation"] is None else
                         f"{format_percent(r['mid_utilisation'])} (step {r['mid_step']})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows, path):
    from simvq_kernels.experiments.plots import COLOURS, _finish, _plt
    plt = _plt()
    compare = [r for r in rows if r["run"].startswith("compare")]
    sweep = [r for r in rows if r["run"].startswith("sweep")]
    keys = sorted({(r["task"], r["codebook_size"]) for r in compare},
                  key=lambda k: (k[0] != "images", k[1]))
    panels = [(k, [r for r in compare if (r["task"], r["codebook_size"]) == k]) for k in keys]
    panels += [("sweep", sweep)] if sweep else []
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    styles = ["-", "--", ":", "-."]
    for ax, (name, rs) in zip(axes.flat, panels):
        for i, r in enumerate(rs):
            h = r["history"]
            if name == "sweep":
                lab = (f"{'rot.' if r['quantiser'] == 'simvq_rot' else 'STE'} K={r['codebook_size']}"
                       f" lr {r['lr']:g} β {r['beta']:g}")
                col = COLOURS.get(r["quantiser"]) if r["codebook_size"] == 1024 else "#7f7f7f"
                ls = styles[i % len(styles)]
            else:
                lab, col, ls = r["label"], COLOURS.get(r["quantiser"]), "-"
            ax.plot([p["step"] for p in h], [100 * p["window_utilisation"] for p in h],
                    color=col, ls=ls, lw=1, label=f"{lab}: {format_percent(r['utilisation'])}")
            ax.plot([h[-1]["step"]], [100 * r["utilisation"]], "D", color=col, markersize=4)
        title = (f"{name[0]}, K = {name[1]:,}: side by side, {rs[0]['steps']:,} steps"
                 if name != "sweep" else "images: rotation trick sweep (ours)")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center right")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"codes used in the last {rows[0]['window']} steps (%)")
    return _finish(plt, fig, path, "SimVQ with the straight-through estimator vs the "
                   "rotation trick (◆ = held-out utilisation at the end)", fontsize=9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        raise SystemExit(f"no rotation-trick runs under {args.root}")
    out = os.path.join(args.root, "rotation_trick")
    os.makedirs(out, exist_ok=True)
    compare = sorted((r for r in rows if r["run"].startswith("compare")),
                     key=lambda r: (r["task"] != "images", r["codebook_size"]))
    sweep = [r for r in rows if r["run"].startswith("sweep")]
    cpus = sorted({r["cpu_model"] or "?" for r in rows})
    if len(cpus) > 1:  # name each CPU's runs: train CPU-s compare only within one CPU
        runs_on = {c: sorted({f"{r['task']}/{r['run']}" for r in rows
                              if (r["cpu_model"] or "?") == c}) for c in cpus}
        cpus = [f"{c} ({', '.join(runs_on[c])})" for c in cpus]
    commits = sorted({(r["git_commit"] or "?")[:7] for r in rows})
    md = ["# SimVQ: the straight-through estimator vs the rotation trick", "",
          f"Runs: python/run_rotation_trick.sh; CPU: {'; '.join(cpus)}; one torch thread "
          f"per run; code at {', '.join(commits)}. Held-out utilisation counts the codes "
          f"picked at least once on the held-out set (its size in tokens per code is in "
          f"each row).", ""]
    if compare:
        md += ["## Side by side (same model, data, seed, batch order, optimiser, steps)", "",
               table(compare)]
    if sweep:
        md += ["## Sweep (images)", "", table(sweep, with_mid=True)]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    cols = [c for c in rows[0] if c != "history"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": rows}, f, indent=1)
    try:
        plot(rows, os.path.join(out, "utilisation_over_steps.png"))
    except ImportError as e:
        print(f"no figure: {e}")
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    main()
