#!/usr/bin/env bash
# Variants of arm A of a finished comparison, each its own run from the same parent and data:
# what the literature suggests when A loses (schedule, window length, saliency normalisation,
# allocation). Each try is A's command.sh with its folders moved and flags appended (the last
# value of a repeated flag wins), so everything else is exactly A's.
#     bash bench/compare_tries.sh CMP_DIR [SEED]      # CMP_DIR: the --out of compare_baselines.py
# Writes CMP_DIR/../tries/<name>/ and prints the test loss and kept fractions of each next to A's.
set -euo pipefail
CMP=${1:?the --out folder of tools/compare_baselines.py}
SEED=${2:-0}
A="$CMP/A/seed$SEED"
[ -f "$A/command.sh" ] || { echo "error: $A/command.sh not found: run the comparison first" >&2; exit 1; }
TRIES=$(dirname "$CMP")/tries
P=$(grep -o -- '--prune-start-tokens [0-9]*' "$A/command.sh" | awk '{print $2}')
END=$(grep -o -- '--prune-end-tokens [0-9]*' "$A/command.sh" | awk '{print $2}')
HALF_WINDOW=$((P + (END - P) / 2))
declare -A FLAGS=(
    [ramp-cubic]="--prune-ramp cubic"
    [window-half]="--prune-end-tokens $HALF_WINDOW"
    [allocation-proportional]="--prune-allocation proportional"
    [taylor-vector]="--saliency-taylor-form vector"
)
for name in ramp-cubic window-half allocation-proportional taylor-vector; do
    dir="$TRIES/seed$SEED/$name"
    mkdir -p "$dir"
    if [ -f "$dir/done" ]; then continue; fi
    sed -e "s|$A/|$dir/|g" -e "s|^    --load \"\$LOAD\"|    ${FLAGS[$name]} --load \"\$LOAD\"|" "$A/command.sh" > "$dir/command.sh"
    echo "== try $name: ${FLAGS[$name]}"
    bash "$dir/command.sh" > "$dir/log.txt" 2>&1 && touch "$dir/done" || echo "   failed: see $dir/log.txt"
done
python3 - "$A" "$TRIES/seed$SEED" <<'PY'
import json, os, sys
def last(path, key):
    rows = [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []
    rows = [r for r in rows if r.get(key) is not None]
    return rows[-1] if rows else None
a, root = sys.argv[1], sys.argv[2]
print(f"{'run':<26} {'test loss':>9}  kept heads / FFN / hidden, params")
for name, folder in [("A", a)] + [(n, os.path.join(root, n)) for n in sorted(os.listdir(root))]:
    ev = last(os.path.join(folder, "tb", "evals.jsonl"), "test_loss")
    pr = last(os.path.join(folder, "tb", "pruning_history.jsonl"), "params")
    if ev is None or pr is None:
        print(f"{name:<26} not finished"); continue
    print(f"{name:<26} {ev['test_loss']:>9.4f}  {pr['kept_heads']:.2f} / {pr['kept_ffn']:.2f} / {pr['kept_hidden']:.2f}, "
          f"{pr['params']:,} (iteration {ev['iteration']})")
PY
