"""Pruning's zeroing of an engine's optimizer state (``pretrain/engines/slots.py``): masked elements
of the master weights, Adam moments and engine-held gradients become exactly 0, NaN and inf
included (``masked_fill_``; a multiply by the mask left 0 * inf = NaN), the kept ones untouched."""

from __future__ import annotations

import math

import torch

from pretrain.engines.base import Engine, ParamSlot
from pretrain.engines.slots import zero_masked_grads, zero_masked_state


class _OneSlotEngine(Engine):
    """The state of one parameter, elements [start, end) of it owned here (as a ZeRO rank's)."""

    name = "test"

    def __init__(self, slot: ParamSlot):
        self.slot, self.masked_weights = slot, None

    def param_slots(self):
        yield self.slot

    def mask_weights(self, param_masks: dict) -> None:
        self.masked_weights = param_masks

    def _unused(self, *args, **kwargs):
        raise AssertionError("not part of the state zeroing")

    forward_backward = gradients_finite = step = discard_gradients = torch_optimizers = _unused
    init_optimizer_state = reload_master_weights = _unused
    partitions_state = property(lambda self: True)


def _slot(start: int, end: int) -> ParamSlot:
    param = torch.nn.Parameter(torch.ones(2, 4))
    n = end - start
    poisoned = torch.tensor([math.nan, math.inf, -math.inf, 5.0, 6.0, 7.0, 8.0, 9.0])[:n]
    return ParamSlot(param=param, start=start, end=end, main_param=poisoned.clone(),
                     state={"exp_avg": poisoned.clone(), "exp_avg_sq": poisoned.clone().abs(), "step": torch.tensor(3)},
                     grad=poisoned.clone())


def test_masked_state_becomes_zero_even_where_it_is_not_finite():
    slot = _slot(2, 8)  # this rank owns elements 2..7 of the 2 x 4 weight
    engine = _OneSlotEngine(slot)
    # elements 1-4 dropped: 1 outside this rank's range; 2-4 hold NaN, inf and -inf here
    mask = torch.tensor([[True, False, False, False], [False, True, True, True]])
    touched = zero_masked_state(engine, {slot.param: mask})
    assert touched == 3
    kept = mask.reshape(-1)[2:8]
    for tensor in (slot.main_param, slot.state["exp_avg"], slot.state["exp_avg_sq"]):
        assert torch.equal(tensor[~kept], torch.zeros(3)), tensor
    assert torch.equal(slot.main_param[kept], torch.tensor([5.0, 6.0, 7.0]))
    assert slot.state["step"].item() == 3
    assert engine.masked_weights is not None  # the engine masks the weights it holds itself
    zero_masked_grads(engine, {slot.param: mask})
    assert torch.equal(slot.grad[~kept], torch.zeros(3)) and torch.equal(slot.grad[kept], torch.tensor([5.0, 6.0, 7.0]))
