"""Checkpoints written by earlier code (``tests/fixtures/old_checkpoints``, made by
``tests/fixtures/make_old_checkpoints.py``) are read by the code in the tree, and what it writes
keeps their format (issue 30: "the checkpoint format byte for byte"):

- the megatron (TP=2, masks in progress) and DeepSpeed ZeRO-3 (DP=2) ones resume for two steps
  with the losses the old code's resume had, and save checkpoints with the same file names
  (iteration numbers aside), trainer-state key paths and DCP keys as the old ones;
- the DeepSpeed one converts to the megatron engine into the format the old conversion wrote;
- the megatron one reshards (shrink, TP 2 -> 1) into a model whose held-out loss is the masked
  checkpoint's, as the old code evaluated it;
- the per-layer shrunk, the imported and the converted ones evaluate to the losses recorded when
  they were written (a silent change in how weights are read shows here); the per-layer one
  exports to HF, transformers computes the old export's loss, and its re-import evaluates to the
  checkpoint's loss.

Everything goes through the command lines (``python -m pretrain``, ``tools/*.py``), run in a copy
of the fixtures (their recorded paths are relative to it), so the test outlives moves inside the
package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.fixtures.fixture_checks import (RESUMED_ITERATIONS, describe, differences, hf_loss, resume_command,
                                           train_losses)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "old_checkpoints")
with open(os.path.join(FIXTURES, "FORMAT.json")) as _f:
    RECORDED = json.load(_f)
KINDS = RECORDED["kinds"]
EVAL = RECORDED["eval"]
LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    """A copy of the fixtures: nothing is written into the repository."""
    root = str(tmp_path_factory.mktemp("old") / "old_checkpoints")
    shutil.copytree(FIXTURES, root)
    return root


def _run(args: list[str], cwd: str) -> str:
    # this checkout's code, not an installed copy's
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _tool(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", name), *args]


def _evaluate(work: str, load: str) -> float:
    out = os.path.join(work, f"eval_{os.path.basename(load)}.json")
    _run(_tool("evaluate.py", "--load", load, "--data-path", EVAL["data_path"], "--tokenizer-model",
               EVAL["tokenizer_model"], "--max-samples", str(EVAL["max_samples"]), "--data-cache-path",
               os.path.join(work, "cache"), "--output", out), work)
    with open(out) as f:
        return json.load(f)["loss"]


def _flag_added_since(part: str, name: str) -> bool:
    """A config field added after the fixtures were made (a new flag, e.g. --eval-tasks) is the one
    addition a checkpoint's format takes: the trainer state records every flag, and a reader drops
    or defaults what it does not know (``PretrainConfig.from_dict``). Nothing else may be new."""
    import dataclasses

    from pretrain.config import PretrainConfig

    parts = name.split("/")
    if part != "trainer_state_keys" or len(parts) != 3 or parts[0] != "config":
        return False
    section = {f.name: f for f in dataclasses.fields(PretrainConfig)}.get(parts[1])
    if section is None or section.default_factory is dataclasses.MISSING:  # the model's: none so far
        return False
    return parts[2] in {f.name for f in dataclasses.fields(section.default_factory())}


def _assert_format(kind: str, folder: str) -> None:
    diff = differences(KINDS[kind]["format"], describe(folder), _flag_added_since)
    assert not diff, f"{folder} is not in the format of the old {kind} checkpoint:\n" + "\n".join(diff)


def _assert_loss(actual: float, expected: float, what: str) -> None:
    assert abs(actual - expected) <= LOSS_TOLERANCE * abs(expected), (what, actual, expected)


def test_fixtures_are_as_recorded():
    """The stored files are those FORMAT.json describes (a fixture edited by hand, or a
    FORMAT.json not remade with them, shows here first)."""
    for kind in KINDS:
        _assert_format(kind, os.path.join(FIXTURES, kind))


@pytest.mark.parametrize("kind", ["megatron", "deepspeed_zero3"])
def test_resume_continues_and_writes_the_old_format(work, kind):
    """Two more steps from the old checkpoint, under the command that wrote it: the losses the old
    code's resume had (weights, optimizer state, LR schedule, data position read alike), and
    checkpoints in the old format."""
    folder = os.path.join(work, f"resumed_{kind}")
    tensorboard = os.path.join(work, f"tb_{kind}")
    _run(resume_command(KINDS[kind]["command"], kind, folder, tensorboard, os.path.join(work, "cache")), work)
    for actual, expected in zip(train_losses(tensorboard), KINDS[kind]["resumed_losses"], strict=True):
        _assert_loss(actual, expected, f"{kind}, resumed")
    # resumed at 4: a run from scratch would have saved iterations 1 to 4 as well
    expected_files = [f"iter_{4 + i:07d}" for i in range(1, RESUMED_ITERATIONS + 1)]
    assert sorted(os.listdir(folder)) == [*expected_files, "latest_checkpointed_iteration.txt"], os.listdir(folder)
    _assert_format(kind, folder)


def test_engine_conversion_writes_the_old_format(work):
    # a relative --load: the DeepSpeed reader's links to the ZeRO files once dangled from a temporary folder
    _run(_tool("convert_checkpoint.py", "--load", "deepspeed_zero3", "--save", "converted_again",
               "--to", "megatron"), work)
    _assert_format("converted", os.path.join(work, "converted_again"))


def test_reshard_keeps_the_masked_models_loss(work):
    _run(_tool("reshard_checkpoint.py", "--load", "megatron", "--save", "resharded", "--shrink",
               "--target-tensor-parallel-size", "1"), work)
    _assert_loss(_evaluate(work, "resharded"), KINDS["megatron"]["eval_loss"], "megatron, shrunk to TP=1")


@pytest.mark.parametrize("kind", ["shrunk_per_layer", "imported", "converted"])
def test_evaluation_reads_the_old_weights(work, kind):
    _assert_loss(_evaluate(work, kind), KINDS[kind]["eval_loss"], kind)


def test_hf_export_computes_the_checkpoints_loss(work):
    """The per-layer export (remote code): transformers computes the old export's loss, and the
    export imported back evaluates to the checkpoint's loss."""
    _run(_tool("convert_to_hf.py", "--load", "shrunk_per_layer", "--save", "hf_shrunk_per_layer"), work)
    recorded = KINDS["shrunk_per_layer"]
    data_bin = os.path.join(work, EVAL["data_path"] + ".bin")
    _assert_loss(hf_loss(os.path.join(work, "hf_shrunk_per_layer"), data_bin), recorded["hf_loss"], "HF export")
    _run(_tool("convert_from_hf.py", "--load", "hf_shrunk_per_layer", "--save", "reimported",
               "--make-vocab-size-divisible-by", "32"), work)
    _assert_loss(_evaluate(work, "reimported"), recorded["eval_loss"], "export imported back")
