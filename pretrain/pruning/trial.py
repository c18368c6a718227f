"""A score of the model under other masks, and the model put back as it was: what the OBS probe
(``--prune-compensation-probe``) and Minitron's architecture search (``pretrain/pruning/search.py``)
measure before an event commits to its masks."""

from __future__ import annotations

from typing import Callable

from pretrain.engines.base import Engine
from pretrain.engines.megatron import as_engine
from pretrain.model.shape import GroupMasks, ModelShape
from pretrain.pruning.masks import build_local_masks


def loss_under_masks(trainer, shape: ModelShape, current: GroupMasks, trial: GroupMasks,
                     score: Callable[[], float]) -> float:
    """``score()`` with ``trial`` applied to the weights, then every weight put back and the norms
    given ``current`` again (a full copy of this rank's weights for the time of one score).
    Collective where ``score`` is."""
    chunks = trainer.model_chunks
    engine: Engine = as_engine(trainer.optimizer, chunks)
    params = [p for chunk in chunks for p in chunk.parameters()]
    saved = [p.detach().clone() for p in params]
    # a ZeRO-3 parameter's weights are its slot's partition (``values``); its engine masks those
    partitions = [slot.values for slot in engine.param_slots() if slot.values is not None]
    saved_partitions = [values.clone() for values in partitions]
    local = build_local_masks(chunks, trial, shape, engine.full_shape)
    local.apply_to_weights()
    if partitions:
        engine.mask_weights(local.param_masks)
    try:
        return score()
    finally:
        for values, s in zip(partitions, saved_partitions):
            values.copy_(s)
        for p, s in zip(params, saved):
            if p.data.shape == s.shape:
                p.data.copy_(s)
            else:  # a ZeRO-3 parameter the evaluation gathered (masked): the next forward gathers it again
                engine.release_gathered(p)
        build_local_masks(chunks, current, shape, engine.full_shape)  # the norms' mask back to the weights'
