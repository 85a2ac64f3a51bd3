#!/usr/bin/env bash
# Run on the development machine (it has network; the GPU machine has none) before the
# device call: downloads the pure-Python wheels the GPU acceptance's peers need and the
# device image lacks, into .whl/ (git-ignored through .git/info/exclude), about 1.2 MB:
# flash-kmeans 0.3.1 (42 KB) and flashlib 0.4.0 (0.8 MB), whose Triton kernels are the
# bar (they need torch, triton, numpy and tqdm, all in the device image; flashlib's
# CuTe DSL extra, nvidia-cutlass-dsl, is over 64 MiB and stays behind), and
# vector-quantize-pytorch with the dependencies the image lacks.
# Carry .whl with the call; benchmarks/gpu/run.sh installs them first.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude=$(git rev-parse --git-path info/exclude)  # also right in a git worktree
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d "${WHEEL_DIR:-.whl}" \
    flash-kmeans==0.3.1 flashlib==0.4.0 vector-quantize-pytorch==1.32.0 einx==0.4.3 \
    torch-einops-utils==0.2.0 loguru==0.7.3 frozendict==2.5.1
ls -la "${WHEEL_DIR:-.whl}"
