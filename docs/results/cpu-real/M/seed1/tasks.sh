#!/usr/bin/env bash
# tools/compare_baselines.py, recipe cpu-real: the tasks of run M, seed 1.
set -euo pipefail
cd /work/wt-frozen
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2
exec /work/wt-frozen/.venv/bin/python /work/wt-frozen/tools/evaluate.py --load /work/camp/cmp_real/M/seed1/ckpt/iter_0000120 --tasks arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande --num-fewshot 0 --limit 100 --output /work/camp/cmp_real/M/seed1/tasks_results.json
