#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: OpenMPI (for mpi4py), a .venv with torch installed first
# (the CPU build pinned in requirements.txt, so nothing pulls a CUDA build), then the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! command -v mpicc >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing OpenMPI (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            libopenmpi-dev openmpi-bin >/dev/null
    else
        echo "[setup] WARNING: no MPI found and cannot apt-get install it; mpi4py may fail to build" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.setup-stamp"
want="$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] environment up to date"
    exit 0
fi
$PIP install -q --upgrade pip
torch_pin=$(grep -E '^torch==' requirements.txt)
echo "[setup] installing $torch_pin first"
$PIP install -q "$torch_pin"
echo "[setup] installing requirements (DS_BUILD_OPS=0: no DeepSpeed kernels are compiled)"
DS_BUILD_OPS=0 $PIP install -q -r requirements.txt
echo "[setup] installing requirements-nodeps.txt without their dependencies (they would move our pins)"
$PIP install -q --no-deps -r requirements-nodeps.txt
$PIP install -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
