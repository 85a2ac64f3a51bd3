"""`python -m simvq_kernels.bench`: speed, memory and correctness of every backend and peer.

One run times each *provider* (a backend of this library, or a peer tool) on the shapes
of a named preset, side by side on the same machine and the same inputs, and prints one
table (optionally a CSV, a PNG plot and a markdown summary)::

    python -m simvq_kernels.bench                       # the 'quick' preset
    python -m simvq_kernels.bench --preset core --csv out.csv --plot out.png
    python -m simvq_kernels.bench --memory-check        # fused peak memory, 16384x262144x32
    python -m simvq_kernels.bench --list-presets

Providers
    Backends: 'reference' (the official formula, builds N x K), 'chunked' (pure-PyTorch
    tiles), 'cpu' (fused C++ kernel), 'cuda' where built. Peers, where installed:
    'vq-pytorch' (vector-quantize-pytorch's SimVQ with the rotation trick off, i.e. the
    same straight-through estimator; its forward also projects the codebook, a K*r*d
    extra), 'vq-pytorch-rot' (the same with its default rotation trick; layer rows only),
    'cdist' (torch.cdist + min), 'faiss' (IndexFlatL2, k=1, index rebuilt per call as the
    codebook changes every training step), 'pykeops' (LazyTensor min_argmin).

Ops
    'fwd': the nearest-code search given the projected codebook Q (K, d)
    (``sk.nearest_code`` for the backends). 'layer fwd+bwd': a SimVQ layer forward plus
    the backward of ``loss + sum(out * g)`` for a fixed random upstream gradient g;
    'layer fwd+bwd channel-first': the same with ``channel_first=True`` on the same
    tokens laid out as (N/256, d, 16, 16) images (indices and dz are read back in token
    order for the checks). GFLOP/s always counts the search, 2*N*K*d, so that rows
    compare. Encode and eval rows of the backends, and layer rows of the fused backends,
    are also timed alternately with the bare search on the same inputs (their time over
    the search's).

Method
    - Each (provider, shape, op) runs in its own child process (a fork of a forkserver
      that has imported torch), so peak memory is *measured*: on CPU the child builds the
      inputs, runs the op once on a tiny input of the same width (to fault in code pages
      and start thread pools), records its resident set size, resets the kernel's
      high-water mark (``/proc/self/clear_refs``), runs the op once and reports VmHWM
      growth above the inputs. Where the reset is refused the growth is measured against
      the previous high-water mark and marked as an upper bound. On CUDA it is
      ``torch.cuda.max_memory_allocated`` above the inputs.
    - That first (warm-up) run is excluded from the timings; then ``--repeat`` runs are
      timed (default 7 on CPU, 25 on CUDA with CUDA events, the device synchronised
      inside the timed region), repeated for fast ops until ``--min-time`` seconds have
      been timed, and the median and inter-quartile range are reported. Each row also
      measures the CPU time other processes used while it was timed (/proc/stat minus
      the child's own) and says 'contended' when that exceeds 0.1 cores. Before each row
      the bench waits (``--quiet-wait``) for other processes to leave the CPUs, and a
      contended row is re-run (``--contention-retries``), keeping the quietest run.
    - Before timing, the result of the warm-up run is checked against the float64
      oracle with the criterion of design.md §3: pick k passes for token z if
      d64(z, Q_k) - min_j d64(z, Q_j) <= eps(z) = 4u*||z||*max||Q|| + a(d)*(||z||^2 +
      max||Q||^2), a(d) = max(1e-6, 4*sqrt(d)*2^-24) (u = 0 for exact fp32 products,
      2^-11 for tf32, 2^-8 for bf16), and a returned distance must lie
      within eps(z) of d64(z, Q_k). Rows are checked against all K codes in float64 tiles
      (all rows when N <= --check-rows, else a random subset). Layer rows also compare
      dz, dW and db with autograd through the float64 reference at the provider's own
      picks (normwise relative tolerance 1e-4 for fp32 products).
    - Ceiling: torch.mm of a cache-resident 1024 x d by d x 1024 tile into a
      preallocated output (8192 x d x 8192 on CUDA), as GFLOP/s per d, measured at the
      start and at the end of the run; the higher of the two is the limit used.
    - FMA peak (CPU): the machine's physical fp32 limit, the extension's probe
      ``torch.ops.simvq.fma_peak`` (12 independent FMA chains per thread on all threads)
      per vector ISA the CPU runs, measured like the ceiling (start and end, the higher
      kept); the best ISA's is the peak (the best up to SIMVQ_CPU_ISA where that limits
      the kernel). Forward rows of the paired providers get their fraction of it
      measured side by side (the op and an equally long batch of probe calls timed
      alternately, median of the per-pair ratios); other CPU rows GFLOP/s over the peak.
    - Providers that build the N x K matrix (reference, cdist, vq-pytorch) are skipped
      when 3*N*K*4 bytes exceed 40% of the RAM (device memory on CUDA); a provider
      whose warm-up run makes ``--repeat`` runs exceed ``--case-budget`` seconds gets
      fewer runs (noted), and a child running past ``--case-timeout`` is killed.

Layout (one job per module): presets (cases), inputs, checks (the float64 oracle),
providers (backends and peers, one registry entry each), timing, memory, child (one
process per row), machine, run (the driver), targets, reports, and the command line in
__main__.
"""
from __future__ import annotations

