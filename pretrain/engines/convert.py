"""Convert a checkpoint between the engines (``tools/convert_checkpoint.py``).

Both directions carry the whole training state: weights, the fp32 master weights and AdamW's
moments and step (in model space, ``pretrain.engines.adam_state``), and the trainer state (iteration, data
position, LR schedule, pruning state: masks, EMA, schedule ends; lineage).

``--to megatron``: a DeepSpeed checkpoint (``--engine deepspeed``) is consolidated through
DeepSpeed's own ``zero_to_fp32`` (each TP rank's data-parallel partitions reassembled: the masters
and, over the same flat layout, the moments), the TP shards are joined as megatron-core lays them
out (``layout``: qkv and fc2/proj split by rank, fc1 as ``[gate_r; up_r]`` per rank), and the
result is written as this system's resharding checkpoint (one process, TP=1) with the AdamW state
in megatron-core's model-space keys (``optimizer_state`` False: not megatron's optimizer format).
The shrink tool (which slices the moments too), HF export,
evaluation and a megatron-engine resume (any TP/PP/DP) read it.

``--to deepspeed``: a megatron checkpoint is copied with its config set to ``--engine deepspeed``;
a DeepSpeed run started with ``--load`` of it (or of any megatron-format checkpoint) loads the
weights and the model-space AdamW state before DeepSpeed partitions them (``pretrain.run.build``), then the
trainer state, under any TP/DP layout (the DCP tensors reshard). ``--to deepspeed`` of a
DeepSpeed checkpoint goes through the megatron format (``_repartition_deepspeed``): the way to
continue a DeepSpeed run on another layout (its ZeRO partitions are per rank).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import torch

from pretrain import checkpoint as ckpt
from pretrain.checkpoint.adam import has_adam_state
from pretrain.checkpoint.atomic import require_new_folder, staged, staged_checkpoint, staged_output
from pretrain.checkpoint.files import ENGINE_DIR, ENGINE_TAG, MODEL_OPTIM_DIR, RNG_DIR, TRAINER_STATE, iteration_dir
from pretrain.checkpoint.full_weights import build_single
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.checkpoint.trust import load_without_code
from pretrain.engines.adam_state import ModelSpaceAdam, gather_from_engine
from pretrain.engines.deepspeed import checkpoint_pickle_globals
from pretrain.errors import EngineConversionError
from pretrain.model import layout
from pretrain.model.memory import check_model_fits


def _zero_keys(stage: int) -> tuple[str, str]:
    """Where a ZeRO optimizer file keeps its flat fp32 master groups and torch AdamW's state dict."""
    return (("single_partition_of_fp32_groups", "base_optimizer_state") if stage <= 2 else
            ("fp32_flat_groups", "optimizer_state_dict"))


def _zero_flat_groups(states: list[dict], stage: int) -> dict:
    """Per state key, each DP rank's flat fp32 groups of the ZeRO optimizer files ``states``: the
    master weights (``param``) and torch AdamW's moments over the same flat partitions (none before
    the first applied step)."""
    masters, inner = _zero_keys(stage)
    out = {"param": [list(sd[masters]) for sd in states]}
    if all(sd[inner]["state"] for sd in states):
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = [[sd[inner]["state"][g][key] for g in range(len(sd[masters]))] for sd in states]
    return out


