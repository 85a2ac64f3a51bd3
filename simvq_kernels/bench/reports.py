"""Reports: the plain-text table, the markdown summary, the CSV and the plot."""
from __future__ import annotations

import csv
from typing import Optional

from .presets import OPS, PRESETS, op_label
from .providers import PAIRED_PROVIDERS
from .run import BenchResult, Row
from .targets import evaluate_targets
from .timing import PAIRS, ceiling_label


def _sorted(ceilings: dict) -> list:
    """Ceilings in a stable order: by d (CPU) or by precision mode name (CUDA)."""
    return sorted(ceilings.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))

COLUMNS = ("provider", "shape NxKxd", "op", "median ms", "IQR ms", "runs", "Mtok/s", "GFLOP/s",
           "peak MiB", "x ref", "x faiss", "% ceil", "% peak", "check")


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def row_cells(r: Row) -> list:
    if r.status != "ok":
        return [r.provider, r.shape.label, r.op_label] + ["-"] * (len(COLUMNS) - 4) + [r.check]
    q1, q3 = r.quartiles
    return [r.provider, r.shape.label, r.op_label, f"{r.median * 1e3:.2f}",
            f"{(q3 - q1) * 1e3:.2f}", str(len(r.times)), f"{r.tokens_per_s / 1e6:.3g}",
            f"{r.gflops:.1f}", _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20,
                                    ".1f"),
            _fmt(r.vs_reference, ".2f"), _fmt(r.vs_faiss, ".2f"),
            _fmt(None if r.frac_ceiling is None else 100 * r.frac_ceiling, ".0f"),
            _fmt(None if r.frac_peak is None else 100 * r.frac_peak, ".0f"), r.check]


