"""A checkpoint's weights as whole (TP=1, PP=1) tensors in one process.

The checkpoint (any TP/PP; ``dist_checkpointing`` reshards on load) is read into a one-process
model (``build_single``); a checkpoint whose pruning masks remove anything comes back shrunk, its
weights sliced with ``pretrain.model.shrunk``. HF export (``pretrain.interop.hf_export``) writes
these tensors under HF names; the engine converter builds its one-process model the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pretrain import checkpoint as ckpt
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import ModelConfig, ParallelConfig, PretrainConfig, TrainConfig
from pretrain.distributed import init_distributed, set_random_seed
from pretrain.errors import ConversionError
from pretrain.model.build import build_model
from pretrain.model.memory import check_model_fits
from pretrain.model.shrunk import shrink_parameter, shrunk_model_config, shrunk_name
from pretrain.pruning.masks import ModelShape
from pretrain.pruning.state import PruningState


@dataclass
class FullWeights:
    """A checkpoint's parameters as full (TP=1, PP=1) tensors keyed by megatron-core names."""

    config: PretrainConfig
    vocab_size: int  # padded, as stored
    tensors: dict
    trainer_state: dict
    folder: str
    shrunk: bool


def build_single(model_cfg: ModelConfig, vocab: int, dtype: torch.dtype = torch.float32):
    """The whole model (TP=1, PP=1, no DDP wrapper) in this process, on a one-rank process group."""
    init_distributed(1, 1)
    set_random_seed(0)  # megatron's RNG tracker must exist before a forward pass
    train = TrainConfig(bf16=dtype == torch.bfloat16)
    return build_model(model_cfg, ParallelConfig(), train, vocab, use_te=False, wrap_ddp=False)[0]


def load_full_weights(load: str) -> FullWeights:
    """Read a checkpoint's weights; a checkpoint with pruning masks comes back shrunk."""
    stored = StoredCheckpoint.open(load, "--load", ConversionError)
    if stored.deepspeed_only:
        raise ConversionError(stored.deepspeed_only)
    folder, state, cfg, vocab = stored.folder, stored.trainer_state, stored.config, int(stored.vocab_size)
    check_model_fits(cfg.model.num_parameters(vocab)["total"], 4, folder, "fp32 weights in one process",
                     "convert it on a machine with more memory")
    model = build_single(cfg.model, vocab)
    ckpt.load_checkpoint(stored, [model], None, load_optim=False, load_rng=False)
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    masks = PruningState.stored_masks(state)
    if masks is None:
        return FullWeights(cfg, vocab, tensors, state, folder, shrunk=False)
    shape = ModelShape.from_config(cfg.model, vocab)
    if not PruningState.removes_groups(masks, shape):
        return FullWeights(cfg, vocab, tensors, state, folder, shrunk=False)
    small = {}
    for name, tensor in tensors.items():
        new_name = shrunk_name(name, masks)
        if new_name is not None:  # None: a dropped layer's
            small[new_name] = shrink_parameter(name, tensor, masks, shape)
    new_cfg = dataclasses.replace(cfg, model=shrunk_model_config(cfg.model, masks, shape))
    return FullWeights(new_cfg, vocab, small, state, folder, shrunk=True)