def _consolidate_one_rank(folder: str) -> tuple[dict, int]:
    """{name: {param, exp_avg, exp_avg_sq}} and the Adam step of the ZeRO files in ``folder`` (one
    model-parallel rank's, named as rank 0's)."""
    from collections import OrderedDict

    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(folder))
    # mmap: the files stay on disk until a tensor is read (checked to hold data only: deepspeed_to_megatron)
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
              for f in z.get_optim_files(folder)]
    stage = int(states[0]["zero_stage"])
    world = states[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if len(states) != world:
        raise EngineConversionError(f"{len(states)} ZeRO optimizer files, but a data-parallel world of {world}: "
                                    "the checkpoint is incomplete")
    inner = _zero_keys(stage)[1]
    step = int(float(states[0][inner]["state"][0]["step"])) if states[0][inner]["state"] else 0
    per_key = {}
    for key, flat_groups in _zero_flat_groups(states, stage).items():
        merged = OrderedDict()
        if stage <= 2:
            z._zero2_merge_trainable_params(merged, world, flat_groups, model_states,
                                            states[0].get("param_alignment_paddings"))
        else:
            z._zero3_merge_trainable_params(merged, world, flat_groups, model_states)
            merged = z.to_torch_tensor(merged)
        for alias, shared in model_states[0].shared_params:
            if shared in merged:
                merged[alias] = merged[shared]
        per_key[key] = merged
    return {name: {key: per_key[key][name].detach().float() for key in per_key} for name in per_key["param"]}, step


def _consolidated_per_tp_rank(engine_dir: str, tag: str, tp: int) -> tuple[list[dict], int]:
    """Per TP rank: {parameter name: {param, exp_avg, exp_avg_sq}} (full fp32 tensors of that
    rank's shard), and the Adam step. DeepSpeed's own ``zero_to_fp32`` reassembles the flat ZeRO
    partitions into parameters; it is given the moments' flat groups as well as the masters' (the
    same flat layout). It reads one model-parallel rank's files: each rank's are linked into a
    folder of its own under the names it expects of rank 0."""
    import deepspeed

    source = os.path.abspath(os.path.join(engine_dir, tag))  # linked from a temporary folder: an absolute target
    out, step = [], 0
    for rank in range(tp):
        marker = f"mp_rank_{rank:02d}"
        with tempfile.TemporaryDirectory() as view:
            folder = os.path.join(view, tag)
            os.makedirs(folder)
            for name in os.listdir(source):
                if marker in name:
                    os.symlink(os.path.join(source, name), os.path.join(folder, name.replace(marker, "mp_rank_00")))
            try:
                tensors, step = _consolidate_one_rank(folder)
            except EngineConversionError as err:
                raise EngineConversionError(f"{source}, TP rank {rank}: {err}") from None
            except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
                # another DeepSpeed version's layout, its BF16_Optimizer's files, an elastic checkpoint
                raise EngineConversionError(
                    f"{source}, TP rank {rank}: not a ZeRO-1/2/3 checkpoint this converter reads with DeepSpeed "
                    f"{deepspeed.__version__} ({type(err).__name__}: {err}); convert it with the DeepSpeed "
                    "version that wrote it, or resume it under --engine deepspeed on its own layout") from None
        out.append(tensors)
    return out, step


def _join_tp(name: str, param: torch.nn.Parameter, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 tensor of ``param`` from its TP shards (in rank order)."""
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
    start = time.time()
    stored = StoredCheckpoint.open(load, "--load", EngineConversionError)
    folder, state, cfg, vocab = stored.folder, stored.trainer_state, stored.config, stored.vocab_size
    engine_dir = os.path.join(folder, ENGINE_DIR)
    if stored.engine != "deepspeed":
        raise EngineConversionError(f"{folder} is already a megatron-engine checkpoint (no {ENGINE_DIR}/)")
    require_new_folder(save, "--save")
    check_model_fits(cfg.model.num_parameters(vocab)["total"], 8, folder,
                     "two fp32 copies (consolidated, and the model) in one process",
                     "convert it on a machine with more memory")
    tp = int((state.get("layout") or {}).get("tp_size") or cfg.parallel.tensor_model_parallel_size)
    # zero_to_fp32 unpickles with weights_only=False: every file must hold data only
    tag_dir = os.path.join(engine_dir, ENGINE_TAG)
    with torch.serialization.safe_globals(checkpoint_pickle_globals()):
        for name in sorted(os.listdir(tag_dir)):
            if name.endswith(".pt"):
                load_without_code(os.path.join(tag_dir, name), os.path.join(tag_dir, name))
    per_rank, step = _consolidated_per_tp_rank(engine_dir, ENGINE_TAG, tp)
    model = build_single(cfg.model, vocab)
    adam = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            missing = [r for r, d in enumerate(per_rank) if name not in d]
            if missing:
                raise EngineConversionError(f"{folder}: parameter {name} is missing on TP rank(s) {missing}")
            adam[name] = {key: _join_tp(name, param, [d[name][key] for d in per_rank]) for key in per_rank[0][name]}
            for d in per_rank:  # what is joined is not needed twice
                del d[name]
            full = adam[name]["param"]
            if tuple(full.shape) != tuple(param.shape):
                raise EngineConversionError(f"{folder}: {name} joins to {tuple(full.shape)}, the model has "
                                            f"{tuple(param.shape)}")
            param.copy_(full)
    parallel = dataclasses.replace(cfg.parallel, engine="megatron", zero_stage=None, deepspeed_config=None,
                                   offload_optimizer=None)
    new_state = {**state, "config": dataclasses.replace(cfg, parallel=parallel).to_dict(), "layout": {},
                 "optimizer_state": False,
                 "converted_from": {"path": os.path.abspath(folder), "engine": "deepspeed"}}
    with staged_output(save) as tmp:
        written = ckpt.save_checkpoint(tmp, int(state["iteration"]), [model], ModelSpaceAdam([model], adam, step),
                                       new_state)
    return {"folder": os.path.join(save, os.path.basename(written)), "iteration": int(state["iteration"]),
            "parameters": sum(p.numel() for p in model.parameters()), "tp": tp, "seconds": time.time() - start,
            "adam_step": step,
            "note": (f"weights, fp32 masters, Adam moments (step {step}) and trainer state (pruning state included)"
                     if any("exp_avg" in t for t in adam.values()) else
                     "weights, fp32 masters and trainer state (pruning state included); the checkpoint was "
                     "written before any optimizer step, so there are no Adam moments")}


def megatron_to_deepspeed(load: str, save: str) -> dict:
    """Copy the megatron-format checkpoint under ``load`` to ``save`` for ``--engine deepspeed``."""
    start = time.time()
    stored = StoredCheckpoint.open(load, "--load", EngineConversionError)
    if stored.engine == "deepspeed":
        return _repartition_deepspeed(stored.folder, save)
    folder, state, cfg = stored.folder, stored.trainer_state, stored.config
    carries = has_adam_state(folder)
    require_new_folder(save, "--save")
    parallel = dataclasses.replace(cfg.parallel, engine="deepspeed", pipeline_model_parallel_size=1)
    iteration = int(state["iteration"])
    new_state = {**state, "config": dataclasses.replace(cfg, parallel=parallel).to_dict(), "optimizer_state": False,
                 "converted_from": {"path": os.path.abspath(folder), "engine": "megatron"}}
    with staged_output(save) as tmp, staged_checkpoint(tmp, iteration) as staging:
        # the DCP folder (weights and megatron-core's model-space AdamW state, which a DeepSpeed run
        # reads) and the RNG states
        shutil.copytree(os.path.join(folder, MODEL_OPTIM_DIR), os.path.join(staging, MODEL_OPTIM_DIR))
        if os.path.isdir(os.path.join(folder, RNG_DIR)):
            shutil.copytree(os.path.join(folder, RNG_DIR), os.path.join(staging, RNG_DIR))
        torch.save(new_state, os.path.join(staging, TRAINER_STATE))
    return {"folder": iteration_dir(save, iteration), "iteration": iteration,
            "parameters": cfg.model.num_parameters(stored.vocab_size)["total"], "tp": None,
            "seconds": time.time() - start,
            "note": f"start it with python -m pretrain --engine deepspeed --load {save} (any TP x DP, PP 1); "
                    + ("the AdamW state carries over" if carries else
                       "it holds no AdamW state (weights only): the Adam moments start at zero")}


def _repartition_deepspeed(folder: str, save: str) -> dict:
    """A DeepSpeed checkpoint for ``--engine deepspeed`` on any layout (its ZeRO partitions are
    per rank of the layout that wrote it): through the layout-free megatron format, in a
    temporary folder beside ``save`` that is removed afterwards."""
    start = time.time()
    require_new_folder(save, "--save")
    with staged(os.path.abspath(save).rstrip("/") + ".megatron.tmp", temporary=True) as via:
        deepspeed_to_megatron(folder, via)
        summary = megatron_to_deepspeed(via, save)
    return {**summary, "seconds": time.time() - start, "note": "re-partitioned (the DeepSpeed checkpoint's ZeRO partitions consolidated, any "
                               "layout can load it); " + summary["note"]}


def save_weights_for_shrink(trainer, root: str, trainer_state: dict) -> str:
    """Collective: this DeepSpeed run's weights and AdamW state (model space, gathered from the
    ZeRO partitions: ``pretrain.engines.adam_state``) as a megatron-format checkpoint under
    ``root/for_shrink``, with the trainer state: what the in-run shrink slices. The shrunk model
    continues under DeepSpeed with its weights, sliced fp32 masters and Adam moments, data
    position, LR schedule and pruning state. Returns the folder written."""
    import contextlib

    import deepspeed

    engine = trainer.engine
    tensors, step = gather_from_engine(engine, trainer.model_chunks, everywhere=False)
    params = list(engine.model.parameters())
    # ZeRO-3 holds partitions: gather the full (TP-local) tensors for megatron's sharded save
    gathered = deepspeed.zero.GatheredParameters(params) if engine.stage == 3 else contextlib.nullcontext()
    with gathered:
        return ckpt.save_checkpoint(os.path.join(root, "for_shrink"), trainer.state.iteration, trainer.model_chunks,
                                    ModelSpaceAdam(trainer.model_chunks, tensors, step),
                                    {**trainer_state, "optimizer_state": False}, keep_last=1)
