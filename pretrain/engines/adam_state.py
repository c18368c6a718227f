"""AdamW's state in model space: the one form in which it crosses engines and the in-run shrink.

Each engine keeps AdamW's state its own way: megatron-core's distributed optimizer in flat buffers
split over data-parallel ranks, DeepSpeed ZeRO in flat fp32 partitions (offloaded or not). Both
reach the same *model-space* state: per model parameter (its tensor-parallel shard, as the model
holds it) an fp32 master copy ``param`` and the two moments ``exp_avg`` / ``exp_avg_sq`` of the
parameter's shape, plus one Adam ``step``. That is also how megatron-core's ``fully_reshardable``
checkpoints store it (``optimizer.state.<key>.<model key>`` tensors sharded like the model's), so:

* a megatron-format checkpoint written from a DeepSpeed run (``ModelSpaceAdam``) holds the same
  tensors under the same keys: the shrink tool slices them like any other, and a run on either
  engine reads them back (``pretrain.checkpoint.adam.read_checkpoint`` + ``scatter_into_engine``);
* a DeepSpeed run started from a megatron engine's checkpoint reads the moments the megatron
  engine wrote (distributed optimizer or not; its step from the checkpoint's common state);
* ``tools/convert_checkpoint.py`` writes this form from DeepSpeed's ZeRO files.

Engines are reached only through the ``Engine`` interface (``param_slots``: the range of each
flattened parameter this rank owns, with views of its master and moments), so moving state needs
no engine-specific code here: a gather is a sum over data-parallel ranks of zero-filled tensors, a
scatter writes each rank's own range. Reading this state out of a checkpoint folder is the
checkpoint's business (``pretrain.checkpoint.adam``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pretrain.distributed import device, print_rank0
from pretrain.engines.megatron import as_engine
from pretrain.model.build import unwrap

ADAM_KEYS = ("param", "exp_avg", "exp_avg_sq")
# common.pt entry of a checkpoint whose optimizer state is model-space Adam written by ModelSpaceAdam
MARKER = "model_space_adam"


def adam_step(optimizer) -> int:
    """The Adam step count of ``optimizer`` (0 before its first step): torch's Adam keeps it per
    state, the fused Adams of apex and Transformer Engine per param group."""
    steps = set()
    for opt in as_engine(optimizer).torch_optimizers():
        steps |= {float(s["step"]) for s in opt.state.values() if "step" in s}
        steps |= {float(g["step"]) for g in opt.param_groups if "step" in g}
    return int(max(steps)) if steps else 0


def _set_adam_step(optimizer, step: int) -> None:
    for opt in as_engine(optimizer).torch_optimizers():
        for state in opt.state.values():
            if "step" in state:
                # its own tensor per state (torch Adam increments it in place), float32 on the host
                # as torch's non-capturable Adam makes it
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=state["step"].device)
        for group in opt.param_groups:
            if "step" in group:  # apex / Transformer Engine FusedAdam
                group["step"] = int(step)


def param_names(model_chunks: list) -> dict:
    """{parameter: name} over this rank's model chunks (names prefixed by the chunk's index when
    there are several: virtual pipeline stages reuse the same local names)."""
    prefix = len(model_chunks) > 1
    return {p: (f"chunk{i}." if prefix else "") + n
            for i, chunk in enumerate(model_chunks) for n, p in unwrap(chunk).named_parameters()}


def _data_parallel_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None


@torch.no_grad()
def gather_from_engine(optimizer, model_chunks: list, everywhere: bool = True) -> tuple[dict, int]:
    """Collective over data parallel: {parameter name: {key: fp32 tensor of the parameter's
    shape, on the host}} for every trainable parameter of ``model_chunks`` (this rank's TP/PP
    shard), and the Adam step. Each rank fills the ranges it owns; a sum over DP assembles them
    (each element is owned by exactly one DP rank). One parameter at a time on the device, so the
    device holds at most 3 fp32 copies of the largest parameter; the host holds the result
    (3 fp32 copies of this rank's shard of the model).

    ``everywhere=False`` is for a checkpoint save, where only the main replica of each tensor is
    written (megatron-core's replica ids: data-parallel rank 0): the sum goes to DP rank 0 only,
    and the other ranks get placeholders of the right shape (``torch.empty``: pages never
    touched, so no host memory; their contents are never read)."""
    engine = as_engine(optimizer, model_chunks)
    names = {p: n for p, n in param_names(model_chunks).items() if p.requires_grad}
    owned: dict[str, list] = {}  # name -> this rank's slots of it (views: nothing is copied yet)
    for slot in engine.param_slots():
        if slot.param in names and slot.end > slot.start:
            owned.setdefault(names[slot.param], []).append(slot)
    group = _data_parallel_group()
    distributed = torch.distributed.is_initialized() and group is not None
    root = torch.distributed.get_process_group_ranks(group)[0] if distributed else 0
    keeps = everywhere or not distributed or torch.distributed.get_rank() == root
    out = {}
    for param, name in names.items():  # the same order on every rank: one reduction per parameter
        shape = engine.full_shape(param)
        buf = torch.zeros(len(ADAM_KEYS), int(torch.Size(shape).numel()), dtype=torch.float32, device=device())
        for slot in owned.pop(name, []):  # none: this rank owns no element (ZeRO partitions can be empty)
            for row, key in enumerate(ADAM_KEYS):
                value = slot.main_param if key == "param" else slot.state.get(key)
                if value is not None:
                    buf[row, slot.start:slot.end] = value.reshape(-1).to(device=buf.device, dtype=torch.float32)
        if distributed and everywhere:
            torch.distributed.all_reduce(buf, group=group)
        elif distributed:
            torch.distributed.reduce(buf, dst=root, group=group)
        host = buf.cpu() if keeps else torch.empty(buf.shape, dtype=torch.float32)
        del buf
        out[name] = {key: host[row].reshape(shape) for row, key in enumerate(ADAM_KEYS)}
    return out, adam_step(engine)


@torch.no_grad()
def scatter_into_engine(optimizer, model_chunks: list, tensors: dict, step: int) -> int:
    """Write model-space Adam state (``gather_from_engine``'s form, or ``read_checkpoint``'s) into
    the ranges of ``optimizer``'s state this rank owns, and set its step. Returns the number of
    moment elements written. A parameter missing from ``tensors`` keeps its moments (a warning
    names it); a ``param`` entry (fp32 master) is optional: without it the master stays what the
    engine made of the loaded weights (an fp32 run's master is the weight)."""
    engine = as_engine(optimizer, model_chunks)
    engine.init_optimizer_state()
    names = param_names(model_chunks)
    written, missing = 0, []
    for slot in engine.param_slots():
        if slot.end <= slot.start:
            continue
        given = tensors.get(names.get(slot.param))
        if given is None:
            missing.append(names.get(slot.param, "?"))
            continue
        for key in ADAM_KEYS:
            target = slot.main_param if key == "param" else slot.state.get(key)
            if key not in given:
                continue
            if target is None:
                raise RuntimeError(f"{type(optimizer).__name__} keeps no {key} for {names.get(slot.param)} after "
                                   "initialising its state: cannot load AdamW state into it")
            source = given[key].reshape(-1)[slot.start:slot.end]
            target.copy_(source.to(device=target.device, dtype=target.dtype).view_as(target))
        written += slot.end - slot.start
    if missing:
        print_rank0(f"warning: no AdamW state given for {len(missing)} parameter(s) ({', '.join(missing[:3])}"
                    f"{', ...' if len(missing) > 3 else ''}): their moments start at zero")
    _set_adam_step(engine, step)
    return written


def model_sharded_tensors(model_sd: dict) -> list:
    """The model's ShardedTensors and ShardedTensorFactories (what has optimizer state)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [sh for sh in nested_values(model_sd) if isinstance(sh, (ShardedTensor, ShardedTensorFactory))]


def state_entry(sh, key: str, data: torch.Tensor):
    """``sh`` (a model entry) as the entry of its optimizer state ``key``: the same sharding,
    replica id and key scheme megatron-core's ``fully_reshardable`` format writes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    kwargs = dict(key=f"optimizer.state.{key}.{sh.key}", data=data, replica_id=sh.replica_id)
    if not isinstance(sh, ShardedTensorFactory):
        kwargs["dtype"] = data.dtype
    return replace(sh, **kwargs)


class ModelSpaceAdam:
    """Model-space Adam state as the ``optimizer`` of ``pretrain.checkpoint.save_checkpoint``: its
    tensors are saved next to the model's, in megatron-core's ``fully_reshardable`` keys, and its
    step in common.pt (``MARKER``)."""

    def __init__(self, model_chunks: list, tensors: dict, step: int):
        self.by_param = {p: tensors[n] for p, n in param_names(model_chunks).items() if n in tensors}
        self.step = int(step)

    def sharded_state_dict(self, model_sd: dict, is_loading: bool = False, metadata: dict | None = None) -> dict:
        assert not is_loading, "ModelSpaceAdam only writes; pretrain.checkpoint.adam.read_checkpoint reads"
        state = {}
        for i, sh in enumerate(model_sharded_tensors(model_sd)):
            given = self.by_param.get(sh.data)
            if given is not None:
                # on the host: the DCP writer takes host tensors, and the device has no room to spare
                state[i] = {key: state_entry(sh, key, given[key]) for key in ADAM_KEYS if key in given}
        return {"param_state": state, MARKER: {"step": self.step}}


def recorded_step(common: dict) -> int | None:
    """The Adam step recorded in a megatron-format checkpoint's common state: ours (``MARKER``) or
    megatron-core's (the distributed optimizer's param groups' ``step``, the non-distributed ones'
    ``common_step``; possibly chained)."""
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if MARKER in node:
                found.append(node[MARKER]["step"])
            if "common_step" in node:  # megatron-core's non-distributed optimizers
                found.append(node["common_step"])
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                if isinstance(group, dict) and "step" in group:
                    found.append(group["step"])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(common.get("optimizer", {}))
    return int(max(float(s) for s in found)) if found else None


_step_in = recorded_step  # the name tests/pretrain/engines/test_adam_state.py reads
