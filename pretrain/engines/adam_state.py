"""AdamW's state in model space: the one form in which it crosses engines and the in-run shrink.

Each engine keeps AdamW's state its own way: megatron-core's distributed optimizer in flat buffers
split over data-parallel ranks, DeepSpeed ZeRO in flat fp32 partitions (offloaded or not). Both
reach the same *model-space* state: per model parameter (its tensor-parallel shard, as the model
holds it) an fp32 master copy ``param`` and the two moments ``exp_avg`` / ``exp_avg_sq`` of the
parameter's shape, plus one Adam ``step``. That is also how megatron-core's ``fully_reshardable``
checkpoints store it (``optimizer.state.<key>.<model key>`` tensors sharded like the model's), so:

* a megatron-format checkpoint written from a DeepSpeed run (``ModelSpaceAdam``) holds the same
  tensors under the same keys: the shrink tool slices them like any other, and a run on either
  engine reads them back (``read_checkpoint`` + ``scatter_into_engine``);
* a DeepSpeed run started from a megatron engine's checkpoint reads the moments the megatron
  engine wrote (distributed optimizer or not; its step from the checkpoint's common state);
* ``tools/convert_checkpoint.py`` writes this form from DeepSpeed's ZeRO files.

Engines are reached only through ``pretrain.engines.slots.iter_param_slots`` (the range of
each flattened parameter this rank owns, with views of its master and moments), so moving state
needs no engine-specific code here: a gather is a sum over data-parallel ranks of zero-filled
tensors, a scatter writes each rank's own range.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

ADAM_KEYS = ("param", "exp_avg", "exp_avg_sq")
# common.pt entry of a checkpoint whose optimizer state is model-space Adam written by ModelSpaceAdam
MARKER = "model_space_adam"


def adam_step(optimizer) -> int:
    """The Adam step count of ``optimizer`` (0 before its first step): torch's Adam keeps it per
    state, the fused Adams of apex and Transformer Engine per param group."""
    from pretrain.engines.slots import torch_optimizers

    steps = set()
    for opt in torch_optimizers(optimizer):
        steps |= {float(s["step"]) for s in opt.state.values() if "step" in s}
        steps |= {float(g["step"]) for g in opt.param_groups if "step" in g}
    return int(max(steps)) if steps else 0


def _set_adam_step(optimizer, step: int) -> None:
    from pretrain.engines.slots import torch_optimizers

    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                # its own tensor per state (torch Adam increments it in place), float32 on the host
                # as torch's non-capturable Adam makes it
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=state["step"].device)
        for group in opt.param_groups:
            if "step" in group:  # apex / Transformer Engine FusedAdam
                group["step"] = int(step)


def ensure_adam_state(optimizer) -> None:
    """Give every Adam inside ``optimizer`` (megatron-core's or DeepSpeed's) the state its first
    step would create (zero moments, step 0) where it has none yet, so it can be written:
    megatron-core's own ``init_state_fn`` where the optimizer has one (it knows fused and
    precision-aware Adams), then the ``step`` torch's Adam keeps per state."""
    from pretrain.engines.slots import inner_optimizers, torch_optimizers

    for opt in inner_optimizers(optimizer):
        init = getattr(opt, "init_state_fn", None)
        if init is not None and getattr(opt, "optimizer", None) is not None:
            init(opt.optimizer, getattr(opt, "config", None))
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if hasattr(optimizer, "optimizer_state_params"):  # an engine adapter knows better than the groups
            params = optimizer.optimizer_state_params()
        else:
            params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            state = opt.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "step" not in state:
                state["step"] = torch.tensor(0.0)


def param_names(model_chunks: list) -> dict:
    """{parameter: name} over this rank's model chunks (names prefixed by the chunk's index when
    there are several: virtual pipeline stages reuse the same local names)."""
    from pretrain.model.build import unwrap

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
    from pretrain.distributed import device
    from pretrain.engines.slots import iter_param_slots

    names = {p: n for p, n in param_names(model_chunks).items() if p.requires_grad}
    owned: dict[str, list] = {}  # name -> this rank's slots of it (views: nothing is copied yet)
    for slot in iter_param_slots(optimizer):
        if slot.param in names and slot.end > slot.start:
            owned.setdefault(names[slot.param], []).append(slot)
    group = _data_parallel_group()
    distributed = torch.distributed.is_initialized() and group is not None
    root = torch.distributed.get_process_group_ranks(group)[0] if distributed else 0
    keeps = everywhere or not distributed or torch.distributed.get_rank() == root
    out = {}
    for param, name in names.items():  # the same order on every rank: one reduction per parameter
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)
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
    return out, adam_step(optimizer)


