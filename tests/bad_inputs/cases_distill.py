"""Bad distillation inputs (`--kd-*`): refused with a clear message before any model is built.
(A negative --kd-weight and --kd-* flags without a teacher: tests/pretrain/test_distillation.py.)"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.bad_inputs.cases_checkpoint import _copy_checkpoint, _republish
from tests.bad_inputs.harness import BadInput, Fixtures, python


def _student(f: Fixtures, *extra: str) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32",
                  "--data-path", f.dataset, "--tokenizer-model", f.tokenizer, "--split", "98,2,0",
                  "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", *extra)


def _teacher_with_other_tokenizer(d: Path, f: Fixtures) -> list[str]:
    """The fixture checkpoint, as a checkpoint from before the tokenizer's identity was recorded,
    whose config names another tokenizer (900 tokens): its file tells."""
    from data_prep.train_tokenizer import train_tokenizer

    other = train_tokenizer([f.corpus], str(d / "other"), vocab_size=900, num_threads=1)
    folder = _copy_checkpoint(d, f)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    del state["tokenizer"]
    state["config"]["data"]["tokenizer_model"] = other
    torch.save(state, folder / "trainer_state.pt")
    _republish(folder)
    return _student(f, "--kd-teacher", str(d / "ckpt"))


CASES = [
    BadInput("distill-teacher-missing", lambda d, f: _student(f, "--kd-teacher", str(d / "no_such_teacher")),
             message=r"--kd-teacher .*no_such_teacher: no checkpoint there"),
    BadInput("distill-weight-above-one", lambda d, f: _student(f, "--kd-teacher", f.checkpoint, "--kd-weight", "1.5"),
             message=r"--kd-weight 1.5: must be in \[0, 1\]"),
    # a mock-data student of another vocabulary (512 padded; the teacher has 1024)
    BadInput("distill-teacher-vocabulary-differs",
             lambda d, f: python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--mock-data",
                                 "--vocab-size", "500", "--micro-batch-size", "2", "--global-batch-size", "2",
                                 "--train-iters", "2", "--kd-teacher", f.checkpoint),
             message=r"--kd-teacher .*: its vocabulary \(1024 padded\) differs from the student's \(512\)"),
    BadInput("distill-teacher-tokenizer-differs", _teacher_with_other_tokenizer,
             message=r"--kd-teacher .*: the checkpoint was trained with 900 tokens .*other\.model\), not with the tokenizer "),
    # the fixture checkpoint is pruned (masks with removed groups) and not shrunk
    BadInput("distill-teacher-pruned-not-shrunk", lambda d, f: _student(f, "--kd-teacher", f.checkpoint),
             message=r"--kd-teacher .*: its weights carry pruning masks with removed groups; shrink it first"),
]
