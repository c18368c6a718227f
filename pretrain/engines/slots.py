"""Pruning's view of an engine's optimizer state: zero the master weights, Adam moments and
reduced gradients of masked elements, through ``Engine.param_slots`` only.

Each function takes an engine (``pretrain.engines.base.Engine``) or a megatron-core optimizer
(``as_engine`` wraps it: the megatron engine's slots).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pretrain.engines.base import ParamSlot
from pretrain.engines.megatron import as_engine, inner_optimizers

__all__ = ["ParamSlot", "inner_optimizers", "torch_optimizers", "iter_param_slots", "whole_weight",
           "is_distributed", "zero_masked_state", "zero_masked_grads"]


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers that keep the Adam state (``Engine.torch_optimizers``)."""
    return as_engine(optimizer).torch_optimizers()


def iter_param_slots(optimizer) -> Iterator[ParamSlot]:
    """Every model parameter this rank owns (part of), with its master values and Adam state."""
    return as_engine(optimizer).param_slots()


def whole_weight(optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's whole (TP-local) weight as the forward uses it (``Engine.whole_weight``)."""
    return as_engine(optimizer).whole_weight(param)


def is_distributed(optimizer) -> bool:
    """Whether each DP rank owns only part of the optimizer state (``Engine.partitions_state``)."""
    return as_engine(optimizer).partitions_state


@torch.no_grad()
def zero_masked_state(optimizer, param_masks: dict) -> int:
    """Zero master weights and Adam moments of masked elements; returns elements touched.

    ``masked_fill_`` with the dropped elements, not a multiply by the mask: a NaN or inf there
    becomes 0 too (0 * inf is NaN) and no float copy of the mask is made. Device-agnostic: the
    dropped elements are moved to the device of the tensor they fill (the fp32 master of a bf16 GPU
    parameter, or an offloaded optimizer state, may live elsewhere), and the count is summed on
    the device and read once, not once per parameter."""
    engine = as_engine(optimizer)
    touched = None
    for slot in engine.param_slots():
        mask = param_masks.get(slot.param)
        if mask is None or slot.end <= slot.start:
            continue
        dropped = ~mask.reshape(-1)[slot.start:slot.end]
        if slot.main_param is not None:
            slot.main_param.masked_fill_(dropped.to(slot.main_param.device).view_as(slot.main_param), 0)
        for key, value in slot.state.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.numel() == dropped.numel():
                value.masked_fill_(dropped.to(value.device).view_as(value), 0)
        count = dropped.sum()
        touched = count if touched is None else touched + count.to(touched.device)
    engine.mask_weights(param_masks)  # weights the engine partitions (ZeRO-3)
    return 0 if touched is None else int(touched)


@torch.no_grad()
def zero_masked_grads(optimizer, param_masks: dict) -> None:
    """Zero the masked elements of reduced gradients an engine keeps outside the parameters
    (``ParamSlot.grad``); gradients in ``param.grad``/``main_grad`` are ``apply_to_grads``'s."""
    for slot in as_engine(optimizer).param_slots():
        mask = param_masks.get(slot.param)
        if mask is not None and slot.grad is not None and slot.end > slot.start:
            dropped = ~mask.reshape(-1)[slot.start:slot.end]
            slot.grad.masked_fill_(dropped.to(slot.grad.device).view_as(slot.grad), 0)  # NaN-safe, as above
