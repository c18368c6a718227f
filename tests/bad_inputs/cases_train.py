"""Bad inputs to training (`python -m pretrain`)."""

from __future__ import annotations

from tests.bad_inputs.harness import BadInput, python


def _train(f, *extra: str) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32",
                  "--data-path", f.dataset, "--tokenizer-model", f.tokenizer, "--split", "98,2,0",
                  "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", *extra)


CASES = [
    BadInput("train-target-tp-zero", lambda d, f: _train(f, "--tensor-model-parallel-size", "0"),
             message=r"--tensor-model-parallel-size"),
]
