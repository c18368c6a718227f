#!/usr/bin/env bash
# The documented CPU comparison (docs/RESULTS.md): the Debian-documentation corpus (fetched once into
# a cache, nothing installed), a 4000-token tokenizer, the training and held-out datasets, then
# tools/compare_baselines.py --recipe cpu-small with 3 seeds. Resumable: run it again to go on.
#     bash bench/compare_cpu_small.sh            # OUT=cmp_small DOCS_CACHE=~/.cache/efficientllm/debian-docs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-cmp_small}
DATA=${DATA:-$OUT/data}
SEEDS=${SEEDS:-3}
DOCS_CACHE=${DOCS_CACHE:-$HOME/.cache/efficientllm/debian-docs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
mkdir -p "$DATA"
if [ ! -f "$DATA/held_out_text_document.bin" ]; then
    $PY -m data_prep.build_corpus --source debian-docs --fetch-packages --debian-docs-dir "$DOCS_CACHE" \
        --output "$DATA/train.jsonl" --min-total-chars 100000000 \
        --holdout-fraction 0.01 --holdout-output "$DATA/held_out.jsonl"
    $PY -m data_prep.train_tokenizer --input "$DATA/train.jsonl" --vocab-size 4000 --output "$DATA/tok" \
        --input-sentence-size 1000000
    for name in train held_out; do
        $PY tools/preprocess_data.py --input "$DATA/$name.jsonl" --output-prefix "$DATA/$name" \
            --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
            --append-eod --workers 2 --no-progress
    done
fi
RESUME=()
[ -f "$OUT/runs/plan.json" ] && RESUME=(--resume)
$PY tools/compare_baselines.py --recipe cpu-small --data-path "$DATA/train_text_document" \
    --tokenizer-model "$DATA/tok.model" --test-data-path "$DATA/held_out_text_document" \
    --seeds "$SEEDS" --out "$OUT/runs" "${RESUME[@]}"
