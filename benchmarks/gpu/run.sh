#!/usr/bin/env bash
# GPU acceptance in one call, on one H100/H200 (the device machine):
#
#   build     pip install --no-build-isolation --no-deps -e .  (CUDA kernels for this GPU's
#             architecture only, to keep the build short)
#   bench     python -m simvq_kernels.bench --preset gpu --out $OUT, in this order: the
#             accuracy sweep of every GPU backend vs the float64 oracle; the headline
#             shapes (16384 x 262144 x 128 and 262144 x 262144 x 128 bf16, the latter
#             with peak memory) for our backends and cuBLAS, then for flash-kmeans and
#             flashlib; our other rows; the peers' other rows. Rows still to start 40 s
#             before the stage's limit are skipped, so the reports are always written.
#             Then the side-by-side TFLOP/s table (ours, cuBLAS, flash-kmeans, flashlib)
#             is appended to gpu.md and to this log.
#   tests     pytest of the GPU test files (tests/test_gpu*.py, tests/test_cuda*.py,
#             tests/test_triton*.py)
#   sanitize  compute-sanitizer memcheck and racecheck over benchmarks/gpu/sanitize_ops.py
#             (every GPU backend's ops on small shapes, every dtype)
#
# Usage (repository root):  bash benchmarks/gpu/run.sh [STAGE ...]   (default: all four)
#   BUDGET=570   seconds for the whole script (default fits one 10-minute device call);
#                each stage gets min(its cap, what is left), the bench at least its floor
#   OUT=dir      where everything goes (the device tool sets it; default ./gpu-out)
#   DRY_RUN=1    the CPU-side logic only (CI): no build, the bench's --dry-run on tiny
#                shapes with CPU stand-ins (for the GPU backends, and for flash-kmeans and
#                flashlib those of benchmarks/gpu/standins), GPU tests and sanitizer
#                skipped without a GPU
# Wheels carried in .whl/ (flash-kmeans and flashlib, which the device machine lacks,
# fetched by benchmarks/gpu/fetch_wheels.sh) are installed first into /tmp/site.
#
# Files under $OUT (at most 8, for the device tool): run.log (this script's log and the
# summary), build.log, tests.log, sanitizer.log, gpu.md, gpu.csv, gpu.png,
# gpu-accuracy.csv. The exit status is non-zero if any stage failed.
set -u -o pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-$PWD/gpu-out}
BUDGET=${BUDGET:-570}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build bench tests sanitize)
for stage in "${STAGES[@]}"; do
    case $stage in build | bench | tests | sanitize) ;;
    *)
        echo "run.sh: unknown stage '$stage' (choose from build, bench, tests, sanitize)" | tee -a "$LOG"
        exit 2
        ;;
    esac
done

# stage caps (seconds) and the bench's floor; the preset itself is sized for ~5 minutes
CAP_BUILD=${CAP_BUILD:-240}
CAP_BENCH=${CAP_BENCH:-420}
FLOOR_BENCH=${FLOOR_BENCH:-120}
CAP_TESTS=${CAP_TESTS:-150}
CAP_SANITIZE=${CAP_SANITIZE:-120}

log() { echo "[run.sh $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
limit() {  # limit CAP [FLOOR]: min(CAP, time left - 10 s for the summary), at least FLOOR
    local l=$(($(left) - 10)) cap=$1 floor=${2:-0}
    [ "$l" -gt "$cap" ] && l=$cap
    [ "$l" -lt "$floor" ] && l=$floor
    echo "$l"
}

declare -A STATUS SECONDS_USED
STATUS_ORDER=()
record() {  # record STAGE STATUS SECONDS
    STATUS[$1]=$2
    SECONDS_USED[$1]=$3
    STATUS_ORDER+=("$1")
}

run_stage() {  # run_stage NAME TIMEOUT LOGFILE CMD...
    local name=$1 t=$2 file=$3
    shift 3
    if [ "$t" -le 5 ]; then
        log "$name: skipped, no time left (budget ${BUDGET}s)"
        record "$name" "skipped (no time left)" 0
        return 0
    fi
    log "$name: $* (timeout ${t}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$t" "$@" >>"$file" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        record "$name" ok "$dt"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "TIMED OUT after ${t}s" "$dt"
    else
        record "$name" "FAILED (exit $rc)" "$dt"
    fi
    log "$name: ${STATUS[$name]} in ${dt}s (log: $(basename "$file"))"
    tail -n 25 "$file" | sed 's/^/    /' >>"$LOG"
    return 0
}

have_gpu() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    >/dev/null 2>&1; }

