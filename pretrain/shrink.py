"""Rewrite a checkpoint into the physically smaller architecture (and/or another TP/PP layout).

The source checkpoint (any TP/PP/DP: ``dist_checkpointing`` reshards on load) is loaded into a
TP=1/PP=1 model and optimizer in this process; every weight, its fp32 master copy and both Adam
moments are sliced to the kept groups with ``pretrain.state_adapter``; the smaller model and
optimizer are saved with the same iteration, consumed samples, LR schedule and pruning history,
and a config whose shape is the kept one and whose layout is the target TP/PP. A checkpoint
written here loads under any layout; the target layout is validated now so that a bad one fails
here, not on the cluster.

Uniform masks give a plain Llama shape; per-layer masks give a heterogeneous model (per-layer
query groups and FFN widths, ``ModelConfig.layer_shapes``, built through
``megatron_patches.per_layer_config``). Memory: the full model and optimizer are held once in
this process (not streamed tensor by tensor).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from pretrain.config import ConfigError, PretrainConfig


class ShrinkError(ValueError):
    """The checkpoint cannot be shrunk/resharded as asked; the message says why and what to do."""


def _shape_of(cfg: PretrainConfig, vocab: int):
    from pretrain.pruning.masks import ModelShape

    return ModelShape.from_config(cfg.model, vocab)


def _build(cfg: PretrainConfig, vocab: int):
    from pretrain.model import build_model
    from pretrain.optim import build_optimizer

    single = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    chunks = build_model(cfg.model, single, cfg.train, vocab)
    optimizer = build_optimizer(chunks, cfg.optim, single, cfg.train)
    return chunks, optimizer


def reshard_checkpoint(load: str, save: str, shrink: bool = False, target_tp: int | None = None,
                       target_pp: int | None = None, progress: bool = True) -> dict:
    """Importable entry point (one process). Returns a summary of what was written."""
    from pretrain import checkpoint as ckpt
    from pretrain.distributed import init_distributed
    from pretrain.model import unwrap
    from pretrain.pruning.masks import GroupMasks
    from pretrain.pruning.optim_state import iter_param_slots
    from pretrain.state_adapter import shrink_parameter, shrunk_model_config, source_name

    start = time.time()
    folder = ckpt.find_checkpoint(load)
    if folder is None:
        raise ShrinkError(f"--load {load}: no valid checkpoint there")
    if os.path.abspath(save) == os.path.abspath(load):
        raise ShrinkError("--save must differ from --load (the source checkpoint is kept)")
    state = ckpt.read_trainer_state(folder)
    cfg = PretrainConfig.from_dict(state["config"])
    vocab = int(state["vocab_size"])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise ShrinkError("reshard/shrink runs in a single process (launch it with python, not torchrun)")
    init_distributed(1, 1)
    pruning = state.get("callbacks", {}).get("pruning")
    masks = None
    if shrink:
        if not pruning:
            raise ShrinkError(f"{folder}: --shrink needs a checkpoint of a pruning run (no pruning state)")
        masks = GroupMasks.from_state_dict(pruning["masks"])

    # source model + optimizer at TP=1/PP=1, loaded from the checkpoint (any layout)
    src_chunks, src_opt = _build(cfg, vocab)
    ckpt.load_checkpoint(folder, src_chunks, src_opt, load_optim=True, load_rng=False)
    src_model = unwrap(src_chunks[0])

    new_model_cfg = cfg.model
    if shrink:
        shape = _shape_of(cfg, vocab)
        new_model_cfg = shrunk_model_config(cfg.model, masks, shape)
    tp = target_tp or cfg.parallel.tensor_model_parallel_size
    pp = target_pp or cfg.parallel.pipeline_model_parallel_size
    new_cfg = dataclasses.replace(
        cfg, model=new_model_cfg,
        parallel=dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    try:
        new_cfg.parallel.validate(new_model_cfg, tp * pp)
        new_model_cfg.validate()
    except ConfigError as err:
        raise ShrinkError(f"the {'shrunk ' if shrink else ''}model does not fit TP={tp} x PP={pp}: {err}") from None
    if vocab % tp:
        raise ShrinkError(f"the vocabulary ({vocab}, padded) is not divisible by TP={tp}")

    if shrink:
        dst_chunks, dst_opt = _build(new_cfg, vocab)
        ckpt._ensure_optimizer_state(dst_opt)
        dst_model = unwrap(dst_chunks[0])
        src_params = dict(src_model.named_parameters())
        names = {p: n for n, p in dst_model.named_parameters()}
        # load_checkpoint gave the source optimizer its state (``_ensure_optimizer_state`` + load)
        src_slots = {slot.param: slot for slot in iter_param_slots(src_opt)}
        dst_slots = list(iter_param_slots(dst_opt))
        total = len(dst_slots)
        with torch.no_grad():
            for i, slot in enumerate(dst_slots, 1):
                name = source_name(names[slot.param], masks)
                src_param = src_params[name]
                src_slot = src_slots[src_param]

                def sliced_flat(flat: torch.Tensor) -> torch.Tensor:
                    return shrink_parameter(name, flat.view(src_param.shape), masks, shape).reshape(-1)

                slot.param.copy_(shrink_parameter(name, src_param.detach(), masks, shape))
                if slot.main_param is not None and src_slot.main_param is not None:
                    slot.main_param.copy_(sliced_flat(src_slot.main_param))
                for key, value in slot.state.items():
                    src_value = src_slot.state.get(key)
                    if src_value is not None:
                        value.copy_(src_value if key == "step" else sliced_flat(src_value))
                if progress and (i == total or i % 10 == 0):
                    print(f"  shrink: {i}/{total} tensors", flush=True)
        out_chunks, out_opt = dst_chunks, dst_opt
    else:
        out_chunks, out_opt = src_chunks, src_opt

    new_state = dict(state)
    new_state["config"] = new_cfg.to_dict()
    # no per-rank state (RNG, fisher means) carries over a reshard: mark the layout as unknown
    new_state["layout"] = {"resharded_from": state.get("layout")}
    if shrink:
        new_state["callbacks"] = dict(state.get("callbacks", {}))
        new_state["callbacks"]["pruning"] = _shrunk_pruning_state(pruning, masks, shape.parameter_count(masks))
        history = list(state.get("shrink_history", []))
        history.append({"iteration": state["iteration"], "from": dataclasses.asdict(cfg.model),
                        "to": dataclasses.asdict(new_model_cfg)})
        new_state["shrink_history"] = history
    # the scheduler state, iteration and consumed samples are carried as saved
    path = ckpt.save_checkpoint(save, state["iteration"], out_chunks, out_opt, new_state)
    old_params = sum(p.numel() for p in src_model.parameters())
    new_params = sum(p.numel() for c in out_chunks for p in unwrap(c).parameters())
    return {"folder": path, "iteration": state["iteration"], "params_before": old_params,
            "params_after": new_params, "seconds": time.time() - start, "config": new_cfg}


def _packed_rows(table: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Per layer, the kept entries moved to the front (zero-padded to ``width``)."""
    out = torch.zeros(table.shape[0], width, dtype=table.dtype)
    for l in range(table.shape[0]):
        kept = table[l][keep[l]]
        out[l, :kept.numel()] = kept
    return out


def _shrunk_pruning_state(pruning: dict, masks, params_after: int) -> dict:
    """The pruning state re-expressed at the smaller shape: everything kept is now 'all'
    (per layer, the first kept-count entries; the rest, for narrower layers, do not exist)."""
    from pretrain.pruning.masks import GroupMasks

    alive = masks.layers
    groups, ffn = masks.heads[alive].sum(1), masks.ffn[alive].sum(1)
    g_max, f_max = int(groups.max()), int(ffn.max())
    new_masks = GroupMasks(torch.arange(g_max)[None, :] < groups[:, None],
                           torch.arange(f_max)[None, :] < ffn[:, None],
                           torch.ones(int(masks.hidden.sum()), dtype=torch.bool))
    ema = pruning.get("ema")
    if ema is not None:
        ema = {"heads": _packed_rows(ema["heads"][alive], masks.heads[alive], g_max),
               "ffn": _packed_rows(ema["ffn"][alive], masks.ffn[alive], f_max),
               "hidden": ema["hidden"][masks.hidden]}
    return {**pruning, "masks": new_masks.state_dict(), "ema": ema, "shrunk_at_params": params_after}
