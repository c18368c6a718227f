"""One run per output folder (issue 31, item 1): a second run on a --save in use is refused with
the other run's host and pid and touches nothing; a dead run's lock is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from pretrain.run import run_lock
from tests.dist_helper import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HOLDER = ("import sys, time; from pretrain.run import run_lock; run_lock.acquire(sys.argv[1], '--save', 'holder'); "
          "print('held', flush=True); time.sleep(600)")


def _start_holder(folder: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    save = tmp_path / "ckpt"
    holder = _start_holder(str(save))
    (save / "iter_0000002").mkdir()
    (save / "iter_0000002" / "weights").write_text("the first run's")
    try:
        with pytest.raises(run_lock.FolderInUseError) as err:
            run_lock.acquire(str(save), "--save")
        assert f"pid {holder.pid}" in str(err.value) and socket.gethostname() in str(err.value)
        assert (save / "iter_0000002" / "weights").read_text() == "the first run's"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    note = run_lock.acquire(str(save), "--save")  # the holder died without cleaning up: stale
    try:
        assert "took over" in note and f"pid {holder.pid}" in note
        assert run_lock.acquire(str(save), "--save") == ""  # idempotent in one process
    finally:
        run_lock.release(str(save))
    assert not (save / run_lock.LOCK_NAME).exists()  # a clean end leaves no lock file


def test_training_on_a_folder_in_use_stops_before_writing(tmp_path):
    save = tmp_path / "ckpt"
    holder = _start_holder(str(save))
    try:
        proc = subprocess.run([sys.executable, "-m", "pretrain", "--model", "debug", "--mock-data", "--train-iters",
                               "1", "--save", str(save), "--dry-run"], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--save {save} is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(save)) == [run_lock.LOCK_NAME]
