"""Figures for the collapse experiments. matplotlib is imported inside each function
(with the non-interactive Agg backend), so the package does not depend on it."""
from __future__ import annotations

import numpy as np

from .train import format_percent

from .models import LABELS  # noqa: E402

COLOURS = {"plain": "#d62728", "simvq": "#1f77b4", "simvq_rot": "#9467bd",
           "vqp": "#ff7f0e", "vqp_ste": "#2ca02c"}
DPI = 100


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the figures need matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _finish(plt, fig, path, title, fontsize=10):
    """Title (if any), tight layout, write the PNG, free the figure; returns ``path``."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    return _save(plt, fig, path)


def _by_kind(results):
    out = {}
    for r in results:
        out.setdefault(r["quantiser"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["codebook_size"])
    return out


def plot_utilisation_vs_k(results, path, title="", recon_metric="psnr"):
    """Held-out utilisation (left) and reconstruction quality (right) against K."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for kind, rs in _by_kind(results).items():
        ks = [r["codebook_size"] for r in rs]
        ax.plot(ks, [100 * r["utilisation"] for r in rs], "o-", color=COLOURS.get(kind),
                label=LABELS.get(kind, kind))
        for k, r in zip(ks, rs):
            ax.annotate(format_percent(r["utilisation"]), (k, 100 * r["utilisation"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                        color=COLOURS.get(kind))
        ax2.plot(ks, [r[recon_metric] for r in rs], "o-", color=COLOURS.get(kind),
                 label=LABELS.get(kind, kind))
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("codebook size K")
        a.grid(alpha=0.3)
    ax.set_ylim(0, 108)
    ax.set_ylabel("held-out codebook utilisation (%)")
    ax2.set_ylabel(f"held-out {recon_metric.upper()} (dB)")
    ax.legend(loc="center left")
    return _finish(plt, fig, path, title)


def plot_utilisation_over_steps(results, path, window, title=""):
    """Per K: fraction of codes picked by the training batches of the last ``window``
    steps (lines) and the final held-out utilisation (markers at the last step). A result
    may carry its own ``label`` and ``linestyle`` (several runs of one quantiser per K)."""
    plt = _plt()
    ks = sorted({r["codebook_size"] for r in results})
    fig, axes = plt.subplots(1, len(ks), figsize=(max(3.2 * len(ks), 6.4), 3.0),
                             squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks):
        for r in (r for r in results if r["codebook_size"] == k):
            h = r["history"]
            kind = r["quantiser"]
            ax.plot([p["step"] for p in h], [100 * p["window_utilisation"] for p in h],
                    color=COLOURS.get(kind), label=r.get("label") or LABELS.get(kind, kind),
                    ls=r.get("linestyle", "-"))
            ax.plot([h[-1]["step"]], [100 * r["utilisation"]], "D", color=COLOURS.get(kind),
                    markersize=5)
            mid = [p for p in h if "heldout_utilisation" in p]
            if mid:  # held-out evaluations made during training
                ax.plot([p["step"] for p in mid] + [h[-1]["step"]],
                        [100 * p["heldout_utilisation"] for p in mid]
                        + [100 * r["utilisation"]], "o:", color=COLOURS.get(kind),
                        markersize=4, lw=1)
        ax.set_title(f"K = {k}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"codes used in last {window} steps (%)")
    any_mid = any("heldout_utilisation" in p for r in results for p in r["history"])
    axes[0][0].legend(loc="lower right", fontsize=7, title_fontsize=7,
                      title="◆ = held-out" + (", ● = held-out during training"
                                              if any_mid else ""))
    return _finish(plt, fig, path, title)


def plot_recon_grid(originals, results, path, n=8, title=""):
    """Rows: held-out originals, then the reconstruction of every run (plain/SimVQ per
    K). ``originals`` (M, 3, H, W) in [0, 1]; each result carries ``examples``."""
    plt = _plt()
    rows = [("original", originals[:n])]
    for r in sorted(results, key=lambda r: (r["codebook_size"], r["quantiser"] != "plain")):
        rows.append((f"{LABELS.get(r['quantiser'], r['quantiser'])}\nK={r['codebook_size']}"
                     f"\n{r['psnr']:.1f} dB", r["examples"][:n]))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.0 * n + 1.0, 1.0 * len(rows)),
                             squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            if j < imgs.shape[0]:
                img = imgs[j].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    if title:
        fig.subplots_adjust(top=1 - 0.35 / len(rows))
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def plot_audio_examples(originals, results, path, sample_rate, codebook_size=None,
                        title=""):
    """One held-out window: the original waveform against each quantiser's
    reconstruction at ``codebook_size`` (default: the largest K)."""
    plt = _plt()
    ks = sorted({r["codebook_size"] for r in results})
    k = codebook_size or ks[-1]
    chosen = [r for r in results if r["codebook_size"] == k]
    x = originals[0, 0].cpu().numpy()
    t = np.arange(x.shape[0]) / sample_rate * 1000
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.8 * len(chosen)), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes[:, 0], chosen):
        y = r["examples"][0, 0].cpu().numpy()
        ax.plot(t, x, color="0.6", lw=1.2, label="original")
        ax.plot(t, y, color=COLOURS.get(r["quantiser"]), lw=0.8,
                label=f"{LABELS.get(r['quantiser'])} K={k} (SNR {r['snr']:.1f} dB)")
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (ms)")
    return _finish(plt, fig, path, title, fontsize=9)
