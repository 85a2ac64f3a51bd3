#!/usr/bin/env bash
# The rotation-trick runs of python/README.md ("vector-quantize-pytorch's SimVQ and the
# rotation trick"), one after another, one torch thread each. Run from the repository
# root. STAGES picks what to run, in order (default: all, in the order below).
# NICE (default 15) is the niceness; OUT the results root (default python/results).
# The committed results ran every stage but sweep_ste_lr5e-4 and sweep_ste_beta1 (the
# straight-through controls); compare_images_k65536_vqp_ste and _vqp ran last, side by side;
# compare_audio_ste was run after the first six, and the K = 8,192 and 65,536
# comparisons later still (each run's results.json names its CPU and commit).
# Then: python python/rotation_trick_report.py
set -euo pipefail
ALL="compare_images sweep_long sweep_lr5e-4 sweep_beta1 sweep_k8192 compare_audio
     compare_audio_ste sweep_ste_lr5e-4 sweep_ste_beta1 compare_images_k8192
     compare_audio_k8192 compare_images_k65536 compare_images_k65536_vqp_ste
     compare_images_k65536_vqp compare_audio_k65536"
STAGES=${STAGES:-$ALL}
NICE=${NICE:-15}
OUT=${OUT:-python/results}
export OMP_NUM_THREADS=1
run() { echo "== $(date -u +%H:%M:%S) $*"; nice -n "$NICE" python "$@" --threads 1 --no-progress; }
S=$OUT/images/rotation_trick/sweep
for stage in $STAGES; do
  case $stage in
    compare_images)  # the default image run's budget: 2,500 steps x 32 crops, lr 2e-3
      run python/train_images.py --quantisers simvq,simvq_rot,vqp_ste,vqp \
          --codebook-sizes 1k --out $OUT/images/rotation_trick/compare_k1024 ;;
    compare_audio)   # the default audio budget, 3,000 steps x 16 windows, lr 2e-3
      run python/train_audio.py --quantisers simvq,simvq_rot,vqp --codebook-sizes 1k \
          --heldout-evals 1 --out $OUT/audio/rotation_trick/compare_k1024 ;;
    compare_audio_ste)  # vector-quantize-pytorch's SimVQ with rotation_trick=False, audio
      run python/train_audio.py --quantisers vqp_ste --codebook-sizes 1k \
          --heldout-evals 1 --out $OUT/audio/rotation_trick/compare_k1024_vqp_ste ;;
    # the sweep: our layer with the rotation trick (images, K = 1024 unless named);
    # --heldout-evals 1 on the 5,000-step runs gives the 2,500-step point of the same run
    sweep_long)
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --steps 5000 \
          --heldout-evals 1 --out $S/lr2e-3_beta0.25_5000steps ;;
    sweep_lr5e-4)
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --lr 5e-4 \
          --out $S/lr5e-4_beta0.25 ;;
    sweep_beta1)
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 1k --beta 1.0 \
          --steps 5000 --heldout-evals 1 --out $S/lr2e-3_beta1.0_5000steps ;;
    sweep_k8192)
      run python/train_images.py --quantisers simvq_rot --codebook-sizes 8k --steps 5000 \
          --heldout-evals 1 --out $S/k8192_lr2e-3_beta0.25_5000steps ;;
    sweep_ste_lr5e-4)  # straight-through controls
      run python/train_images.py --quantisers simvq --codebook-sizes 1k --lr 5e-4 \
          --out $S/ste_lr5e-4_beta0.25 ;;
    sweep_ste_beta1)
      run python/train_images.py --quantisers simvq --codebook-sizes 1k --beta 1.0 \
          --out $S/ste_lr2e-3_beta1.0 ;;
    # the same four quantisers side by side at larger K, 100 held-out tokens per code
    compare_images_k8192)
      run python/train_images.py --quantisers simvq,simvq_rot,vqp_ste,vqp --codebook-sizes 8k \
          --heldout-tokens-per-code 100 --out $OUT/images/rotation_trick/compare_k8192 ;;
    compare_audio_k8192)
      run python/train_audio.py --quantisers simvq,simvq_rot,vqp_ste,vqp --codebook-sizes 8k \
          --heldout-tokens-per-code 100 --out $OUT/audio/rotation_trick/compare_k8192 ;;
    # K = 65,536: vector-quantize-pytorch's layer took ~1 s per training step (2-core Xeon), ours
    # 0.07 s, so all four train for 2,000 steps (about half the steps of the large-K runs),
    # 30 held-out tokens per code
    compare_images_k65536)
      run python/train_images.py --quantisers simvq,simvq_rot --codebook-sizes 64k \
          --steps 2000 --heldout-tokens-per-code 30 --out $OUT/images/rotation_trick/compare_k65536 ;;
    # vector-quantize-pytorch's two rows at 65,536, one stage each so that they can run
    # side by side (~2.5 s per step on one core of a 2-core AMD EPYC: ~1.5 CPU-hours each)
    compare_images_k65536_vqp_ste)
      run python/train_images.py --quantisers vqp_ste --codebook-sizes 64k \
          --steps 2000 --heldout-tokens-per-code 30 \
          --out $OUT/images/rotation_trick/compare_k65536_vqp_ste ;;
    compare_images_k65536_vqp)
      run python/train_images.py --quantisers vqp --codebook-sizes 64k \
          --steps 2000 --heldout-tokens-per-code 30 \
          --out $OUT/images/rotation_trick/compare_k65536_vqp ;;
    compare_audio_k65536)
      run python/train_audio.py --quantisers simvq,simvq_rot,vqp_ste,vqp --codebook-sizes 64k \
          --steps 2000 --heldout-tokens-per-code 30 --out $OUT/audio/rotation_trick/compare_k65536 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
