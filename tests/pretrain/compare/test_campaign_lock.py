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


def _holding(folder: str, name: str) -> subprocess.Popen:
    """A live process holding ``folder``'s run lock, as a training run does."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pretrain.run import run_lock
        run_lock.acquire({folder!r}, "--save", {name!r})
        print("held", flush=True)
        time.sleep(120)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _campaign(tmp_path, execute):
    from pretrain.compare.arms import Context, Data
    from pretrain.compare.campaign import Campaign
    from pretrain.compare.recipes import get_recipe

    ctx = Context(out=str(tmp_path / "cmp"), data=Data(data_path=["d"], tokenizer_model="t", test_data_path=["e"]),
                  parent=str(tmp_path / "parent"), parent_vocab=1024)
    recipe = get_recipe("cpu-tiny-real")
    runs = ["parent", "A", "A-KD", "M", "M-CE", "M-OBS", "A-ii", "M-ii"]
    return Campaign(recipe, ctx, [0], runs, execute=execute), recipe, ctx


def test_a_run_another_process_trains_stops_the_campaign_before_it_is_started_again(tmp_path):
    """Where the campaign's lock does not reach the run (NFS, a run started by hand), the run's
    own lock is checked before starting it: started again it would be refused and recorded as
    failed, and the campaign would go on past it."""
    from pretrain.compare.arms import RunPlan

    started = []
    campaign, _, ctx = _campaign(tmp_path, lambda command, log: started.append(command) or 1)
    plan = RunPlan(name="A", seed=0, folder=ctx.run_dir("A", 0), flags=["--save", ctx.run_dir("A", 0) + "/ckpt"],
                   train_tokens=4096, lr=1e-3)
    holder = _holding(os.path.join(plan.folder, "ckpt"), "a run started by hand")
    try:
        with pytest.raises(ConfigError, match="A seed 0 is being trained by another process .*a run started by hand"):
            campaign.run_one(plan, score=False)
    finally:
        holder.kill()
        holder.wait()
    assert not started and not os.path.exists(os.path.join(plan.folder, "result.json"))
    assert campaign.run_one(plan, score=False)["status"] == "failed" and len(started) == 1  # its lock is free now


def test_check_free_reads_a_lock_and_takes_nothing(tmp_path):
    from pretrain.run import run_lock

    folder = str(tmp_path / "ckpt")
    run_lock.check_free(folder)  # no folder: free
    holder = _holding(folder, "the trainer")
    try:
        with pytest.raises(run_lock.FolderInUseError) as err:
            run_lock.check_free(folder)
        assert "the trainer" in err.value.owner and not err.value.orphaned
    finally:
        holder.kill()
        holder.wait()
    before = open(os.path.join(folder, "run.lock")).read()
    run_lock.check_free(folder)  # the holder died: free, and its lock file is left as it was
    assert open(os.path.join(folder, "run.lock")).read() == before


def test_matched_flops_runs_wait_for_every_pruned_arm_of_their_seed(tmp_path):
    """The budget is the most expensive pruned arm's: an -ii run planned while one of them has
    not finished could get too small a budget, and its result would stand on a resume."""
    import json

    campaign, _, ctx = _campaign(tmp_path, lambda command, log: pytest.fail("nothing may start"))
    ok = {"status": "ok", "flops": {"actual": 10**12}, "tokens_trained": 4096, "flops_per_token_last_step": 10**6}
    for run in ("A", "A-KD", "M", "M-CE"):
        ctx.results[(run, 0)] = dict(ok)
    ctx.results[("M-OBS", 0)] = {"status": "failed", "reason": "exit code 1"}
    assert campaign.run_if_possible("A-ii", 0) is None
    result = json.load(open(os.path.join(ctx.run_dir("A-ii", 0), "result.json")))
    assert result["status"] == "missing" and "waits for M-OBS (seed 0)" in result["reason"]


def test_ctrl_c_lets_the_run_save_before_the_campaign_stops(tmp_path):
    """Ctrl-C reaches the campaign and its run together; the run saves a checkpoint on SIGINT,
    which takes longer than the 0.25 s subprocess.run would give it before killing it."""
    saved = tmp_path / "saved"
    command = tmp_path / "command.sh"
    ready = tmp_path / "ready"
    command.write_text(f"trap 'sleep 1; echo yes > {saved}; kill %1; exit 130' INT\nsleep 60 &\n"
                       f"touch {ready}\nwait\n")
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal
        # Ctrl-C as at a terminal, also where this test runs in the background (SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from pretrain.compare.campaign import run_local
        run_local({str(command)!r}, {str(tmp_path / 'log.txt')!r})
    """)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not ready.exists():  # bash has its trap and waits in its trap-able `wait`
        assert time.time() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGINT)
    out, err = driver.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and "the run saves a checkpoint and stops" in out + err
    assert saved.read_text().strip() == "yes"


def test_without_flock_a_lock_from_another_host_is_obeyed_and_the_message_says_how_to_remove_it(
        tmp_path, monkeypatch):
    """Lustre without -o flock: the recorded holder decides; a crashed host's lock stays until
    someone deletes it, and the campaign's message keeps that advice."""
    import json

    from pretrain.run import run_lock

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": "another-node", "pid": 4242, "started": "then"}))
    monkeypatch.setattr(run_lock, "_flock", lambda fd: None)
    with pytest.raises(ConfigError, match=rf"another-node, pid 4242.*delete {out}/run.lock"):
        hold_campaign_folder(str(out), "the second campaign")
    with pytest.raises(run_lock.FolderInUseError) as err:
        run_lock.check_free(str(out))
    assert err.value.hint == f"if that run is gone (another host's crash), delete {out}/run.lock"
    assert not err.value.orphaned
