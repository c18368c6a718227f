"""Advice that works (issue 31 item 12): each message about a DeepSpeed checkpoint in the wrong
place names a command, and the test runs that command and then what the user wanted to do.

One DP=2 ZeRO-1 checkpoint; then, in one process each: a DP=1 resume (advised ``--to deepspeed``,
which re-partitions it), a distillation teacher under ``--engine deepspeed`` and an evaluation
(both advised ``--to megatron``)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.dist_helper import _ROOT, subprocess_env

pytestmark = pytest.mark.slow


def _run(argv: list[str], launcher: list[str] | None = None) -> tuple[int, str]:
    done = subprocess.run([*(launcher or [sys.executable]), *argv], cwd=_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _advised(out: str, new: str) -> list[str]:
    """The command the error message advises, with NEW filled in (as a user would type it)."""
    found = re.search(r"python (tools/convert_checkpoint\.py --load \S+ --save NEW --to \w+)", out)
    assert found, f"no command advised:\n{out[-3000:]}"
    return found.group(1).replace("NEW", new).split()


def _train(tiny_dataset: dict, *extra: str) -> list[str]:
    return ["-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", tiny_dataset["prefix"],
            "--tokenizer-model", tiny_dataset["tokenizer"], "--split", "98,2,0", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--engine", "deepspeed", *extra]


def test_deepspeed_checkpoint_advice_is_followed_to_success(tiny_dataset, tmp_path):
    ds = str(tmp_path / "ds_dp2")
    rc, out = _run(_train(tiny_dataset, "--train-iters", "1", "--zero-stage", "1", "--save", ds),
                   launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"])
    assert rc == 0, out[-3000:]

    # resumed on DP=1: the advised --to deepspeed re-partitions it, and the resume then runs
    # (one more iteration than the checkpoint's schedule: said so, as a longer resume must)
    rc, out = _run(_train(tiny_dataset, "--train-iters", "2", "--load", ds, "--use-checkpoint-opt_param-scheduler"))
    assert rc != 0 and "Traceback" not in out and "cannot load under world 1" in out, out[-3000:]
    repartitioned = str(tmp_path / "repartitioned")
    rc, out = _run(_advised(out, repartitioned))
    assert rc == 0, out[-3000:]
    rc, out = _run(_train(tiny_dataset, "--train-iters", "2", "--load", repartitioned,
                          "--use-checkpoint-opt_param-scheduler"))
    assert rc == 0 and re.search(r"iteration +2/2", out), out[-3000:]

    # as a teacher under --engine deepspeed: refused before any process group, advised --to megatron
    rc, out = _run(_train(tiny_dataset, "--train-iters", "1", "--kd-teacher", ds))
    assert rc != 0 and "Traceback" not in out and "this run uses --engine megatron" not in out, out[-3000:]
    assert "--kd-teacher" in out and "engine:" not in out, out[-3000:]  # before the student's engine
    teacher = str(tmp_path / "teacher")
    rc, out = _run(_advised(out, teacher))
    assert rc == 0, out[-3000:]
    rc, out = _run(_train(tiny_dataset, "--train-iters", "1", "--kd-teacher", teacher))
    assert rc == 0 and re.search(r"iteration +1/1", out), out[-3000:]

    # evaluation has no --engine: the advice is the same conversion, and its output evaluates
    evaluate = [str(_ROOT) + "/tools/evaluate.py", "--data-path", tiny_dataset["prefix"], "--seq-length", "32",
                "--max-samples", "2"]
    rc, out = _run([*evaluate, "--load", ds])
    assert rc != 0 and "Traceback" not in out and _advised(out, teacher)[-1] == "megatron", out[-3000:]
    rc, out = _run([*evaluate, "--load", teacher])
    assert rc == 0 and "perplexity" in out, out[-3000:]
