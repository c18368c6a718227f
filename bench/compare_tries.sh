#!/usr/bin/env bash
# Variants of one pruning-aware arm of a finished comparison (A by default), each its own run from
# the same parent and data: one try per hypothesis for why it lost. Each try is the arm's
# command.sh with its folders moved and flags appended (the last value of a repeated flag wins),
# so everything else is exactly the arm's.
#     bash bench/compare_tries.sh CMP_DIR [SEED] [ARM] [TRY ...]   # CMP_DIR: the --out of compare_baselines.py
#     DRY_RUN=1 bash bench/compare_tries.sh ...                       # write and print the commands, run nothing
# Tries of a comparison from a trained parent (A): ramp-cubic, window-half, allocation-proportional,
# taylor-vector. From a released parent (issue 28, item 4; A or A-KD): window-half, events-half,
# saliency-fisher, kd-mixed (A-KD only), obs-each-event, allocation-search.
# Writes CMP_DIR/../tries/seed<SEED>/<ARM>/<try>/ (the trained-parent A's at CMP_DIR/../tries/seed<SEED>/<try>/,
# as before) and prints the test loss and kept fractions of each next to the arm's.
set -euo pipefail
CMP=${1:?the --out folder of tools/compare_baselines.py}
[ -d "$CMP" ] || { echo "error: $CMP: no such folder (the --out of tools/compare_baselines.py)" >&2; exit 1; }
CMP=$(cd "$CMP" && pwd)  # absolute, no trailing slash: as the paths in each run's command.sh
SEED=${2:-0}
ARM=${3:-A}
shift $(( $# < 3 ? $# : 3 ))
BASE="$CMP/$ARM/seed$SEED"
[ -f "$BASE/command.sh" ] || { echo "error: $BASE/command.sh not found: run the comparison (arm $ARM) first" >&2; exit 1; }
flag_value() { grep -o -- "$1 [^ ]*" "$BASE/command.sh" | head -1 | awk '{print $2}' || true; }
P=$(flag_value --prune-start-tokens)
END=$(flag_value --prune-end-tokens)
INTERVAL=$(flag_value --prune-interval)
[ -n "$P" ] && [ -n "$END" ] && [ -n "$INTERVAL" ] || {
    echo "error: $BASE/command.sh has no gradual pruning schedule (--prune-start-tokens/--prune-end-tokens/--prune-interval): tries are for pruning-aware arms (A, A-KD)" >&2; exit 1; }
HALF_WINDOW=$((P + (END - P) / 2))
declare -A FLAGS
# plan.json of compare_baselines.py names the released parent (--parent) of a real-parent recipe
RELEASED=$(python3 -c 'import json, os, sys
for d in sys.argv[1:]:
    p = os.path.join(d, "plan.json")
    if os.path.isfile(p):
        print("yes" if json.load(open(p)).get("settings", {}).get("parent") else ""); break' "$CMP" "$(dirname "$CMP")")
if [ -n "$RELEASED" ]; then
    # M's search space (its divisors), from any M command of the comparison
    M_COMMAND=$(ls "$CMP"/M/seed*/command.sh "$CMP"/sweep/M/*/command.sh 2>/dev/null | head -1 || true)
    M_SEARCH=$([ -n "$M_COMMAND" ] && grep -o -- '--prune-search-[a-z-]* [^ ]*' "$M_COMMAND" | tr '\n' ' ' || true)
    # a released parent: the hypotheses of issue 28, item 4
    TRIES=$(dirname "$CMP")/tries/seed$SEED/$ARM
    FLAGS=(
        [window-half]="--prune-end-tokens $HALF_WINDOW"                # prune over half the window, then recover longer
        [events-half]="--prune-interval $((INTERVAL * 2))"             # half as many events, each twice as large
        [saliency-fisher]="--saliency fisher"                          # another estimator (squared gradients)
        [obs-each-event]="--prune-compensation obs"                    # OBS weight compensation at every event
        [allocation-search]="--prune-allocation search --prune-granularity uniform $M_SEARCH"  # Minitron's widths, chosen gradually
    )
    ORDER="window-half events-half saliency-fisher obs-each-event allocation-search"
    if [ -z "$M_SEARCH" ]; then  # without M's search space the try would search another one than M's
        unset 'FLAGS[allocation-search]'
        ORDER="window-half events-half saliency-fisher obs-each-event"
        echo "note: no M command in $CMP (M/seed*/ or sweep/M/): the allocation-search try needs M's search space; skipped" >&2
    fi
    if grep -q -- "--kd-teacher" "$BASE/command.sh"; then
        FLAGS[kd-mixed]="--kd-weight 0.5"                              # half KL, half the language-model loss
        ORDER="$ORDER kd-mixed"
    fi
else
    TRIES=$(dirname "$CMP")/tries/seed$SEED
    [ "$ARM" = A ] || TRIES=$TRIES/$ARM  # A's tries where they always were; another arm's beside them
    FLAGS=(
        [ramp-cubic]="--prune-ramp cubic"
        [window-half]="--prune-end-tokens $HALF_WINDOW"
        [allocation-proportional]="--prune-allocation proportional"
        [taylor-vector]="--saliency-taylor-form vector"
    )
    ORDER="ramp-cubic window-half allocation-proportional taylor-vector"
fi
[ $# -gt 0 ] && ORDER="$*"
for name in $ORDER; do
    [ -n "${FLAGS[$name]+set}" ] || { echo "error: no try named $name; choose from: ${!FLAGS[*]}" >&2; exit 1; }
done
for name in $ORDER; do
    dir="$TRIES/$name"
    mkdir -p "$dir"
    if [ -f "$dir/done" ]; then continue; fi
    base_pattern=$(printf '%s/' "$BASE" | sed 's/[][\.*^$|]/\\&/g')  # the arm's folder, literally
    sed -e "s|$base_pattern|$dir/|g" -e "s|^    --load \"\$LOAD\"|    ${FLAGS[$name]} --load \"\$LOAD\"|" \
        "$BASE/command.sh" > "$dir/command.sh"
    # never a try that would write into the arm's own folders or run without its flags
    if grep -qF -- "$BASE/" "$dir/command.sh" || ! grep -qF -- "$dir/ckpt" "$dir/command.sh" || \
            ! grep -qF -- "${FLAGS[$name]} --load" "$dir/command.sh"; then
        echo "error: could not rewrite $BASE/command.sh for try $name (its folders or the --load line differ from what this script expects); nothing was run" >&2
        exit 1
    fi
    echo "== try $name: ${FLAGS[$name]}"
    if [ -n "${DRY_RUN:-}" ]; then echo "   $dir/command.sh"; continue; fi
    bash "$dir/command.sh" > "$dir/log.txt" 2>&1 && touch "$dir/done" || echo "   failed: see $dir/log.txt"
done
[ -n "${DRY_RUN:-}" ] && exit 0
python3 - "$BASE" "$ARM" "$TRIES" <<'PY'
import json, os, sys
def last(path, key):
    rows = [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []
    rows = [r for r in rows if r.get(key) is not None]
    return rows[-1] if rows else None
base, arm, root = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"{'run':<26} {'test loss':>9}  kept heads / FFN / hidden, params")
tries = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, "command.sh")))
for name, folder in [(arm, base)] + [(n, os.path.join(root, n)) for n in tries]:
    ev = last(os.path.join(folder, "tb", "evals.jsonl"), "test_loss")
    pr = last(os.path.join(folder, "tb", "pruning_history.jsonl"), "params")
    if ev is None or pr is None:
        print(f"{name:<26} not finished"); continue
    print(f"{name:<26} {ev['test_loss']:>9.4f}  {pr['kept_heads']:.2f} / {pr['kept_ffn']:.2f} / {pr['kept_hidden']:.2f}, "
          f"{pr['params']:,} (iteration {ev['iteration']})")
PY
