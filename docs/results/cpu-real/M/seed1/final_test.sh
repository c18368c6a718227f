#!/usr/bin/env bash
# tools/compare_baselines.py, recipe cpu-real: the final test loss of run M, seed 1.
set -euo pipefail
cd /work/wt-frozen
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2
exec /work/wt-frozen/.venv/bin/python /work/wt-frozen/tools/evaluate.py --load /work/camp/cmp_real/M/seed1/ckpt/iter_0000120 --data-path /work/camp/debian_held_out_text_document --seq-length 256 --max-samples 256 --micro-batch-size 4 --output /work/camp/cmp_real/M/seed1/final_test_results.json
