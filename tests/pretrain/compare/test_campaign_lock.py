"""One campaign per --out (``hold_campaign_folder``): a second is refused while the first or a
run it started is alive, and a dead campaign's lock is taken over once its runs have exited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pretrain.compare.campaign import hold_campaign_folder, release_campaign_folder
from pretrain.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _killed_campaign(out: str, tmp_path) -> int:
    """A campaign process that takes the lock, starts a run that keeps going in the background (a
    trainer still saving its checkpoint), and dies without releasing anything, as on SIGKILL or
    SIGTERM; returns the pid of the run left behind."""
    pid_file = tmp_path / "run.pid"
    command = tmp_path / "command.sh"
    command.write_text(f"sleep 120 &\necho $! > {pid_file}\n")
    code = textwrap.dedent(f"""
        import os
        from pretrain.compare.campaign import hold_campaign_folder, run_local
        hold_campaign_folder({out!r}, "the first campaign")
        assert run_local({str(command)!r}, {str(tmp_path / 'log.txt')!r}) == 0
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
    return int(pid_file.read_text())


def test_a_run_left_by_a_killed_campaign_keeps_its_folder_until_it_ends(tmp_path):
    out = str(tmp_path / "cmp")
    orphan = _killed_campaign(out, tmp_path)
    try:
        with pytest.raises(ConfigError, match="a run it started is still going") as err:
            hold_campaign_folder(out, "the second campaign")
        assert "the first campaign" in str(err.value) and f"--out {out}" in str(err.value)
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.time() + 10
    while True:
        try:
            note = hold_campaign_folder(out, "the second campaign")
            break
        except ConfigError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert "took over the lock" in note
    release_campaign_folder(out)
    assert not os.path.exists(os.path.join(out, "run.lock"))


def test_a_live_campaign_refuses_a_second(tmp_path):
    out = str(tmp_path / "cmp")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pretrain.compare.campaign import hold_campaign_folder
        hold_campaign_folder({out!r}, "the first campaign")
        print("held", flush=True)
        time.sleep(120)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="in use by another campaign .*the first campaign.*Wait for it to end"):
            hold_campaign_folder(out, "the second campaign")
    finally:
        holder.kill()
        holder.wait()
