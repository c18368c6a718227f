"""OBS weight compensation at a pruning event (SparseGPT's update, structured; issue 16).

When a pruning event removes input channels of a linear (FFN channels: columns of ``linear_fc2``;
query groups: their heads' columns of ``linear_proj``; hidden channels: columns of ``linear_qkv``,
``linear_fc1`` and an untied output layer), the surviving columns of that linear are updated so
its output on recent inputs changes as little as possible. With ``H = sum x x^T`` of the linear's
inputs (damped), the removed columns ``P`` and ``H^-1`` over the columns that existed before the
event, the Optimal Brain Surgeon update is one joint step for all of ``P``::

    dW = -W[:, P] ((H^-1)[P, P])^-1 (H^-1)[P, :]

which zeroes ``W[:, P]`` and equals the least-squares refit of the kept columns to the old output
(``obs_update``; tested against the closed form).

The orchestration (``Compensator``):

* capture: forward pre-hooks on the consuming linears add ``x^T x`` (fp32, ``in_features^2`` per
  linear) on the last ``--prune-compensation-window`` steps before each scheduled event; the sums
  are freed after the event (so between events no Hessian is held);
* data parallel: every ``H`` is summed over the data-parallel group before the update, so every
  DP replica applies the same update and the replicas stay identical;
* tensor parallel: ``linear_qkv``/``linear_fc1``/the output layer read the full hidden input (the
  same on every TP rank) and their rows are split over TP: the update is row-wise, so each rank
  updating its own rows with the same ``H`` is the exact joint update. ``linear_proj``/``linear_fc2``
  are row-parallel: each TP rank holds a block of the input columns and only the inputs of that
  block; the update uses each rank's own block of ``H`` (block-diagonal approximation; exact at
  TP=1). The exact variant would all-gather every step's activations and the removed columns of
  ``W`` over TP; it was left out (docs/ARCHITECTURE.md);
* the optimizer: the fp32 master copy receives the same update (``W_new - W`` added to its owned
  range, or the parameter itself where the master is the parameter); Adam moments are kept. Under
  DeepSpeed ZeRO-3 the weight is gathered over data parallel for the update, and each rank writes
  its own partition of the weight and of the master (``ParamSlot.values``/``main_param``);
* pipeline: each stage updates its own layers; the per-linear errors of all stages are gathered
  so every rank's pruning history is the same.

A tied output layer is left alone: its weight is the input embedding, whose columns feed the
residual stream, not a linear's output that the update could preserve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pretrain.distributed import print_rank0
from pretrain.engines.megatron import as_engine
from pretrain.model import layout
from pretrain.model.params import local_parameters
from pretrain.pruning.trial import loss_under_masks

COMPENSATIONS = ("none", "obs")
# the linears whose input channels a pruning type removes (roles of pretrain.model.layout)
_CONSUMERS = {"heads": ("proj",), "ffn": ("fc2",), "hidden": ("qkv", "fc1", "output")}
MIN_TOKENS_PER_INPUT = 4  # fewer captured tokens per input feature than this: warn (``compensate``)


@torch.no_grad()
def obs_update(weight: torch.Tensor, hessian: torch.Tensor, removed: torch.Tensor, damp: float = 0.01,
               active: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of a linear after removing its input columns ``removed``, OBS-compensated.

    ``weight`` [R, C]; ``hessian`` [C, C] (``sum x x^T`` of the inputs, any positive scale);
    ``removed`` column indices; ``active`` bool [C]: the columns that exist (kept before this event;
    default all; ``removed`` must be among them). The inverse is taken over the active columns with
    ``damp`` times the mean of their diagonal added (SparseGPT's ``percdamp``). Returns a new
    tensor (``weight``'s dtype): removed columns zero, the other active columns updated, inactive
    columns unchanged. The Hessian algebra runs in float64, the ``[R, C]`` product in fp32."""
    columns = weight.shape[1]
    if active is None:
        active = torch.ones(columns, dtype=torch.bool, device=weight.device)
    active = active.to(weight.device)
    removed = torch.as_tensor(removed, dtype=torch.long, device=weight.device).reshape(-1)
    out = weight.detach().clone()
    if removed.numel() == 0:
        return out
    if not bool(active[removed].all()):
        raise ValueError("obs_update: a removed column is not among the active ones")
    active_idx = active.nonzero().flatten()
    position = torch.full((columns,), -1, dtype=torch.long, device=weight.device)
    position[active_idx] = torch.arange(active_idx.numel(), device=weight.device)
    pos = position[removed]
    h = hessian.to(device=weight.device, dtype=torch.float64)[active_idx][:, active_idx]
    mean_diag = float(torch.diagonal(h).mean())
    h.diagonal().add_(damp * mean_diag if mean_diag > 0 else 1.0)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    # (H^-1)[P, P]^-1 (H^-1)[P, :]: |P| x |active|
    step = torch.linalg.solve(hinv[pos][:, pos], hinv[pos])
    w = out[:, active_idx].float()
    w -= w[:, pos] @ step.float()
    w[:, pos] = 0.0  # exactly zero (it is, up to rounding)
    out[:, active_idx] = w.to(out.dtype)
    return out


