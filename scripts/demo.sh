#!/usr/bin/env bash
# End-to-end CPU demo: corpus -> tokenizer -> indexed dataset -> pruning-aware pretraining of the
# debug model with TP=2 on 2 gloo processes (pruned to ~50% of its parameters while it trains,
# then shrunk in-run into the smaller architecture, training going on faster) -> checkpoint ->
# stop -> resume from the checkpoint -> report and plots.
# Sizes can be overridden: DEMO_ITERS=300 DEMO_OUT=demo_out bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
ITERS=${DEMO_ITERS:-300}
STOP_AT=${DEMO_STOP_AT:-$((ITERS * 2 / 3))}
VOCAB=${DEMO_VOCAB:-4000}
TOKENS_PER_STEP=$((8 * 128))
PRUNE_START=$((ITERS / 10 * TOKENS_PER_STEP))
PRUNE_END=$((ITERS * 6 / 10 * TOKENS_PER_STEP))
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
rm -rf "$OUT/ckpt" "$OUT/tensorboard" "$OUT/hf"

echo "== 1/6 building the built-in corpus (Python standard library documentation)"
$PY -m data_prep.build_corpus --output "$OUT/corpus.jsonl"
echo "== 2/6 training a sentencepiece tokenizer (vocab $VOCAB)"
$PY -m data_prep.train_tokenizer --input "$OUT/corpus.jsonl" --vocab-size "$VOCAB" --output "$OUT/tokenizer"
echo "== 3/6 preprocessing to a Megatron indexed dataset"
$PY tools/preprocess_data.py --input "$OUT/corpus.jsonl" --output-prefix "$OUT/corpus" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --append-eod --workers 2 --no-progress --overwrite

TRAIN=(-m pretrain --model debug --tensor-model-parallel-size 2
       --data-path "$OUT/corpus_text_document" --split 98,2,0
       --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model"
       --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS"
       --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine
       --log-interval 20 --eval-interval "$((ITERS / 3))" --eval-iters 4
       --save "$OUT/ckpt" --save-interval "$((ITERS / 3))" --tensorboard-dir "$OUT/tensorboard"
       --prune-target-ratio 0.5 --prune-start-tokens "$PRUNE_START" --prune-end-tokens "$PRUNE_END"
       --prune-interval 5 --saliency taylor --prune-granularity uniform --shrink-at auto)
LAUNCH=($PY -m torch.distributed.run --standalone --nproc-per-node 2)

echo "== 4/6 pruning-aware pretraining of the debug model (TP=2, 2 gloo processes) to 50% of its"
echo "        parameters between $PRUNE_START and $PRUNE_END tokens, then shrink it and go on;"
echo "        stopping at iteration $STOP_AT"
"${LAUNCH[@]}" "${TRAIN[@]}" --exit-interval "$STOP_AT" 2>&1 | grep --line-buffered -v -i "warn"
echo "== 5/6 resuming from the checkpoint in $OUT/ckpt and training to $ITERS"
"${LAUNCH[@]}" "${TRAIN[@]}" --load "$OUT/ckpt" 2>&1 | grep --line-buffered -v -i "warn"

$PY tools/plot_pruning.py "$OUT/tensorboard"
$PY -m pretrain.report "$OUT/tensorboard/metrics.jsonl" --checkpoints "$OUT/ckpt" --tensorboard-dir "$OUT/tensorboard"

echo "== 6/6 exporting the shrunk model to HuggingFace, loading it with transformers, generating"
$PY tools/convert_to_hf.py --load "$OUT/ckpt" --save "$OUT/hf" 2>&1 | grep -v -i "warn"
$PY - "$OUT/hf" <<'EOF' 2>&1 | grep -v -i "warn"
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer("Return the number of", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) "
      f"generated: {tokenizer.decode(out[0])!r}")
EOF
