#!/usr/bin/env bash
# The large-codebook runs behind python/results/{images,audio}/large_k/.
#
# Per (task, K), plain VQ and SimVQ train side by side in two processes (one torch
# thread each) for the same budget of CPU time (with a wall-clock cap), so both see the
# same load on a shared machine; each then encodes a held-out set of >= 10 tokens per code. Plain VQ uses its
# best-known learning rate (1e-3, see python/README.md's baseline checks), SimVQ the
# default one (2e-3). Afterwards python/large_k_report.py collects the runs into one
# table, CSV, JSON and figures per task.
#
#   bash python/run_large_k.sh            # from the repository root
#   CPU64=10 CPU256=4 ROUNDS="images:65536 audio:262144" bash python/run_large_k.sh
set -u
OUT=${OUT:-python/results}
MIN64=${MIN64:-20}     # wall-clock cap on the training minutes per run at K = 65536
MIN256=${MIN256:-8}    # the same at K = 262144
CPU64=${CPU64:-10}     # training budget per run in CPU minutes at K = 65536
CPU256=${CPU256:-4}    # the same at K = 262144
EVALS64=${EVALS64:-2}  # held-out evaluations during training at K = 65536
PY=${PYTHON:-python}

run_pair() {  # task, K, minutes, CPU minutes, held-out evaluations during training, window
    local task=$1 k=$2 minutes=$3 cpu=$4 evals=$5 window=$6 q lr dir
    for q in plain simvq; do
        lr=2e-3
        [ "$q" = plain ] && lr=1e-3
        dir=$OUT/$task/large_k/runs/${q}_$k
        mkdir -p "$dir"
        echo "$(date -u +%T) start $task $q K=$k, $cpu CPU-min (at most $minutes min)" >&2
        "$PY" "python/train_$task.py" --quantisers "$q" --codebook-sizes "$k" --lr "$lr" \
            --steps 1000000 --time-budget "$minutes" --cpu-budget "$cpu" --heldout-evals "$evals" \
            --util-window "$window" --threads 1 --no-progress --out "$dir" > "$dir/log.txt" 2>&1 &
    done
    wait
    echo "$(date -u +%T) done $task K=$k" >&2
}

# which (task, K) pairs to run, in order
ROUNDS=${ROUNDS:-"images:65536 audio:65536 images:262144 audio:262144"}
for round in $ROUNDS; do
    task=${round%%:*}
    k=${round##*:}
    if [ "$k" -le 65536 ]; then
        run_pair "$task" "$k" "$MIN64" "$CPU64" "$EVALS64" 320
    else
        run_pair "$task" "$k" "$MIN256" "$CPU256" 0 200
    fi
done
