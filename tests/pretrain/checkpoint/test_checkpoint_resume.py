"""Resume is exact; checkpoints reshard across TP/PP; broken checkpoints are refused."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain.checkpoint import CheckpointError, find_checkpoint, verify_checkpoint
from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, full_params, losses_of

ITERS = 6


def _resume_worker(data: dict, root: str) -> dict:
    from pretrain.run.segments import run

    straight = run(debug_config(data, tp=2, iters=ITERS, save=f"{root}/straight"))
    first = run(debug_config(data, tp=2, iters=ITERS, save=f"{root}/broken", exit_interval=3))
    resumed = run(debug_config(data, tp=2, iters=ITERS, save=f"{root}/broken", load=f"{root}/broken"))
    # the same checkpoint under another layout: TP=1 x PP=2
    resharded = run(debug_config(data, tp=1, pp=2, iters=ITERS, load=f"{root}/broken/iter_0000003"))
    return {
        "straight": losses_of(straight), "first": losses_of(first), "resumed": losses_of(resumed),
        "resumed_iteration": resumed["iteration"], "first_stop": first["stop_reason"],
        "resharded": losses_of(resharded),
        "straight_params": full_params(straight), "resumed_params": full_params(resumed),
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_exact_and_reshards(tiny_dataset, tmp_path):
    res = run_distributed(_resume_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["first"] == res["straight"][:3]
    assert "exit-interval" in res["first_stop"]
    assert res["resumed_iteration"] == ITERS
    # bit-identical losses and weights after stop + resume
    assert res["resumed"] == res["straight"][3:]
    assert res["straight_params"].keys() == res["resumed_params"].keys()
    for key, shards in res["straight_params"].items():
        for (off_a, a), (off_b, b) in zip(shards, res["resumed_params"][key]):
            assert off_a == off_b and torch.equal(a, b), key
    # TP=2 checkpoint loaded as TP=1 x PP=2 continues the same curve (float tolerance)
    for x, y in zip(res["resharded"], res["straight"][3:]):
        assert math.isclose(x, y, rel_tol=1e-4), (res["resharded"], res["straight"])
    # layout of the saved checkpoint
    ckpt = tmp_path / "broken" / "iter_0000006"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["iteration"] == ITERS
    assert (tmp_path / "broken" / "latest_checkpointed_iteration.txt").read_text() == "6"


def _make_fake_checkpoint(root, iteration, files=None):
    folder = root / f"iter_{iteration:07d}"
    (folder / "model_optim").mkdir(parents=True)
    files = files or {"model_optim/a.distcp": b"x" * 100, "trainer_state.pt": b"y" * 10}
    for rel, content in files.items():
        (folder / rel).write_bytes(content)
    manifest = {"iteration": iteration, "files": {k: len(v) for k, v in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def test_truncated_or_missing_files_fall_back_to_previous(tmp_path, capsys):
    older = _make_fake_checkpoint(tmp_path, 10)
    newer = _make_fake_checkpoint(tmp_path, 20)
    assert find_checkpoint(str(tmp_path)) == str(newer)

    (newer / "model_optim" / "a.distcp").write_bytes(b"x" * 50)  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(str(newer))
    assert find_checkpoint(str(tmp_path)) == str(older)
    assert "skipping invalid checkpoint" in capsys.readouterr().out

    (newer / "model_optim" / "a.distcp").unlink()  # missing
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(str(newer))
    assert find_checkpoint(str(tmp_path)) == str(older)


def test_half_written_checkpoint_is_never_valid(tmp_path):
    good = _make_fake_checkpoint(tmp_path, 10)
    # a save that crashed before its manifest and rename: only the .tmp folder exists
    (tmp_path / "iter_0000020.tmp" / "model_optim").mkdir(parents=True)
    assert find_checkpoint(str(tmp_path)) == str(good)
    # a folder renamed without a manifest (e.g. copied by hand, partially)
    partial = tmp_path / "iter_0000030"
    partial.mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("30")
    with pytest.raises(CheckpointError, match="did not complete"):
        verify_checkpoint(str(partial))
    assert find_checkpoint(str(tmp_path)) == str(good)
    assert find_checkpoint(str(tmp_path / "nothing-here")) is None


@pytest.mark.distributed
@pytest.mark.slow
def test_signal_saves_and_exits_cleanly(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pretrain", "--model", "debug", "--seq-length", "64",
           "--tensor-model-parallel-size", "2", "--data-path", tiny_dataset["prefix"],
           "--tokenizer-model", tiny_dataset["tokenizer"], "--global-batch-size", "8",
           "--micro-batch-size", "2", "--train-iters", "100000", "--log-interval", "1",
           "--save", str(save)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iteration") and int(line.split()[1].split("/")[0]) >= 3:
            # a preemption notice reaching only one rank (e.g. Slurm's USR1): every rank must
            # agree to stop at the same step, save together and exit 0 (so torchrun exits 0)
            import psutil

            workers = psutil.Process(proc.pid).children(recursive=True)
            assert len(workers) == 2, workers
            os.kill(workers[0].pid, signal.SIGUSR1)
            break
        assert time.time() < deadline, "".join(lines[-30:])
    out, _ = proc.communicate(timeout=240)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "signal received" in text
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 3
    verify_checkpoint(str(save / f"iter_{iteration:07d}"))
