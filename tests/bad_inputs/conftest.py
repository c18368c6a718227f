"""The bad-input tests' shared fixture: a small valid pruned checkpoint."""

from __future__ import annotations

import subprocess

import pytest

from tests.bad_inputs.harness import ROOT, Fixtures, python
from tests.dist_helper import subprocess_env


@pytest.fixture(scope="session")
def bad_input_fixtures(tiny_dataset, tmp_path_factory) -> Fixtures:
    """A small valid pruned checkpoint beside the tiny dataset, made once by the real CLI."""
    save = tmp_path_factory.mktemp("bad_inputs_ckpt") / "ckpt"
    argv = python("-m", "pretrain", "--model", "debug", "--seq-length", "32",
                  "--data-path", tiny_dataset["prefix"], "--tokenizer-model", tiny_dataset["tokenizer"],
                  "--split", "98,2,0", "--micro-batch-size", "2", "--global-batch-size", "2",
                  "--train-iters", "3", "--lr", "1e-3", "--save", str(save), "--save-interval", "3",
                  "--prune-target-ratio", "0.7", "--prune-start-tokens", "0",
                  "--prune-end-tokens", "128", "--prune-interval", "1")
    done = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Fixtures(dataset=tiny_dataset["prefix"], tokenizer=tiny_dataset["tokenizer"],
                    corpus=tiny_dataset["corpus"], checkpoint=str(save))