# ------------------------------------------------------------------ the machine
log "budget ${BUDGET}s, stages: ${STAGES[*]}, OUT=$OUT, dry run: $DRY_RUN"
{
    echo "--- machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >>"$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

for stage in "${STAGES[@]}"; do
    case $stage in
    build)
        if [ "$DRY_RUN" = 1 ]; then
            record build "skipped (dry run)" 0
            continue
        fi
        # only this GPU's architecture (9.0a on Hopper): a third of the default build
        ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
        [ "$ARCH" = "9.0" ] && ARCH=9.0a
        run_stage build "$(limit "$CAP_BUILD")" "$OUT/build.log" \
            env SIMVQ_BUILD_CUDA=1 SIMVQ_CUDA_ARCHS="${ARCH:-8.0+PTX;9.0a}" MAX_JOBS="$(nproc)" \
            "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
        "$PY" -m simvq_kernels.info >>"$OUT/build.log" 2>&1
        ;;
    bench)
        if [ "$DRY_RUN" = 1 ]; then
            t=$(limit "$CAP_BENCH")
            # the peers' stand-ins: same import paths and calls, computed on the CPU
            run_stage bench "$t" "$LOG" \
                env SIMVQ_BENCH_PEER_STAND_INS=1 \
                PYTHONPATH="$PWD/benchmarks/gpu/standins${PYTHONPATH:+:$PYTHONPATH}" \
                "$PY" -m simvq_kernels.bench --preset gpu --dry-run --out "$OUT" --no-progress \
                --backends "${DRY_BACKENDS:-cpu,reference}" \
                --peers "${DRY_PEERS:-flash-kmeans,flashlib}" \
                --deadline $((t > 80 ? t - 40 : t / 2))
            # the dry run writes gpu-dry.*; name them like the real run's
            for f in "$OUT"/gpu-dry*; do
                [ -e "$f" ] || continue
                base=$(basename "$f")
                mv "$f" "$OUT/${base/gpu-dry/gpu}"
            done
        else
            # --deadline: stop starting rows 40 s before the stage's limit, so that the
            # reports are written even when the rows outrun the budget
            t=$(limit "$CAP_BENCH" "$FLOOR_BENCH")
            run_stage bench "$t" "$LOG" \
                "$PY" -m simvq_kernels.bench --preset gpu --out "$OUT" --no-progress \
                --deadline $((t > 80 ? t - 40 : t / 2))
        fi
        # the GPU kernels side by side (TFLOP/s), appended to gpu.md
        if [ -f "$OUT/gpu.csv" ]; then
            env SIMVQ_BENCH_PEER_STAND_INS="$DRY_RUN" "$PY" -m simvq_kernels.bench.gpu_summary \
                "$OUT/gpu.csv" >"$OUT/.side-by-side.md" 2>>"$LOG" &&
                { echo; cat "$OUT/.side-by-side.md"; } >>"$OUT/gpu.md"
            rm -f "$OUT/.side-by-side.md"
        fi
        ;;
    tests)
        files=$(ls tests/test_gpu*.py tests/test_cuda*.py tests/test_triton*.py 2>/dev/null | tr '\n' ' ')
        if [ -z "$files" ]; then
            record tests "skipped (no GPU test files)" 0
        elif [ "$DRY_RUN" = 1 ] || ! have_gpu; then
            record tests "skipped (no GPU here)" 0
        else
            # shellcheck disable=SC2086
            run_stage tests "$(limit "$CAP_TESTS")" "$OUT/tests.log" \
                "$PY" -m pytest -q -rfEs -p no:cacheprovider $files
        fi
        ;;
    sanitize)
        if [ "$DRY_RUN" = 1 ] || ! have_gpu || ! command -v compute-sanitizer >/dev/null; then
            record sanitize "skipped (no GPU or no compute-sanitizer here)" 0
            continue
        fi
        t=$(limit "$CAP_SANITIZE")
        run_stage sanitize-memcheck "$((t * 2 / 3))" "$OUT/sanitizer.log" \
            compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
            "$PY" benchmarks/gpu/sanitize_ops.py
        run_stage sanitize-racecheck "$(limit "$CAP_SANITIZE")" "$OUT/sanitizer.log" \
            compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
            "$PY" benchmarks/gpu/sanitize_ops.py --quick
        ;;
    esac
done

# ------------------------------------------------------------------ summary
fail=0
for s in "${STATUS_ORDER[@]}"; do
    case ${STATUS[$s]} in ok | skipped*) ;; *) fail=1 ;; esac
done
{
    echo
    echo "=== GPU acceptance summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget) ==="
    printf '%-20s %-40s %s\n' stage status seconds
    for s in "${STATUS_ORDER[@]}"; do
        printf '%-20s %-40s %s\n' "$s" "${STATUS[$s]}" "${SECONDS_USED[$s]}"
    done
    if [ -f "$OUT/gpu.md" ]; then
        echo
        echo "--- GPU kernels side by side (from gpu.md)"
        sed -n '/^## GPU kernels side by side/,/^flash-kmeans 0/p' "$OUT/gpu.md" | grep -E '^\|' | head -20
        echo
        echo "--- targets (from gpu.md)"
        sed -n '/^## Targets/,/^## GPU kernels side by side/p' "$OUT/gpu.md" | grep -E '^\|' |
            grep -v -- '---' | head -60
    fi
} | tee -a "$LOG"
exit $fail
