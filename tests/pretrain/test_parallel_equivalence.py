"""TP=2, PP=2, TP=2xPP=2 and DP=2 give the losses of TP=1/PP=1 for the same seed and data.

Every layout starts from the same weights (pretrain.model.init draws each full tensor from a keyed
generator and keeps the local slice) and reads the same global batches, so the loss curves must
agree to float tolerance step by step.
"""

import math

import pytest

from tests.dist_helper import run_distributed
from tests.pretrain.common import train_layouts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ITERS = 5


@pytest.fixture(scope="module")
def reference(tiny_dataset):
    return run_distributed(train_layouts, 1, tiny_dataset, [(1, 1)], ITERS)[0][(1, 1)]


def _assert_close(a, b, what):
    assert len(a) == len(b) == ITERS
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=2e-4, abs_tol=2e-4), f"{what}: step {i + 1}: {x} vs {y}\n{a}\n{b}"


def test_world2_layouts_match_reference(tiny_dataset, reference):
    # one launch, three layouts: TP=2, PP=2, and DP=2 (half the micro-batches per rank)
    results = run_distributed(train_layouts, 2, tiny_dataset, [(2, 1), (1, 2), (1, 1)], ITERS)
    ref_losses = reference["losses"]
    assert ref_losses[-1] < ref_losses[0], "the loss should go down"
    for layout in [(2, 1), (1, 2), (1, 1)]:
        got = results[0][layout]
        _assert_close(got["losses"], ref_losses, f"layout TP,PP={layout}")
        _assert_close(got["grad_norms"], reference["grad_norms"], f"grad norms TP,PP={layout}")
    assert results[0][(1, 1)]["layout"]["dp_size"] == 2


def test_tp2_pp2_matches_reference(tiny_dataset, reference):
    results = run_distributed(train_layouts, 4, tiny_dataset, [(2, 2)], ITERS)
    _assert_close(results[0][(2, 2)]["losses"], reference["losses"], "TP=2 x PP=2")
