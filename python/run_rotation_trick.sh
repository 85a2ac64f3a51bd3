#!/usr/bin/env bash
# The rotation-trick runs of python/README.md ("vector-quantize-pytorch's SimVQ and the
# rotation trick"), one after another, one torch thread each. Run from the repository
# root. STAGES picks what to run (default all): compare_images compare_audio sweep.
# NICE (default 15) is the niceness; OUT the results root (default python/results).
set -euo pipefail
STAGES=${STAGES:-"compare_images sweep compare_audio"}
NICE=${NICE:-15}
OUT=${OUT:-python/results}
export OMP_NUM_THREADS=1
run() { echo "== $(date -u +%H:%M:%S) $*"; nice -n "$NICE" python "$@" --threads 1 --no-progress; }
Q="simvq,simvq_rot,vqp_ste,vqp"
for stage in $STAGES; do
  case $stage in
    compare_images)  # the default image run's budget: 2,500 steps x 32 crops, lr 2e-3
      run python/train_images.py --quantisers $Q --codebook-sizes 1k \
          --out $OUT/images/rotation_trick/compare_k1024 ;;
    compare_audio)   # 2,000 steps x 16 windows (the default run does 3,000), lr 2e-3
      run python/train_audio.py --quantisers $Q --codebook-sizes 1k --steps 2000 \
          --out $OUT/audio/rotation_trick/compare_k1024 ;;
    sweep)           # our layer with the rotation trick, images, K = 1024 unless named
      S=$OUT/images/rotation_trick/sweep
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --steps 5000 \
          --heldout-evals 1 --out $S/lr2e-3_beta0.25_5000steps
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --lr 5e-4 \
          --out $S/lr5e-4_beta0.25
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --beta 1.0 \
          --out $S/lr2e-3_beta1.0
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 8k \
          --out $S/k8192_lr2e-3_beta0.25
      run python/train_images.py --quantisers simvq --codebook-sizes 1k --beta 1.0 \
          --out $S/ste_lr2e-3_beta1.0
      run python/train_images.py --quantisers simvq --codebook-sizes 1k --lr 5e-4 \
          --out $S/ste_lr5e-4_beta0.25
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --lr 5e-4 \
          --beta 1.0 --out $S/lr5e-4_beta1.0 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
