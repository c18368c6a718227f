"""Where each model parameter's master copy and Adam moments live in megatron-core's optimizers,
so pruning can zero them, and which elements' reduced gradients this rank owns.

* ``DistributedOptimizer`` (ZeRO-1 over data-parallel ranks): each DP rank owns a contiguous range
  of every flattened parameter (possibly empty); after the gradient reduce-scatter only that
  range of ``main_grad`` holds the data-parallel mean.
* ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``: every rank holds everything, and the
  gradients are all-reduced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ParamSlot:
    param: torch.nn.Parameter  # the model parameter
    start: int  # owned range in the flattened parameter
    end: int
    main_param: torch.Tensor | None  # flat fp32 master values for [start, end) (may alias param)
    state: dict  # optimizer state tensors for [start, end) (exp_avg, exp_avg_sq, step)
    # the reduced gradient of [start, end) where the engine keeps it outside the parameter
    # (DeepSpeed's partition buffers); None: ``param.main_grad`` / ``param.grad`` hold it
    grad: torch.Tensor | None = None
    # the parameter's values of [start, end) where the parameter itself holds none of them
    # (a ZeRO-3 partitioned parameter); None: read ``param``
    values: torch.Tensor | None = None


def inner_optimizers(optimizer) -> list:
    """The optimizers of a (possibly chained) megatron-core optimizer; an engine adapter itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core (possibly chained) optimizer, or inside an
    engine adapter (``torch_optimizer``: DeepSpeed's, over its flat fp32 partitions)."""
    if hasattr(optimizer, "torch_optimizer"):
        return [optimizer.torch_optimizer]
    inner = (getattr(opt, "optimizer", None) for opt in inner_optimizers(optimizer))
    return [opt for opt in inner if isinstance(opt, torch.optim.Optimizer)]


def iter_param_slots(optimizer) -> Iterator[ParamSlot]:
    """Every model parameter this rank owns (part of), with its master values and Adam state."""
    if hasattr(optimizer, "param_slots"):  # an engine adapter (pretrain.engines.deepspeed)
        yield from optimizer.param_slots()
        return
    for opt in inner_optimizers(optimizer):
        if hasattr(opt, "model_param_gbuf_map"):  # DistributedOptimizer
            for param in opt.model_param_gbuf_map:
                r = opt._get_model_param_range_map(param)["param"]
                tensors = opt._get_main_param_and_optimizer_states(param)
                main = tensors.pop("param", None)
                yield ParamSlot(param, r.start, r.end, main, tensors)
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for param, main in zip(model_group, main_group):
                    yield ParamSlot(param, 0, param.numel(), main.view(-1), opt.optimizer.state.get(main, {}))
            for group in getattr(opt, "fp32_from_fp32_groups", []):
                for param in group:
                    yield ParamSlot(param, 0, param.numel(), param.view(-1), opt.optimizer.state.get(param, {}))
        else:  # FP32Optimizer
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    yield ParamSlot(param, 0, param.numel(), param.view(-1), opt.optimizer.state.get(param, {}))


def whole_weight(optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's whole (TP-local) weight as the forward uses it. A ZeRO-3 partitioned parameter
    holds none of it outside the forward: its engine gathers it over data parallel (a copy; a
    collective over the DP group, so every DP rank must ask for the same parameters)."""
    if hasattr(param, "ds_tensor") and hasattr(optimizer, "gathered_weight"):
        return optimizer.gathered_weight(param)
    return param.detach()


def is_distributed(optimizer) -> bool:
    if hasattr(optimizer, "param_slots"):  # DeepSpeed ZeRO: every stage partitions over DP
        return True
    return any(hasattr(o, "model_param_gbuf_map") for o in inner_optimizers(optimizer))


@torch.no_grad()
def zero_masked_state(optimizer, param_masks: dict) -> int:
    """Zero master weights and Adam moments of masked elements; returns elements touched.

    Device-agnostic: each mask is moved to the device (and dtype) of the tensor it multiplies
    (the fp32 master of a bf16 GPU parameter, or an offloaded optimizer state, may live elsewhere),
    and the count is summed on the device and read once, not once per parameter."""
    touched = None
    for slot in iter_param_slots(optimizer):
        mask = param_masks.get(slot.param)
        if mask is None or slot.end <= slot.start:
            continue
        flat = mask.reshape(-1)[slot.start:slot.end]
        if slot.main_param is not None:
            slot.main_param.mul_(flat.to(device=slot.main_param.device, dtype=slot.main_param.dtype))
        for key, value in slot.state.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.numel() == flat.numel():
                value.mul_(flat.to(device=value.device, dtype=value.dtype).view_as(value))
        dropped = (~flat).sum()
        touched = dropped if touched is None else touched + dropped.to(touched.device)
    if hasattr(optimizer, "mask_weights"):  # weights the engine partitions (ZeRO-3)
        optimizer.mask_weights(param_masks)
    return 0 if touched is None else int(touched)


@torch.no_grad()
def zero_masked_grads(optimizer, param_masks: dict) -> None:
    """Zero the masked elements of reduced gradients an engine keeps outside the parameters
    (``ParamSlot.grad``); gradients in ``param.grad``/``main_grad`` are ``apply_to_grads``'s."""
    for slot in iter_param_slots(optimizer):
        mask = param_masks.get(slot.param)
        if mask is not None and slot.grad is not None and slot.end > slot.start:
            slot.grad.mul_(mask.reshape(-1)[slot.start:slot.end].to(device=slot.grad.device, dtype=slot.grad.dtype))
