# shellcheck shell=bash
# The body of slurm/pretrain_*.sbatch (sourced by them after they set their recipe's defaults).
#
# Submitted with sbatch: checks the inputs, launches the ranks, and on the time-limit/preemption
# signal (--signal=B:USR1@...) has every rank save a checkpoint and exit, then requeues the job;
# the requeued job resumes from the newest checkpoint under $SAVE (pruning state included). Safe
# to resubmit: --load $SAVE always picks up where the last run stopped.
# Run with bash instead (bash slurm/pretrain_1b.sbatch [sbatch options]): checks the inputs before
# asking for any GPU, then submits itself with those options (DRY_RUN=1: instead validates the
# recipe's flags with python -m pretrain --dry-run and prints the plan; needs a world of 1, TP=PP=1).
#
# Every setting is a variable with a default; override from the environment or with
# sbatch --export=ALL,NAME=value,...
#   REPO             repository root (default: the submit directory)
#   PYTHON           interpreter with the project installed ($REPO/.venv/bin/python)
#   DATA_PATH        "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..." (indexed datasets from preprocess_data.py)
#   TOKENIZER_TYPE / TOKENIZER_MODEL  (TOKENIZER_MODEL set empty: the --load checkpoint's own tokenizer)
#   INIT_CHECKPOINT  a checkpoint to start from when $SAVE has none (convert_from_hf.py output);
#                    empty: random initialisation
#   SAVE             checkpoints (also resumed from); on a filesystem every node mounts (checked at
#                    start). TENSORBOARD_DIR (default $SAVE/tensorboard; rank 0 alone writes there)
#   DATA_CACHE_PATH  the dataset index cache (--data-cache-path; empty: beside the first dataset). May be
#                    node-local (e.g. /tmp/$USER/index-cache, one path on every node): each node builds its own
#   TP, PP           tensor / pipeline parallel sizes; the rest of the ranks is data parallel
#   MICRO_BATCH, GLOBAL_BATCH, SEQ_LENGTH, TRAIN_TOKENS, LR, MIN_LR, WARMUP_ITERS
#   PRECISION        --bf16 (default on GPUs) or empty
#   MODEL_ARGS       the model (default: the recipe's preset); PRUNE_ARGS the pruning recipe
#   SAVE_INTERVAL, LOG_INTERVAL, EVAL_INTERVAL; EXTRA_ARGS anything else for python -m pretrain
#   KD_TEACHER       a checkpoint to distil from (--kd-teacher; empty: no distillation), with
#                    KD_WEIGHT (default 1: KL only), KD_TEMPERATURE (1), KD_UNTIL_TOKENS (empty: all run)
#   LAUNCHER         srun (one task per GPU, default) or torchrun (srun starts one torchrun per node)
#   ENGINE           megatron (default) or deepspeed; with deepspeed: ZERO_STAGE (1, 2 or 3; default 1),
#                    OFFLOAD_OPTIMIZER (cpu or empty), DEEPSPEED_CONFIG (a DeepSpeed JSON, or empty); PP must be 1
set -euo pipefail

fail() { echo "error: $*" >&2; exit 1; }

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DATA_PATH=${DATA_PATH:-data/corpus_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL-models/SmolLM-1.7B}
INIT_CHECKPOINT=${INIT_CHECKPOINT:-}
SAVE=${SAVE:-checkpoints/$RECIPE}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$SAVE/tensorboard}
DATA_CACHE_PATH=${DATA_CACHE_PATH:-}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TRAIN_TOKENS=${TRAIN_TOKENS:-5e10}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
LAUNCHER=${LAUNCHER:-srun}
EXTRA_ARGS=${EXTRA_ARGS:-}
KD_TEACHER=${KD_TEACHER:-}
KD_WEIGHT=${KD_WEIGHT:-1}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
KD_UNTIL_TOKENS=${KD_UNTIL_TOKENS:-}
ENGINE=${ENGINE:-megatron}
ZERO_STAGE=${ZERO_STAGE:-}
OFFLOAD_OPTIMIZER=${OFFLOAD_OPTIMIZER:-}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-}

# numbers are checked before any arithmetic uses them (bash would read TP=abc as 0)
for name in TP PP MICRO_BATCH GLOBAL_BATCH SEQ_LENGTH SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL WARMUP_ITERS; do
    value=${!name}
    [[ "$value" =~ ^[0-9]+$ ]] || fail "$name=$value: must be a whole number"
    case $name in EVAL_INTERVAL|WARMUP_ITERS) ;; *) [ "$value" -gt 0 ] || fail "$name=$value: must be at least 1";; esac
