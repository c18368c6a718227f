#!/usr/bin/env bash
# One prepared command for a single GPU (<= 8 minutes on one H200, no network):
# environment report, masked == shrunk logits under the GPU spec, bf16 masked optimizer state,
# tokens/s and MFU plain vs masked + saliency (smollm-1.7b- and 1B-shaped), in-run shrink speed-up.
# Prints one table and writes it as JSON ($GPU_CHECK_OUT, default gpu_check.json).
#
# The lent GPU machine has Python 3.12 + torch 2.11 (CUDA 13), transformers and sentencepiece, but
# no megatron-core, Transformer Engine or apex, and no network. Bring megatron-core as cp312 wheels
# downloaded HERE (<= 64 MiB travel with the working tree; TE's wheels are larger, so the check
# runs the local spec there unless TE is already installed, and the table says which spec ran):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl 'megatron-core>=0.16.1,<0.20' einops
#   (megatron_patches/versions.py holds the supported range; name any other missing need likewise)
# Then on the GPU machine (the device tool: carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site && bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}  # exact masked == shrunk comparison
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)' 2>/dev/null; then
    echo "error: bench/gpu_check.sh needs a CUDA GPU; torch.cuda.is_available() is False here (or torch does not import). Nothing was measured." >&2
    exit 2
fi
if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
    echo "error: megatron-core does not import: bring it as cp312 wheels (see the top of bench/gpu_check.sh)." >&2
    exit 2
fi
"$PY" -m megatron_patches.private_api || echo "(some private megatron-core names moved: listed above)"
exec "$PY" bench/gpu_check.py --out "${GPU_CHECK_OUT:-gpu_check.json}" "$@"
