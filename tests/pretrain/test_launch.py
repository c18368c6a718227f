"""Launch paths a user hits first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_torchrun_with_one_process_starts():
    """`torchrun --nproc-per-node 1` (a single-GPU user's first command) used to wait in
    init_process_group until the 30-minute timeout: its agent store had no server."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "pretrain",
           "--model", "debug", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "iteration       2/2" in done.stdout
