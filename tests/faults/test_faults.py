"""A few fault-injection trials in CI (the campaign: ``python -m tests.faults --n 20``)."""

from __future__ import annotations

import random

import pytest

from tests.faults.campaign import PHASES, reference_run, trial

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    return workdir, reference_run(tiny_dataset["prefix"], tiny_dataset["tokenizer"], workdir)


@pytest.mark.parametrize("index,phase", [(0, "pruning"), (1, "save"), (2, "shrink")])
def test_killed_rank_resumes_bit_for_bit(index, phase, tiny_dataset, reference):
    workdir, outcome = reference
    assert phase in PHASES
    result = trial(index, phase, random.Random(index), tiny_dataset["prefix"], tiny_dataset["tokenizer"],
                   workdir, outcome)
    assert result.killed_rank is not None, "the run ended before the kill"
    assert not result.leftovers, result.leftovers
    assert not result.differences, result.differences[:10]
