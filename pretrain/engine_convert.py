"""Convert a checkpoint between the engines (``tools/convert_checkpoint.py``).

``--to megatron``: a DeepSpeed checkpoint (``--engine deepspeed``) is consolidated through
DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights, gathered over the data-parallel
partitions of each TP rank), the TP shards are joined as megatron-core lays them out (``layout``:
qkv and fc2/proj split by rank, fc1 as ``[gate_r; up_r]`` per rank), and the result is written as
this system's resharding checkpoint (one process, TP=1) with the same trainer state: iteration,
data position, LR schedule, pruning state (masks, EMA, schedule ends) and lineage. The shrink
tool, HF export, evaluation and a megatron-engine resume read it like any other checkpoint.

What does not cross: the Adam moments (``zero_to_fp32`` consolidates parameters only), so a
run resumed from the converted checkpoint starts its moments at zero (``optimizer_state`` is
False in the trainer state; ``train.py`` then loads weights without optimizer and says so).

``--to deepspeed``: a megatron checkpoint is copied with its config set to ``--engine deepspeed``
and ``optimizer_state`` False; a DeepSpeed run started with ``--load`` of it (or of any
megatron-format checkpoint) loads the weights before DeepSpeed wraps the model (``train.py``),
then the trainer state, under any TP/DP layout (the DCP weights reshard); Adam moments restart.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import torch

from pretrain.config import PretrainConfig


class EngineConversionError(RuntimeError):
    """A checkpoint that cannot be converted as asked; the message says why."""


def _consolidated_per_tp_rank(engine_dir: str, tag: str, tp: int) -> list[dict]:
    """Per TP rank: {parameter name: full fp32 tensor of that rank's shard} via zero_to_fp32
    (which reads one model-parallel rank's files: each rank's are linked into a folder of its own
    under the names zero_to_fp32 expects of rank 0)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    source = os.path.join(engine_dir, tag)
    out = []
    for rank in range(tp):
        marker = f"mp_rank_{rank:02d}"
        with tempfile.TemporaryDirectory() as view:
            os.makedirs(os.path.join(view, tag))
            for name in os.listdir(source):
                if marker in name:
                    os.symlink(os.path.join(source, name),
                               os.path.join(view, tag, name.replace(marker, "mp_rank_00")))
            state = get_fp32_state_dict_from_zero_checkpoint(view, tag=tag)
        out.append({k: v.detach().float().clone() for k, v in state.items()})
    return out


def _join_tp(name: str, param: torch.nn.Parameter, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 tensor of ``param`` from its TP shards (in rank order)."""
    from pretrain import layout

    if len(shards) == 1 or not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # SwiGLU (every model here)
        halves = [layout.split_fc1(s) for s in shards]  # each rank: [gate_r; up_r]
        return layout.merge_fc1(torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
    return torch.cat(shards, dim=dim)


def deepspeed_to_megatron(load: str, save: str) -> dict:
    """Write ``save`` (a new folder) as a megatron-engine checkpoint of the DeepSpeed checkpoint
    under ``load`` (its newest valid one). Returns what was written."""
    from pretrain import checkpoint as ckpt
    from pretrain.engine_deepspeed import checkpoint_pickle_globals
    from pretrain.hf import _build_single

    start = time.time()
    folder = ckpt.find_checkpoint(load)
    if folder is None:
        raise EngineConversionError(f"--load {load}: no valid checkpoint there")
    engine_dir = os.path.join(folder, ckpt.ENGINE_DIR)
    if not os.path.isdir(engine_dir):
        raise EngineConversionError(f"{folder} is already a megatron-engine checkpoint (no {ckpt.ENGINE_DIR}/)")
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise EngineConversionError(f"--save {save} already exists; choose a new folder or remove it")
    state = ckpt.read_trainer_state(folder)
    cfg = PretrainConfig.from_dict(state["config"])
    vocab = int(state["vocab_size"])
    tp = int((state.get("layout") or {}).get("tp_size") or cfg.parallel.tensor_model_parallel_size)
    # zero_to_fp32 unpickles with weights_only=False: every file must hold data only
    tag_dir = os.path.join(engine_dir, ckpt.ENGINE_TAG)
    with torch.serialization.safe_globals(checkpoint_pickle_globals()):
        for name in sorted(os.listdir(tag_dir)):
            if name.endswith(".pt"):
                ckpt.load_without_code(os.path.join(tag_dir, name), os.path.join(tag_dir, name))
    per_rank = _consolidated_per_tp_rank(engine_dir, ckpt.ENGINE_TAG, tp)
    model = _build_single(cfg.model, vocab)
    with torch.no_grad():
        for name, param in model.named_parameters():
            missing = [r for r, d in enumerate(per_rank) if name not in d]
            if missing:
                raise EngineConversionError(f"{folder}: parameter {name} is missing on TP rank(s) {missing}")
            full = _join_tp(name, param, [d[name] for d in per_rank])
            if tuple(full.shape) != tuple(param.shape):
                raise EngineConversionError(f"{folder}: {name} joins to {tuple(full.shape)}, the model has "
                                            f"{tuple(param.shape)}")
            param.copy_(full)
    parallel = dataclasses.replace(cfg.parallel, engine="megatron", zero_stage=None, deepspeed_config=None,
                                   offload_optimizer=None)
    new_state = {**state, "config": dataclasses.replace(cfg, parallel=parallel).to_dict(), "layout": {},
                 "optimizer_state": False,
                 "converted_from": {"path": os.path.abspath(folder), "engine": "deepspeed"}}
    tmp = ckpt.staging_folder(save)
    try:
        written = ckpt.save_checkpoint(tmp, int(state["iteration"]), [model], None, new_state)
        ckpt.publish_folder(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"folder": os.path.join(save, os.path.basename(written)), "iteration": int(state["iteration"]),
            "parameters": sum(p.numel() for p in model.parameters()), "tp": tp, "seconds": time.time() - start,
            "note": "weights and trainer state (pruning state included); the Adam moments restart at zero"}


def megatron_to_deepspeed(load: str, save: str) -> dict:
    """Copy the megatron-format checkpoint under ``load`` to ``save`` for ``--engine deepspeed``."""
    from pretrain import checkpoint as ckpt

    start = time.time()
    folder = ckpt.find_checkpoint(load)
    if folder is None:
        raise EngineConversionError(f"--load {load}: no valid checkpoint there")
    if os.path.isdir(os.path.join(folder, ckpt.ENGINE_DIR)):
        raise EngineConversionError(f"{folder} is already a DeepSpeed checkpoint")
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise EngineConversionError(f"--save {save} already exists; choose a new folder or remove it")
    state = ckpt.read_trainer_state(folder)
    cfg = PretrainConfig.from_dict(state["config"])
    parallel = dataclasses.replace(cfg.parallel, engine="deepspeed", pipeline_model_parallel_size=1)
    iteration = int(state["iteration"])
    new_state = {**state, "config": dataclasses.replace(cfg, parallel=parallel).to_dict(), "optimizer_state": False,
                 "converted_from": {"path": os.path.abspath(folder), "engine": "megatron"}}
    tmp = ckpt.staging_folder(save)
    try:
        staged = tmp + "/" + os.path.basename(ckpt.iteration_dir(tmp, iteration)) + ".tmp"
        # the weights only: the DCP folder (its optimizer entries are not read) and the RNG states
        shutil.copytree(os.path.join(folder, ckpt.MODEL_OPTIM_DIR), os.path.join(staged, ckpt.MODEL_OPTIM_DIR))
        if os.path.isdir(os.path.join(folder, "rng")):
            shutil.copytree(os.path.join(folder, "rng"), os.path.join(staged, "rng"))
        torch.save(new_state, os.path.join(staged, ckpt.TRAINER_STATE))
        ckpt.publish_checkpoint(tmp, iteration, staged)
        ckpt.publish_folder(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"folder": ckpt.iteration_dir(save, iteration), "iteration": iteration,
            "parameters": cfg.model.num_parameters(int(state["vocab_size"]))["total"], "tp": None,
            "seconds": time.time() - start,
            "note": f"start it with python -m pretrain --engine deepspeed --load {save} (any TP x DP, PP 1); "
                    "the Adam moments restart at zero"}


def save_weights_for_shrink(trainer, root: str, trainer_state: dict) -> str:
    """Collective: this DeepSpeed run's weights as a weights-only checkpoint in the resharding
    (megatron) format under ``root/for_shrink``, with the trainer state (``optimizer_state``
    False): what the in-run shrink slices. The shrunk model continues under DeepSpeed with its
    weights, data position, LR schedule and pruning state; its Adam moments restart at zero (the
    DeepSpeed partitions are not sliced). Returns the folder written."""
    import contextlib

    import deepspeed

    from pretrain.checkpoint import save_checkpoint

    engine = trainer.optimizer
    params = list(engine.model.parameters())
    # ZeRO-3 holds partitions: gather the full (TP-local) tensors for megatron's sharded save
    gathered = deepspeed.zero.GatheredParameters(params) if engine.stage == 3 else contextlib.nullcontext()
    with gathered:
        return save_checkpoint(os.path.join(root, "for_shrink"), trainer.state.iteration, trainer.model_chunks,
                               None, {**trainer_state, "optimizer_state": False}, keep_last=1)