@torch.no_grad()
def output_error(reference: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """(||(W - W_ref) X||^2, ||W_ref X||^2) on the inputs whose ``sum x x^T`` is ``hessian``."""
    h = hessian.to(device=reference.device, dtype=torch.float64)
    diff = (weight.double() - reference.double())
    ref = reference.double()
    return float(((diff @ h) * diff).sum()), float(((ref @ h) * ref).sum())


@dataclass
class _Target:
    """One consuming linear this rank holds."""

    module: torch.nn.Module
    param: torch.nn.Parameter
    role: str
    layer: int | None
    input_axis: str


class Compensator:
    """Captures the consuming linears' input Hessians and applies the OBS update at an event."""

    def __init__(self, shape, model_chunks: list, optimizer, types: tuple, damp: float = 0.01):
        """``optimizer``: the engine (or megatron-core's optimizer) whose master weights receive the
        update; None: the weights alone (a model without an optimizer)."""
        self.shape, self.damp = shape, damp
        self.engine = as_engine(optimizer, model_chunks) if optimizer is not None else None
        roles = {role for t in types for role in _CONSUMERS.get(t, ())}
        self.targets: list[_Target] = []
        for entry in local_parameters(model_chunks):
            # a tied output layer has no parameter of its own (entry.param is None): left alone
            if entry.layout.role in roles and entry.param is not None:
                self.targets.append(_Target(entry.module, entry.param, entry.layout.role, entry.layout.layer,
                                            entry.layout.axes[-1]))
        self._sums: dict = {}  # target index -> [sum x x^T (fp32), tokens]
        self._capturing = False
        self._hooks = [t.module.register_forward_pre_hook(self._make_hook(i)) for i, t in enumerate(self.targets)]

    def _make_hook(self, index: int):
        def hook(module, args):
            if not self._capturing or not args:
                return None
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            stats = self._sums.get(index)
            if stats is None:
                d = x.shape[-1]
                stats = self._sums[index] = [torch.zeros(d, d, dtype=torch.float32, device=x.device), 0]
            stats[0].addmm_(x.T, x)
            stats[1] += x.shape[0]
            return None

        return hook

    def begin_capture(self) -> None:
        self._capturing = True

    def end_capture(self) -> None:
        self._capturing = False

    def reset(self) -> None:
        """Free the Hessians (after an event, or when no event follows the captured steps)."""
        self._sums = {}

    @property
    def hessian_bytes(self) -> int:
        return sum(s[0].numel() * s[0].element_size() for s in self._sums.values())

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ state (mid-window resume)
    def state_dict(self) -> dict:
        return {i: (s[0].cpu().clone(), s[1]) for i, s in self._sums.items()}

    def load_state_dict(self, state: dict) -> None:
        device = self.targets[0].param.device if self.targets else torch.device("cpu")
        self._sums = {int(i): [h.to(device), n] for i, (h, n) in state.items()}

    # ------------------------------------------------------------------ the update
    def scheme(self, tensor_parallel: int) -> str:
        if tensor_parallel == 1:
            return "exact (TP=1)"
        return (f"block-diagonal per TP rank for linear_proj/linear_fc2 (TP={tensor_parallel}); "
                "exact for linear_qkv/linear_fc1/output")

    @torch.no_grad()
    def compensate(self, old_masks, new_masks) -> dict:
        """Apply the OBS update for the channels ``old_masks`` kept and ``new_masks`` drops, then free
        the Hessians. Returns the event's record (identical on every rank): per updated linear
        ``[error without, error with]`` (relative output reconstruction error on the captured
        inputs), their means per role, seconds, the Hessian bytes one rank held, the TP scheme."""
        from megatron.core import parallel_state as ps

        start = time.time()
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        dist = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        hessian_bytes = self.hessian_bytes
        slots: dict = {}
        for slot in self.engine.param_slots() if self.engine is not None else ():
            if slot.end > slot.start:
                slots.setdefault(slot.param, []).append(slot)
        sums: dict = {}  # name -> [num before, num after, den]: summed over TP for one ratio
        few_tokens = float("inf")  # the fewest captured tokens per input feature of an updated linear
        for index, target in enumerate(self.targets):
            layer = target.layer
            if layer is not None and not (bool(old_masks.layers[layer]) and bool(new_masks.layers[layer])):
                continue  # a dropped layer: nothing of it survives to compensate
            old_kept = layout.axis_mask(target.input_axis, layer, old_masks, self.shape, tp, tp_rank)
            new_kept = layout.axis_mask(target.input_axis, layer, new_masks, self.shape, tp, tp_rank)
            # every rank takes part in the same all-reduces: decided from the global masks, not
            # this rank's block (a row-parallel block may lose nothing while another loses channels)
            if not self._removes_anywhere(target, old_masks, new_masks):
                continue
            stats = self._sums.pop(index, None)
            device = target.param.device
            d = self._full_shape(target.param)[-1]  # ZeRO-3: the parameter holds a partition
            h = stats[0] if stats is not None else torch.zeros(d, d, dtype=torch.float32, device=device)
            tokens = torch.tensor([float(stats[1]) if stats is not None else 0.0], device=h.device)
            if dist:
                h, tokens = self._dp_sum(h), self._dp_sum(tokens)
            if not bool(torch.diagonal(h).abs().sum() > 0):
                continue  # nothing captured (same verdict on every DP rank after the sum)
            few_tokens = min(few_tokens, float(tokens) / d)
            removed = (old_kept & ~new_kept).nonzero().flatten().to(device)
            if removed.numel() == 0:
                continue
            weight = (self.engine.whole_weight(target.param) if self.engine is not None
                      else target.param.detach()).float()  # ZeRO-3: gathered over DP
            plain = weight.clone()
            plain[:, removed] = 0.0
            new = obs_update(weight, h, removed, self.damp, active=old_kept.to(device))
            before, den = output_error(weight, plain, h)
            after, _ = output_error(weight, new, h)
            self._write(target.param, new - weight, slots.get(target.param, ()), self._full_shape(target.param))
            name = f"{target.role}" if layer is None else f"{layer}.{target.role}"
            sums[name] = [before, after, den]
            del h, weight, plain, new
        self.reset()
        record = self._gather_record(sums, time.time() - start, hessian_bytes)
        record["scheme"] = self.scheme(tp)
        if few_tokens < MIN_TOKENS_PER_INPUT:
            # a refit from fewer samples than a few per unknown fits the noise of those samples
            # (measured: it made held-out outputs worse on a tiny model); say so, once per event
            print_rank0(f"WARNING: OBS compensation used only {few_tokens:.1f} captured tokens per input feature "
                        f"of a linear (fewer than {MIN_TOKENS_PER_INPUT}): the update may fit noise. Raise "
                        "--prune-compensation-window or --prune-compensation-damp")
        return record

    def _removes_anywhere(self, target: _Target, old_masks, new_masks) -> bool:
        """Whether the event removes any unit of this linear's input axis on any TP rank (row-parallel
        linears: another rank's block may lose channels while this one does not)."""
        unit = layout.UNIT[target.input_axis]
        old, new = getattr(old_masks, unit), getattr(new_masks, unit)
        if unit != "hidden":
            old, new = old[target.layer], new[target.layer]
        return bool((old & ~new).any())

    @staticmethod
    def _dp_sum(h: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            nccl = torch.distributed.get_backend() == "nccl"
            h = h.cuda() if nccl else h.cpu()
            torch.distributed.all_reduce(h, group=group)
        return h

    def _full_shape(self, param: torch.nn.Parameter) -> tuple:
        return self.engine.full_shape(param) if self.engine is not None else tuple(param.shape)

    @staticmethod
    def _write(param: torch.nn.Parameter, delta: torch.Tensor, param_slots, full_shape: tuple) -> None:
        """Add ``delta`` (fp32, the local shape) to the parameter and to its fp32 master copy (the owned
        range; a master that is the weight's own storage is updated once, through the weight). A ZeRO-3
        parameter's source of truth is its slot's ``values`` (its partition): each DP rank updates its
        own part, and the whole weight too where it is gathered (a persistent small parameter)."""
        flat = delta.reshape(-1)
        for slot in param_slots:
            weight = slot.values if slot.values is not None else param
            main = slot.main_param
            if main is not None and main.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
                main.add_(flat[slot.start:slot.end].to(device=main.device, dtype=main.dtype))
            if slot.values is not None:  # rounded as the whole parameter is below
                part = flat[slot.start:slot.end].to(slot.values.device)
                slot.values.copy_((slot.values.float() + part).to(slot.values.dtype))
        if tuple(param.data.shape) == tuple(full_shape):  # not a released partition
            param.data.copy_((param.detach().float() + delta).to(param.dtype))

    @staticmethod
    def _gather_record(sums: dict, seconds: float, hessian_bytes: int) -> dict:
        """The event's record, the same on every rank: relative errors per linear and their mean per
        role, from sums over TP ranks (rows split: exact; row-parallel: the block-diagonal sum) and
        the pipeline stages' linears of data-parallel rank 0 (every DP replica computed the same
        numbers); the slowest rank's seconds and the largest rank's Hessian bytes."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from megatron.core import parallel_state as ps

            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, (ps.get_data_parallel_rank(), sums, seconds, hessian_bytes))
            seconds = max(e[2] for e in everyone)
            hessian_bytes = max(e[3] for e in everyone)
            merged: dict = {}
            for dp_rank, part, _, _ in everyone:
                if dp_rank != 0:
                    continue
                for name, values in part.items():
                    m = merged.setdefault(name, [0.0, 0.0, 0.0])
                    for i, v in enumerate(values):
                        m[i] += v
        else:
            merged = sums
        linears = {name: [b / d if d > 0 else 0.0, a / d if d > 0 else 0.0]
                   for name, (b, a, d) in sorted(merged.items())}
        per_role: dict = {}
        for name, errors in linears.items():
            per_role.setdefault(name.split(".")[-1], []).append(errors)
        means = {role: [sum(e[0] for e in v) / len(v), sum(e[1] for e in v) / len(v)] for role, v in per_role.items()}
        return {"linears": linears, "error_by_role": means, "seconds": seconds, "hessian_bytes": hessian_bytes}


@torch.no_grad()
def probe_uncompensated_loss(trainer, shape, old_masks, new_masks, batches: int) -> float:
    """The held-out (``--test-data-path``) loss of the model with ``new_masks`` applied and no update
    (``--prune-compensation-probe``)."""
    return loss_under_masks(trainer, shape, old_masks, new_masks, lambda: trainer.evaluate_test(batches))
