#!/usr/bin/env bash
# Run on the development machine (it has network; the GPU machine has none) before the
# device call: downloads the pure-Python wheels the GPU acceptance's peers need and the
# device image lacks, into .whl/ (git-ignored through .git/info/exclude), about 0.4 MB.
# Carry .whl with the call; benchmarks/gpu/run.sh installs them first.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .whl \
    flash-kmeans==0.3.1 vector-quantize-pytorch==1.32.0 einx==0.4.3 \
    torch-einops-utils==0.2.0 loguru==0.7.3 frozendict==2.5.1
ls -la .whl
