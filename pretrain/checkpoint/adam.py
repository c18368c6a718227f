"""Model-space AdamW state (``pretrain.engines.adam_state``) read out of a megatron-format
checkpoint folder: whether it holds some, and this rank's share of it."""

from __future__ import annotations

import os

import torch

from pretrain.checkpoint import MODEL_OPTIM_DIR, model_sharded_state_dict, check_dcp_pickles, load_without_code
from pretrain.engines.adam_state import model_sharded_tensors, param_names, recorded_step, state_entry

# where each model-space key is stored: the distributed optimizer's masters are "param", the
# non-distributed mixed-precision optimizer's "fp32_param" (an fp32 one has none: the weight is it)
_STORED_AS = {"param": ("param", "fp32_param"), "exp_avg": ("exp_avg",), "exp_avg_sq": ("exp_avg_sq",)}


def _common(folder: str) -> dict:
    path = os.path.join(folder, MODEL_OPTIM_DIR, "common.pt")
    return load_without_code(path, path) if os.path.isfile(path) else {}


def _stored_keys(folder: str) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    dcp = os.path.join(folder, MODEL_OPTIM_DIR)
    return set(FileSystemReader(dcp).read_metadata().state_dict_metadata) if os.path.isdir(dcp) else set()


def has_adam_state(folder: str) -> bool:
    """Whether the megatron-format checkpoint ``folder`` holds model-space Adam state (written by
    the megatron engine, or by ``ModelSpaceAdam``): moments and a step."""
    keys = _stored_keys(folder)
    return any(k.startswith("optimizer.state.exp_avg.") for k in keys) and recorded_step(_common(folder)) is not None


def read_checkpoint(folder: str, model_chunks: list) -> tuple[dict, int]:
    """Collective (DCP load): the model-space Adam state of ``folder`` for this rank's parameters
    (``gather_from_engine``'s form, on the host) and its step. The model must hold its full TP-local
    parameters (for ZeRO-3: before DeepSpeed partitions them)."""
    from megatron.core import dist_checkpointing

    names = param_names(model_chunks)
    stored = _stored_keys(folder)
    request, wanted = {}, {}
    for i, sh in enumerate(model_sharded_tensors(model_sharded_state_dict(model_chunks))):
        name = names.get(sh.data)
        if name is None:
            continue
        entries = {}
        for key, candidates in _STORED_AS.items():
            found = next((c for c in candidates if f"optimizer.state.{c}.{sh.key}" in stored), None)
            if found is not None:
                entries[key] = state_entry(sh, found, torch.empty(sh.data.shape, dtype=torch.float32))
        if entries:
            wanted[i], request[i] = name, entries
    dcp = os.path.join(folder, MODEL_OPTIM_DIR)
    check_dcp_pickles(dcp)
    loaded = dist_checkpointing.load({"param_state": request}, dcp)["param_state"]
    step = recorded_step(_common(folder))
    return {name: dict(loaded[i]) for i, name in wanted.items()}, int(step or 0)
