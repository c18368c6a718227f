#!/usr/bin/env bash
# tools/compare_baselines.py, recipe cpu-real: run M, seed 1, lr 0.0003.
# Rerun by hand with `bash command.sh`: it resumes from its own checkpoint when it has one.
set -euo pipefail
cd /work/wt-frozen
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2
LOAD=/work/camp/cmp_real/M/seed1/ckpt
[ -f "$LOAD/latest_checkpointed_iteration.txt" ] || LOAD=/work/camp/smollm2_ckpt
exec /work/wt-frozen/.venv/bin/python -m pretrain \
    --data-path /work/camp/debian_text_document \
    --split 98,2,0 \
    --tokenizer-model /work/camp/smollm2_ckpt/tokenizer \
    --test-data-path /work/camp/debian_held_out_text_document \
    --micro-batch-size 4 \
    --global-batch-size 8 \
    --lr 0.0003 \
    --min-lr 2.9999999999999997e-05 \
    --lr-warmup-iters 6 \
    --lr-decay-style cosine \
    --seed 1 \
    --eval-interval 40 \
    --eval-iters 4 \
    --log-interval 40 \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --save /work/camp/cmp_real/M/seed1/ckpt \
    --keep-last 1 \
    --tensorboard-dir /work/camp/cmp_real/M/seed1/tb \
    --save-interval 20 \
    --seq-length 256 \
    --prune-target-ratio 0.5 \
    --prune-start-tokens 0 \
    --prune-end-tokens 8192 \
    --saliency activation \
    --prune-granularity uniform \
    --shrink-at auto \
    --prune-interval 1000000000 \
    --prune-max-step-fraction 1.0 \
    --prune-allocation search \
    --prune-search-hidden-divisor 64 \
    --prune-search-ffn-divisor 64 \
    --prune-search-max-width-pruning 0.4 \
    --kd-teacher /work/camp/smollm2_ckpt \
    --train-tokens 245760 \
    --load "$LOAD"
