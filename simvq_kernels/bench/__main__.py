"""`python -m simvq_kernels.bench`: the command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .presets import PRESETS
from .providers import BACKEND_NAMES, PEER_NAMES
from .reports import format_markdown, format_report, list_presets, write_csv, write_plot
from .run import run_benchmark


def _split(s: Optional[str]):
    if s is None:
        return None
    s = s.strip()
    if s in ("", "none"):
        return []
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m simvq_kernels.bench",
        description="Benchmark simvq-kernels' backends against the reference and peer tools, "
                    "with correctness checks and measured peak memory.")
    ap.add_argument("--preset", default="quick",
                    help="preset name (see --list-presets); default: quick")
    ap.add_argument("--memory-check", action="store_true",
                    help="only measure the fused forward's peak memory at 16384x262144x32 "
                         "(same as --preset memory)")
    ap.add_argument("--list-presets", action="store_true", help="list presets and exit")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of backends (default: all of {','.join(BACKEND_NAMES)} "
                         "that serve the device)")
    ap.add_argument("--peers", default=None,
                    help=f"comma list of peers, 'all' or 'none' (default: all of "
                         f"{','.join(PEER_NAMES)} that are installed)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per row after the warm-up (default 7 on CPU, 25 on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each child (default: torch's default)")
    ap.add_argument("--check-rows", type=int, default=1024,
                    help="tokens checked against all codes in float64 (default 1024; all "
                         "tokens when N is at most this)")
    ap.add_argument("--case-budget", type=float, default=60.0,
                    help="seconds of timed runs per row before --repeat is reduced (default 60)")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="repeat the --repeat timed runs until at least this many seconds "
                         "have been timed (default 1; 0 = exactly --repeat runs)")
    ap.add_argument("--case-timeout", type=float, default=900.0,
                    help="kill a row's child process after this many seconds (default 900)")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each row, wait up to this many seconds for other processes "
                         "to leave the CPUs (default 60; 0 = don't wait)")
    ap.add_argument("--quiet-wait-total", type=float, default=600.0,
                    help="stop waiting for quiet after this many seconds in all (default 600)")
    ap.add_argument("--contention-retries", type=int, default=2,
                    help="re-run a row this many times if others used the CPUs while it was "
                         "timed, keeping the least contended run (default 2)")
    ap.add_argument("--peer-blas", default="auto", metavar="MODE",
                    help="BLAS environment of peers that bring their own BLAS (faiss-cpu): "
                         "'auto' (default: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE removed, and the "
                         "widest kernel the CPU runs forced if their OpenBLAS does not know "
                         "this CPU), 'detect' (removed, their own pick), 'inherit' (the "
                         "environment as it is) or an OpenBLAS kernel name, e.g. SkylakeX")
    ap.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV file")
    ap.add_argument("--plot", default=None, help="write a PNG plot of throughput vs K")
    ap.add_argument("--markdown", default=None,
                    help="write a markdown summary (machine, versions, table, targets)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="start no new row after this many seconds (the rest are reported "
                         "as skipped), so that a run under an outer time limit still writes "
                         "its results")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="write PRESET.csv, PRESET.md and PRESET.png (and PRESET-accuracy.csv "
                         "for a preset with an accuracy sweep) into this directory")
    ap.add_argument("--dry-run", action="store_true",
                    help="run a preset's logic on tiny shapes (the gpu preset: on the CPU, "
                         "with the cpu backend, and triton under TRITON_INTERPRET=1, standing "
                         "in for the GPU backends)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.memory_check:
        args.preset = "memory"
    if args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; choose from "
                 f"{[n for n, p in PRESETS.items() if not p.hidden]}")
    preset = PRESETS[args.preset]
    if args.dry_run:
        if preset.dry_run is None:
            ap.error(f"preset {args.preset!r} has no dry run")
        preset = PRESETS[preset.dry_run]
    elif preset.device == "cuda" and not (args.device or "").startswith("cuda") and \
            not _cuda_available():
        ap.error(f"preset {args.preset!r} needs a CUDA device (none here); --dry-run runs "
                 "its logic on tiny shapes on the CPU")
    args.preset = preset.name
    given = {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)
             if a.startswith("--")}
    for name, value in preset.defaults:  # the preset's defaults; flags given win
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    peers = _split(args.peers)
    if peers == ["all"]:
        peers = None
    result = run_benchmark(PRESETS[args.preset], backends=_split(args.backends), peers=peers,
                           device=args.device, repeat=args.repeat, check_rows=args.check_rows,
                           case_budget=args.case_budget, min_time=args.min_time,
                           case_timeout=args.case_timeout, quiet_wait=args.quiet_wait,
                           quiet_wait_total=args.quiet_wait_total,
                           contention_retries=args.contention_retries,
                           threads=args.threads, seed=args.seed, peer_blas=args.peer_blas,
                           deadline=args.deadline,
                           progress=not args.no_progress)
    print(format_report(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, args.preset)
        args.csv = args.csv or stem + ".csv"
        args.plot = args.plot or stem + ".png"
        args.markdown = args.markdown or stem + ".md"
        if result.sweep is not None:
            result.sweep.write_csv(stem + "-accuracy.csv")
            print(f"wrote {stem}-accuracy.csv")
    if args.csv:
        write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        plot_rel = (os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
                    if args.plot else None)
        cmd = "python -m simvq_kernels.bench " + " ".join(
            sys.argv[1:] if argv is None else argv)
        with open(args.markdown, "w") as f:
            f.write(format_markdown(result, plot_rel, cmd))
        print(f"wrote {args.markdown}")
    bad = [r for r in result.rows if r.check == "FAIL" or r.status == "error"]
    if result.sweep is not None and (result.sweep.failures() or result.sweep.errors):
        bad.append(result.sweep)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