done

NNODES=${SLURM_NNODES:-${NNODES:-1}}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
if [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then
    RANKS_PER_NODE=$GPUS_PER_NODE
    PRECISION=${PRECISION---bf16}
else  # CPU (the local test cluster): one rank per task
    RANKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${RANKS_PER_NODE:-1}}
    PRECISION=${PRECISION:-}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi
WORLD=$((NNODES * RANKS_PER_NODE))

check_inputs() {
    [ -x "$PYTHON" ] || fail "PYTHON=$PYTHON is not an interpreter (run 'make setup' in $REPO, or set PYTHON)"
    local item
    for item in $DATA_PATH; do
        if [[ "$item" =~ ^[0-9.eE+-]+$ ]]; then continue; fi  # a blend weight
        [ -f "$item.bin" ] && [ -f "$item.idx" ] \
            || fail "DATA_PATH: $item.bin / $item.idx not found (make them with tools/preprocess_data.py)"
    done
    if [ "$TOKENIZER_TYPE" != "NullTokenizer" ] && [ -n "$TOKENIZER_MODEL" ]; then
        [ -e "$TOKENIZER_MODEL" ] || fail "TOKENIZER_MODEL=$TOKENIZER_MODEL does not exist"
    fi
    if [ -n "$INIT_CHECKPOINT" ] && [ ! -d "$INIT_CHECKPOINT" ]; then
        fail "INIT_CHECKPOINT=$INIT_CHECKPOINT is not a folder (make it with tools/convert_from_hf.py)"
    fi
    [ $((WORLD % (TP * PP))) -eq 0 ] \
        || fail "TP=$TP x PP=$PP does not divide the $WORLD ranks ($NNODES nodes x $RANKS_PER_NODE)"
    [ "$LAUNCHER" = srun ] || [ "$LAUNCHER" = torchrun ] || fail "LAUNCHER=$LAUNCHER: srun or torchrun"
    [ -z "$KD_TEACHER" ] || [ -d "$KD_TEACHER" ] || fail "KD_TEACHER=$KD_TEACHER is not a checkpoint folder"
    check_engine
}

check_engine() {
    case $ENGINE in
        megatron)
            [ -z "$ZERO_STAGE$OFFLOAD_OPTIMIZER$DEEPSPEED_CONFIG" ] \
                || fail "ZERO_STAGE, OFFLOAD_OPTIMIZER and DEEPSPEED_CONFIG need ENGINE=deepspeed";;
        deepspeed)
            [ -z "$ZERO_STAGE" ] || [[ "$ZERO_STAGE" =~ ^[123]$ ]] || fail "ZERO_STAGE=$ZERO_STAGE: 1, 2 or 3"
            [ -z "$OFFLOAD_OPTIMIZER" ] || [ "$OFFLOAD_OPTIMIZER" = cpu ] || [ "$OFFLOAD_OPTIMIZER" = none ] \
                || fail "OFFLOAD_OPTIMIZER=$OFFLOAD_OPTIMIZER: cpu or none"
            [ -z "$DEEPSPEED_CONFIG" ] || [ -f "$DEEPSPEED_CONFIG" ] \
                || fail "DEEPSPEED_CONFIG=$DEEPSPEED_CONFIG is not a file"
            [ "$PP" -eq 1 ] || fail "ENGINE=deepspeed needs PP=1 (ZERO_STAGE=3 shards the parameters instead)";;
        *) fail "ENGINE=$ENGINE: megatron or deepspeed";;
    esac
}

