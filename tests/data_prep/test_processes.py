"""Helper processes die with the process that started them (issue 31: nothing of a killed run
keeps running), forked ones included: megatron-core's checkpoint writers are forked per save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORKS = """
import os, time
from data_prep.processes import forked_children_die_with_us
forked_children_die_with_us()
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone but for its reaping
    except OSError:
        return False


def test_a_forked_child_dies_with_its_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", FORKS], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the forked child outlived its parent, killed with SIGKILL"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