from .checks import (GRAD_RTOL, CheckResult, _codes64_from_codebook, _codes64_from_params,
                     check_grads, check_nearest, check_output, check_rows_for,
                     oracle_layer_grads, unit_roundoff)
from .gpu import Sweep, SweepResult  # also registers the 'gpu' presets
from .inputs import BETA, Inputs, make_inputs
from .machine import machine_info
from .memory import PeakMemory, total_memory_bytes
from .presets import (FUSED_BACKENDS, MEMORY_SHAPE, MEMORY_TARGET_MIB, OPS, PRESETS, Case,
                      Preset, Shape)
from .providers import (BACKEND_NAMES, MATERIALISING, PAIRED_PROVIDERS, PEER_MODULES,
                        PEER_NAMES, PROVIDER_OPS, PROVIDERS, Provider, Runner, build_runner,
                        register, select_providers, skip_reason)
from .reports import (COLUMNS, CSV_FIELDS, format_markdown, format_report, format_table,
                      list_presets, write_csv, write_plot)
from .run import BenchResult, Row, run_benchmark
from .targets import evaluate_targets
from .timing import (_sync, ceiling_gflops, ceiling_tile, paired_ceiling_fraction,
                     paired_fraction, paired_peak_fraction, time_runs)


__all__ = [
    "Sweep",
    "SweepResult",
    "GRAD_RTOL",
    "CheckResult",
    "_codes64_from_codebook",
    "_codes64_from_params",
    "check_grads",
    "check_nearest",
    "check_output",
    "check_rows_for",
    "oracle_layer_grads",
    "unit_roundoff",
    "BETA",
    "Inputs",
    "make_inputs",
    "machine_info",
    "PeakMemory",
    "total_memory_bytes",
    "FUSED_BACKENDS",
    "MEMORY_SHAPE",
    "MEMORY_TARGET_MIB",
    "OPS",
    "PRESETS",
    "Case",
    "Preset",
    "Shape",
    "BACKEND_NAMES",
    "MATERIALISING",
    "PAIRED_PROVIDERS",
    "PEER_MODULES",
    "PEER_NAMES",
    "PROVIDER_OPS",
    "PROVIDERS",
    "Provider",
    "Runner",
    "build_runner",
    "register",
    "select_providers",
    "skip_reason",
    "COLUMNS",
    "CSV_FIELDS",
    "format_markdown",
    "format_report",
    "format_table",
    "list_presets",
    "write_csv",
    "write_plot",
    "BenchResult",
    "Row",
    "run_benchmark",
    "evaluate_targets",
    "_sync",
    "ceiling_gflops",
    "ceiling_tile",
    "paired_ceiling_fraction",
    "paired_fraction",
    "paired_peak_fraction",
    "time_runs",
    "main",
]


def main(argv=None) -> int:
    """The command line (``python -m simvq_kernels.bench``), callable in-process."""
    from .__main__ import main as _main

    return _main(argv)