check_inputs
# resume from $SAVE when it holds a checkpoint, else start from INIT_CHECKPOINT (or from scratch)
LOAD=$SAVE
if [ -n "$INIT_CHECKPOINT" ] && [ ! -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
    LOAD=$INIT_CHECKPOINT
fi

TOKENIZER_ARGS=()  # none: the checkpoint's recorded tokenizer
if [ -n "$TOKENIZER_MODEL" ]; then
    TOKENIZER_ARGS=(--tokenizer-model "$TOKENIZER_MODEL")
    [ -z "$TOKENIZER_TYPE" ] || TOKENIZER_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE")
fi

KD_ARGS=()  # distillation from a frozen teacher (pretrain/distill.py)
if [ -n "$KD_TEACHER" ]; then
    KD_ARGS=(--kd-teacher "$KD_TEACHER" --kd-weight "$KD_WEIGHT" --kd-temperature "$KD_TEMPERATURE")
    [ -z "$KD_UNTIL_TOKENS" ] || KD_ARGS+=(--kd-until-tokens "$KD_UNTIL_TOKENS")
fi
# shellcheck disable=SC2206
DATA_ARGS=(--data-path $DATA_PATH)  # unquoted: a blend is several words
[ -z "$DATA_CACHE_PATH" ] || DATA_ARGS+=(--data-cache-path "$DATA_CACHE_PATH")
ENGINE_ARGS=(--engine "$ENGINE")
[ -z "$ZERO_STAGE" ] || ENGINE_ARGS+=(--zero-stage "$ZERO_STAGE")
[ -z "$OFFLOAD_OPTIMIZER" ] || ENGINE_ARGS+=(--offload-optimizer "$OFFLOAD_OPTIMIZER")
[ -z "$DEEPSPEED_CONFIG" ] || ENGINE_ARGS+=(--deepspeed-config "$DEEPSPEED_CONFIG")

# shellcheck disable=SC2206
ARGS=($MODEL_ARGS $PRUNE_ARGS "${ENGINE_ARGS[@]}"
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
      --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH"
      --train-tokens "$TRAIN_TOKENS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS"
      "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}"
      --save "$SAVE" --load "$LOAD" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$TENSORBOARD_DIR"
      --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" $PRECISION "${KD_ARGS[@]}" $EXTRA_ARGS)

if [ -z "${SLURM_JOB_ID:-}" ]; then  # run with bash: checked above; submit this script
    if [ -n "${DRY_RUN:-}" ]; then  # or only validate the recipe's flags (one process, no model)
        exec "$PYTHON" -m pretrain "${ARGS[@]}" --dry-run
    fi
    echo "inputs ok; submitting $SCRIPT $*"
    exec sbatch "$@" "$SCRIPT"
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $RANKS_PER_NODE ranks," \
     "TP $TP PP $PP, master $MASTER_ADDR:$MASTER_PORT, load $LOAD, save $SAVE"

if [ "$LAUNCHER" = srun ]; then
    CMD=(srun --kill-on-bad-exit=1 --ntasks-per-node="$RANKS_PER_NODE" --ntasks="$WORLD"
         "$PYTHON" -m pretrain --launcher slurm "${ARGS[@]}")
else
    CMD=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks="$NNODES"
         "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$RANKS_PER_NODE"
         --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
         -m pretrain --launcher torchrun "${ARGS[@]}")
fi

# The signal reaches this shell only (B:); pass it to the ranks, which save and exit at the end of
# their current step. bash runs a trap only between commands, hence the background job + wait.
SIGNALLED=0
forward() {
    SIGNALLED=1
    echo "[$(date -Is)] $1: asking the ranks to checkpoint and exit"
    if [ "$LAUNCHER" = srun ]; then
        scancel --signal=USR1 "$SLURM_JOB_ID"  # every job step (the ranks), not this shell
    else  # torchrun would die on USR1: signal its workers (started as python -u -m pretrain)
        srun --overlap --ntasks-per-node=1 --ntasks="$NNODES" \
            bash -c "$(declare -f signal_job_workers); signal_job_workers $SLURM_JOB_ID" || true
    fi
}
# This job's torchrun workers on this node, and no one else's: a node shared with other jobs (or
# other users' runs) has more `python -u -m pretrain` processes, so the command line alone is not
# enough; the job id in each process's environment (inherited from srun) is.
signal_job_workers() {
    local pid
    for pid in $(pgrep -f -- "-u -m pretrain "); do
        if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$1"; then
            kill -USR1 "$pid" 2>/dev/null || true
        fi
    done
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${CMD[@]}" &
TRAIN_PID=$!
STATUS=0
while true; do
    wait "$TRAIN_PID" && STATUS=0 || STATUS=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break  # wait was interrupted by a trap: keep waiting
done
echo "[$(date -Is)] training exited with status $STATUS"
if [ "$SIGNALLED" = 1 ] && [ "$STATUS" = 0 ]; then
    echo "[$(date -Is)] checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
elif [ "$STATUS" = 0 ] && declare -F after_training >/dev/null; then
    after_training || STATUS=$?  # the recipe's last steps (evaluation, export), once training is done
fi
exit "$STATUS"
