"""Read-only and full output disks (issue 31 item 10): the checkpoint tools on a full disk and
training on a read-only ``--save`` stop with one line naming the flag and the reason (training
before it builds anything), and leave nothing on the disk. Each disk is a small tmpfs mounted
in a private mount namespace (``unshare -m``), so nothing outlives the test."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.bad_inputs.harness import ROOT
from tests.dist_helper import subprocess_env


def _in_private_tmpfs(mounts: dict, commands: list[list[str]], setup: tuple[str, ...] = ()) -> str:
    """Run ``commands`` one after another with a tmpfs mounted on each folder of ``mounts``
    (folder -> mount options) and the ``setup`` shell lines run, then list those folders; returns
    everything printed."""
    script = [f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))} || exit 99"
              for folder, options in mounts.items()] + list(setup)
    for argv in commands:
        script.append(f"{shlex.join(map(str, argv))}; echo \"rc=$?\"")
    script += [f"echo left: $(ls -A {shlex.quote(str(folder))})" for folder in mounts]
    done = subprocess.run(["unshare", "-m", "sh", "-c", "\n".join(script)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 99 or shutil.which("unshare") is None:
        pytest.skip("cannot mount a tmpfs in a private namespace here (needs root)")
    return done.stdout + done.stderr


def _tool(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name), *args]


@pytest.mark.slow
def test_tools_on_a_full_disk_and_training_on_a_read_only_one(bad_input_fixtures, tmp_path):
    f = bad_input_fixtures
    hf = tmp_path / "hf"
    subprocess.run(_tool("convert_to_hf.py", "--load", f.checkpoint, "--save", str(hf)), cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True)
    full, read_only, data = tmp_path / "full", tmp_path / "read_only", tmp_path / "read_only_data"
    for folder in (full, read_only, data):
        folder.mkdir()
    train = [sys.executable, "-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", f.dataset,
             "--tokenizer-model", f.tokenizer, "--split", "98,2,0", "--micro-batch-size", "2",
             "--global-batch-size", "2", "--train-iters", "2", "--save", read_only / "run"]
    # a dataset on a read-only disk: its index cache (beside it by default) cannot be written
    copy = f"cp {shlex.quote(f.dataset)}.bin {shlex.quote(f.dataset)}.idx {shlex.quote(str(data))}/"
    out = _in_private_tmpfs({full: "size=64k", read_only: "size=64k,ro", data: "size=8m"}, [
        _tool("convert_to_hf.py", "--load", f.checkpoint, "--save", full / "hf"),
        _tool("convert_from_hf.py", "--load", hf, "--save", full / "imported"),
        _tool("convert_checkpoint.py", "--load", f.checkpoint, "--save", full / "ds", "--to", "deepspeed"),
        _tool("reshard_checkpoint.py", "--load", f.checkpoint, "--save", full / "small", "--shrink"),
        _tool("convert_to_gguf.py", "--load", f.checkpoint, "--save", full / "model.gguf", "--no-progress"),
        train,
        _tool("evaluate.py", "--load", f.checkpoint, "--data-path", data / os.path.basename(f.dataset),
              "--seq-length", "32", "--max-samples", "4")],
        setup=(copy, f"mount -o remount,ro {shlex.quote(str(data))}"))
    assert "Traceback" not in out, out[-4000:]
    disk_full = (rf"error: --save {re.escape(str(full))}/[\w.]+: cannot write it \(No space left on device\); "
                 "nothing was written")
    assert len(re.findall(disk_full, out)) == 5, out[-4000:]
    # before building the model: no iteration ran
    assert re.search(rf"error: --save {re.escape(str(read_only))}/run: cannot write in .* \(Read-only file "
                     r"system\)", out) and "rc=2" in out and "iteration " not in out, out[-4000:]
    assert re.search(r"error: the dataset index cache \(default: beside the first dataset; --data-cache-path sets "
                     rf"it\) {re.escape(str(data))}/.*: cannot write in .* \(Read-only file system\)", out), out[-4000:]
    assert out.count("rc=2") == 1 and out.count("rc=1") == 6, out[-4000:]
    assert re.search(r"^left: *\nleft: *\nleft: \S+\.bin \S+\.idx$", out, re.M), out[-4000:]
