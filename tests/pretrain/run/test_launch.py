"""Launch paths a user hits first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.dist_helper import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
def test_torchrun_with_one_process_starts():
    """`torchrun --nproc-per-node 1` (a single-GPU user's first command) used to wait in
    init_process_group until the 30-minute timeout: its agent store had no server."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "pretrain",
           "--model", "debug", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "iteration       2/2" in done.stdout


def _start_training(tmp_path, *extra: str) -> subprocess.Popen:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "pretrain", "--model", "debug", "--mock-data", "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "100000",
           "--log-interval", "1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after_first_step(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iteration"):
            proc.send_signal(signum)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    import signal

    rc, out = _signal_after_first_step(_start_training(tmp_path, "--save", str(tmp_path / "ckpt")), signal.SIGINT)
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    assert "interrupted: stopping after this step and saving a checkpoint" in out
    assert os.path.isfile(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"), out[-2000:]


@pytest.mark.slow
def test_sigterm_without_save_says_nothing_is_saved(tmp_path):
    import signal

    rc, out = _signal_after_first_step(_start_training(tmp_path), signal.SIGTERM)
    assert rc == 0, out[-3000:]
    assert "nothing is saved (no --save)" in out and "saving a checkpoint" not in out, out[-2000:]