def format_table(rows) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i < 3 or i == len(c) - 1 else x.rjust(w)
                               for i, (x, w) in enumerate(zip(c, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if i < 3 or i == len(COLUMNS) - 1 else "---:"
                          for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(out)


def footnotes(result: BenchResult) -> list:
    """Row notes, check failures and errors, numbered by row."""
    lines = []
    for r in result.rows:
        extra = [x for x in (r.note,) if x]
        if r.status == "error" or r.check == "FAIL":
            extra.append(r.check_detail)
        if r.mem_method and not r.mem_method.startswith(("VmHWM growth (reset)",
                                                         "cuda max_memory")):
            extra.append("memory: " + r.mem_method)
        if extra:
            lines.append(f"{r.provider} {r.op_label} {r.shape.label}: " + "; ".join(extra))
    return lines


def peak_line(result: BenchResult, markdown: bool = False) -> str:
    """The machine's FMA peak per ISA and which ISA set the peak the rows are compared
    with; '' when it was not measured (no CPU rows, or no extension)."""
    if not result.peaks:
        return ""
    threads = result.peak_threads or result.machine.get("torch threads", "all")
    per_isa = ", ".join(f"{isa} {g:.1f}" for isa, g in result.peaks.items())
    b = "**" if markdown else ""
    text = (f"FMA peak (fp32, measured on all {threads} threads, 12 independent FMA chains "
            f"per thread, the better of the start and end of the run), GFLOP/s: {per_isa}; "
            f"{b}% peak is against {result.peak_isa}'s {result.peak:.1f}{b}")
    best = result.machine_peak_isa
    if result.peak_isa == best:
        text += f" (the machine's peak: {best} set it)"
    else:
        text += (f" (the CPU kernel runs {result.peak_cap} here, set by SIMVQ_CPU_ISA or "
                 f"set_cpu_kernel_config; the machine's peak is {best}'s "
                 f"{result.peaks[best]:.1f})")
    return text


def format_report(result: BenchResult) -> str:
    """The plain-text report: header, table, ceilings, notes, targets."""
    m = result.machine
    lines = [f"simvq-kernels bench: preset {result.preset.name!r} on {result.device} "
             f"({m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch threads']} threads), "
             f"{m['date']}, commit {m['git commit']}"]
    if result.peaks:
        lines.append(peak_line(result))
    lines += ["", format_table(result.rows), ""]
    if result.ceilings:
        lines.append("matmul ceiling (GFLOP/s): " + ", ".join(
            f"{ceiling_label(k)}: {g:.1f}" for k, g in _sorted(result.ceilings)))
    if result.device.startswith("cuda"):
        lines.append("% ceil: this row's GFLOP/s over cuBLAS 8192^3 in the row's precision "
                     "mode (the tensor-core ceiling); x matmul: the same-shape product's "
                     "time / this row's (see the markdown)")
    else:
        lines.append("% ceil: forward rows of " + ", ".join(PAIRED_PROVIDERS) + " measured "
                     "side by side with the ceiling tile in the same process (see the "
                     "markdown)")
        if result.peaks:
            lines.append("% peak: forward rows of " + ", ".join(PAIRED_PROVIDERS) +
                         " measured side by side with the FMA peak probe; other rows: "
                         "GFLOP/s over the run's peak")
    lines.append("GFLOP/s counts 2*N*K*d per call for every op; x ref / x faiss = their "
                 "time / this row's time; peak MiB = measured growth above the inputs.")
    for n in result.notes + footnotes(result):
        lines.append("note: " + n)
    if result.sweep is not None:
        lines += ["", result.sweep.text()]
    targets = evaluate_targets(result)
    if targets:
        lines += ["", f"targets (fused backend '{result.fused_label}', ratios measured in this "
                  "run):"]
        for t, v, s in targets:
            lines.append(f"  [{s:>6}] {t}: {v}")
    return "\n".join(lines)


def format_markdown(result: BenchResult, plot_path: Optional[str] = None,
                    command: str = "") -> str:
    m = result.machine
    md = [f"# simvq-kernels benchmark: preset `{result.preset.name}` on {result.device}", ""]
    for k, v in m.items():
        md.append(f"- **{k}**: {v}")
    if result.peaks:
        md += ["", peak_line(result, markdown=True)]
    if command:
        md += ["", "Command:", "", "```", command, "```"]
    md += ["", format_markdown_table(result.rows), ""]
    gpu = result.device.startswith("cuda")
    if result.ceilings and gpu:
        md.append("Matmul ceiling (cuBLAS 8192 x 8192 x 8192 in each precision mode into a "
                  "preallocated output, random data, the better of the start and end of the "
                  "run): " + ", ".join(f"{k}: {g:.1f} GFLOP/s"
                                       for k, g in _sorted(result.ceilings)))
        md.append("")
    elif result.ceilings:
        md.append("Matmul ceiling (torch.mm of a cache-resident 1024 x d x 1024 tile into a "
                  "preallocated output, the better of the start and end of the run): "
                  + ", ".join(
                      f"d={d}: {g:.1f} GFLOP/s" for d, g in _sorted(result.ceilings)))
        md.append("")
    if gpu:
        md.append("GFLOP/s counts 2·N·K·d per call for every op. `x ref` / `x faiss` = their "
                  "median time / this row's. Peak MiB = growth of the CUDA allocator's peak "
                  "above the inputs, in a fresh child process per row. `% ceil` = this row's "
                  "GFLOP/s over the tensor-core ceiling of its precision mode; the `matmul` "
                  "rows are the same-shape cuBLAS product into a preallocated N x K output "
                  "(a second ceiling, bound by writing N x K), compared in the targets.")
    else:
        md.append("GFLOP/s counts 2·N·K·d per call for every op. `x ref` / `x faiss` = their "
                  "median time / this row's. Peak MiB = measured growth of the resident set "
                  "(VmHWM) above the inputs, in a fresh child process per row. `% ceil`: for "
                  f"the forward rows of {', '.join(PAIRED_PROVIDERS)}, measured side by side "
                  f"(the op and an equally long batch of ceiling tiles timed alternately in "
                  f"the same process, median of {PAIRS} per-pair ratios, so that the "
                  "machine's drifts cancel); for other rows, this row's GFLOP/s over the "
                  "run's ceiling. `% peak`: the same against the machine's physical fp32 FMA "
                  "peak (the probe `torch.ops.simvq.fma_peak`, 12 independent FMA chains per "
                  "thread on all threads, in the ISA named above): side by side for those "
                  "forward rows (the op and an equally long batch of probe calls), else this "
                  "row's GFLOP/s over the run's peak. Layer rows count the search's flops, "
                  "2·N·K·d, as the GFLOP/s column does.")
    if result.sweep is not None:
        md += ["", result.sweep.markdown()]
    notes = result.notes + footnotes(result)
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    targets = evaluate_targets(result)
    if targets:
        md += ["", f"## Targets (fused backend `{result.fused_label}`, ratios measured in this "
               "run)", "",
               "| target | measured | |", "|---|---:|---|"]
        md += [f"| {t} | {v} | {s} |" for t, v, s in targets]
    if plot_path:
        md += ["", f"![throughput vs K]({plot_path})"]
    return "\n".join(md) + "\n"


CSV_FIELDS = ("provider", "n", "k", "d", "r", "op", "status", "runs", "median_s", "q1_s",
              "q3_s", "min_s", "max_s", "tokens_per_s", "gflops", "peak_mib", "mem_method",
              "vs_reference", "vs_faiss", "ceiling_gflops", "frac_ceiling",
              "frac_ceiling_method", "check",
              "check_detail", "foreign_cores", "note", "device", "mode", "first_s",
              "vs_matmul", "vs_search_paired", "peak_gflops", "peak_isa", "frac_peak",
              "frac_peak_method")


def write_csv(result: BenchResult, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result.rows:
            q1, q3 = r.quartiles if r.times else (None, None)
            w.writerow({
                "provider": r.provider, "n": r.shape.n, "k": r.shape.k, "d": r.shape.d,
                "r": r.shape.basis_dim, "op": OPS[r.op], "status": r.status,
                "mode": r.mode, "first_s": r.first_s, "vs_matmul": r.vs_matmul,
                "vs_search_paired": r.paired_vs_search,
                "runs": len(r.times), "median_s": r.median, "q1_s": q1, "q3_s": q3,
                "min_s": min(r.times) if r.times else None,
                "max_s": max(r.times) if r.times else None,
                "tokens_per_s": r.tokens_per_s, "gflops": r.gflops,
                "peak_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20,
                "mem_method": r.mem_method, "vs_reference": r.vs_reference,
                "vs_faiss": r.vs_faiss, "ceiling_gflops": r.ceiling,
                "frac_ceiling": r.frac_ceiling,
                "frac_ceiling_method": ("paired" if r.paired_frac is not None else
                                        "run ceiling" if r.frac_ceiling is not None else ""),
                "check": r.check,
                "check_detail": r.check_detail, "foreign_cores": r.foreign_cores,
                "note": r.note, "device": result.device,
                "peak_gflops": r.peak, "peak_isa": result.peak_isa if r.peak else None,
                "frac_peak": r.frac_peak,
                "frac_peak_method": ("paired" if r.paired_peak is not None else
                                     "run peak" if r.frac_peak is not None else "")})


def write_plot(result: BenchResult, path: str) -> None:
    """Throughput (GFLOP/s = 2NKd / time) vs K per provider: one row of panels per op,
    one column per d, with the matmul ceiling for that d as a dashed line and the
    machine's FMA peak (CPU) as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in result.rows if r.median]
    ops = list(dict.fromkeys(r.op_label for r in timed))
    ds = sorted({r.shape.d for r in timed})
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), len(ds), figsize=(5.2 * len(ds), 4.0 * len(ops)),
                             squeeze=False)
    providers = list(dict.fromkeys(r.provider for r in result.rows))
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    for i, op in enumerate(ops):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            cell = [r for r in timed if r.op_label == op and r.shape.d == d]
            if not cell:
                ax.axis("off")
                continue
            for p in providers:
                pts = sorted((r.shape.k, r.gflops) for r in cell if r.provider == p)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=p,
                            color=colours[p])
            ceil = next((r.ceiling for r in cell if r.ceiling), None)
            if ceil:
                ax.axhline(ceil, ls="--", color="k", lw=1,
                           label=f"matmul ceiling ({ceil:.0f})")
            if result.peak:
                ax.axhline(result.peak, ls=":", color="r", lw=1,
                           label=f"FMA peak, {result.peak_isa} ({result.peak:.0f})")
            ns = sorted({r.shape.n for r in cell})
            ks = sorted({r.shape.k for r in cell})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ks)
            ax.set_xticklabels([f"{k // 1024}k" if k >= 1024 else str(k) for k in ks])
            ax.set_xlim(ks[0] / 1.6, ks[-1] * 1.6)
            ax.set_xlabel("K (codes)")
            ax.set_ylabel("GFLOP/s (2NKd / time)")
            ax.set_title(f"{op}, d={d}, N={'/'.join(map(str, ns))}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    m = result.machine
    if "gpu" in m:
        fig.suptitle(f"simvq-kernels '{result.preset.name}' on {m['gpu']} (driver "
                     f"{m.get('driver', '?')}, CUDA {m.get('cuda runtime (torch)', '?')}, torch "
                     f"{m.get('torch', '?')}, triton {m.get('triton', '?')}), {m['date']}, "
                     f"commit {m['git commit'][:10]}", fontsize=9)
    else:
        fig.suptitle(f"simvq-kernels '{result.preset.name}' on {m['cpu']} "
                     f"({m['torch threads']} threads), {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def list_presets(show_hidden: bool = False) -> str:
    lines = []
    for p in PRESETS.values():
        if p.hidden and not show_hidden:
            continue
        lines.append(f"{p.name:<8} {p.description}")
        for c in p.cases:
            only = f" [{', '.join(c.providers)} only]" if c.providers else ""
            lines.append(f"{'':<10}{op_label(c.op, c.mode):<14} {c.shape.label}{only}")
    return "\n".join(lines)