@torch.no_grad()
def scatter_into_engine(optimizer, model_chunks: list, tensors: dict, step: int) -> int:
    """Write model-space Adam state (``gather_from_engine``'s form, or ``read_checkpoint``'s) into
    the ranges of ``optimizer``'s state this rank owns, and set its step. Returns the number of
    moment elements written. A parameter missing from ``tensors`` keeps its moments (a warning
    names it); a ``param`` entry (fp32 master) is optional: without it the master stays what the
    engine made of the loaded weights (an fp32 run's master is the weight)."""
    from pretrain.distributed import print_rank0
    from pretrain.engines.slots import iter_param_slots

    ensure_adam_state(optimizer)
    names = param_names(model_chunks)
    written, missing = 0, []
    for slot in iter_param_slots(optimizer):
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
    _set_adam_step(optimizer, step)
    return written


def _model_sharded_tensors(model_sd: dict) -> list:
    """The model's ShardedTensors and ShardedTensorFactories (what has optimizer state)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [sh for sh in nested_values(model_sd) if isinstance(sh, (ShardedTensor, ShardedTensorFactory))]


def _state_entry(sh, key: str, data: torch.Tensor):
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
        assert not is_loading, "ModelSpaceAdam only writes; read_checkpoint reads"
        state = {}
        for i, sh in enumerate(_model_sharded_tensors(model_sd)):
            given = self.by_param.get(sh.data)
            if given is not None:
                # on the host: the DCP writer takes host tensors, and the device has no room to spare
                state[i] = {key: _state_entry(sh, key, given[key]) for key in ADAM_KEYS if key in given}
        return {"param_state": state, MARKER: {"step": self.step}}


def _common(folder: str) -> dict:
    from pretrain.checkpoint import MODEL_OPTIM_DIR, load_without_code

    path = os.path.join(folder, MODEL_OPTIM_DIR, "common.pt")
    return load_without_code(path, path) if os.path.isfile(path) else {}


def _step_in(common: dict) -> int | None:
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


def _stored_keys(folder: str) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    from pretrain.checkpoint import MODEL_OPTIM_DIR

    dcp = os.path.join(folder, MODEL_OPTIM_DIR)
    return set(FileSystemReader(dcp).read_metadata().state_dict_metadata) if os.path.isdir(dcp) else set()


# where each model-space key is stored: the distributed optimizer's masters are "param", the
# non-distributed mixed-precision optimizer's "fp32_param" (an fp32 one has none: the weight is it)
_STORED_AS = {"param": ("param", "fp32_param"), "exp_avg": ("exp_avg",), "exp_avg_sq": ("exp_avg_sq",)}


def has_adam_state(folder: str) -> bool:
    """Whether the megatron-format checkpoint ``folder`` holds model-space Adam state (written by
    the megatron engine, or by ``ModelSpaceAdam``): moments and a step."""
    keys = _stored_keys(folder)
    return any(k.startswith("optimizer.state.exp_avg.") for k in keys) and _step_in(_common(folder)) is not None


def read_checkpoint(folder: str, model_chunks: list) -> tuple[dict, int]:
    """Collective (DCP load): the model-space Adam state of ``folder`` for this rank's parameters
    (``gather_from_engine``'s form, on the host) and its step. The model must hold its full TP-local
    parameters (for ZeRO-3: before DeepSpeed partitions them)."""
    from megatron.core import dist_checkpointing

    from pretrain.checkpoint import MODEL_OPTIM_DIR, _model_sharded_state_dict, check_dcp_pickles

    names = param_names(model_chunks)
    stored = _stored_keys(folder)
    request, wanted = {}, {}
    for i, sh in enumerate(_model_sharded_tensors(_model_sharded_state_dict(model_chunks))):
        name = names.get(sh.data)
        if name is None:
            continue
        entries = {}
        for key, candidates in _STORED_AS.items():
            found = next((c for c in candidates if f"optimizer.state.{c}.{sh.key}" in stored), None)
            if found is not None:
                entries[key] = _state_entry(sh, found, torch.empty(sh.data.shape, dtype=torch.float32))
        if entries:
            wanted[i], request[i] = name, entries
    dcp = os.path.join(folder, MODEL_OPTIM_DIR)
    check_dcp_pickles(dcp)
    loaded = dist_checkpointing.load({"param_state": request}, dcp)["param_state"]
    step = _step_in(_common(folder))
    return {name: dict(loaded[i]) for i, name in wanted.items()}, int(step or 0)
