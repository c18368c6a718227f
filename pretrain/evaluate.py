"""Held-out perplexity of a checkpoint on an indexed dataset, under any TP/PP layout.

The checkpoint's model (a masked one with its masks, a shrunk or imported one with its own shape)
runs megatron-core's forward-only schedule over one epoch of the dataset's sequences (or the first
``max_samples``), split over the data-parallel ranks; the result is the mean next-token loss and
its exponential. Launch with ``torchrun`` for more than one rank (``tools/evaluate.py``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from data_prep.tokenizers import infer_tokenizer_type
from pretrain import checkpoint as ckpt
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.checkpoint.tokenizer import check_checkpoint_tokenizer, unpadded_vocab
from pretrain.config import ConfigError, DataConfig, ParallelConfig, PretrainConfig, TrainConfig
from pretrain.data import (TEST_SET_SEED, MicroBatchIterator, build_datasets, check_datasets, load_tokenizer,
                           require_index_cache)
from pretrain.distributed import init_distributed, launch_environment, set_random_seed
from pretrain.model.build import build_model
from pretrain.model.memory import check_model_fits, local_ranks
from pretrain.pruning.masks import ModelShape, build_local_masks
from pretrain.pruning.state import PruningState
from pretrain.resume import checkpoint_vocab
from pretrain.trainer import forward_step, global_mean_loss


def evaluate_perplexity(load: str, data_path: list[str], tokenizer_type: str | None = None,
                        tokenizer_model: str | None = None, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                        micro_batch_size: int = 1, seq_length: int | None = None,
                        max_samples: int | None = None, data_cache_path: str | None = None) -> dict:
    from megatron.core import parallel_state as ps

    stored, state, saved, data = _checkpoint_and_data(load, data_path, tokenizer_type, tokenizer_model)
    folder = stored.folder
    data = dataclasses.replace(data, data_cache_path=data_cache_path)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    tokenizer = load_tokenizer(data)
    check_checkpoint_tokenizer("--load", folder, state, tokenizer)
    model_cfg = dataclasses.replace(saved.model, seq_length=seq_length or saved.model.seq_length,
                                    unpadded_vocab_size=unpadded_vocab(saved.model, state, tokenizer.vocab_size))
    parallel.validate(model_cfg, launch_environment()[1])
    vocab = checkpoint_vocab(stored, tokenizer.vocab_size, tensor_parallel)
    check_model_fits(model_cfg.num_parameters(vocab)["total"] / (tensor_parallel * pipeline_parallel),
                     2 if saved.train.bf16 else 4, folder, "each rank's share of the weights",
                     "evaluate it over more ranks (--tensor/pipeline-model-parallel-size)", local_ranks=local_ranks(),
                     device=True)

    require_index_cache(data)
    layout = init_distributed(tensor_parallel, pipeline_parallel)
    # before the model is built and loaded: unreadable data, or ids the model cannot embed
    # (which TP>1 would mask in silence, reporting a perplexity of other data), stop here
    check_datasets(data, tokenizer)
    set_random_seed(saved.train.seed)
    chunks = load_model(stored, model_cfg, parallel, vocab)

    dp = layout["dp_size"]
    # the sequences do not depend on the checkpoint's --seed: every checkpoint (a run's, its export's
    # re-import, another arm's) is scored on the same ones
    test = build_datasets(data, tokenizer, model_cfg.seq_length, TEST_SET_SEED, (0, 0, None))[2]
    if test is None or len(test) == 0:
        raise ConfigError(f"--data-path {' '.join(data_path)}: no sequence of {model_cfg.seq_length} tokens")
    global_batch = micro_batch_size * dp
    available = min(len(test), max_samples or len(test))
    steps = available // global_batch
    if steps == 0:
        raise ConfigError(f"--data-path holds {available} sequences, fewer than one batch of {global_batch} "
                          f"(micro batch x data-parallel ranks); lower --micro-batch-size or --seq-length")
    iterator = MicroBatchIterator(test, 0, micro_batch_size, ps.get_data_parallel_rank(), dp)
    loss = _mean_loss(chunks, iterator, steps, model_cfg.seq_length, micro_batch_size)
    return {"loss": loss, "perplexity": math.exp(loss), "samples": steps * global_batch,
            "tokens": steps * global_batch * model_cfg.seq_length, "checkpoint": folder, "layout": layout}


def _checkpoint_and_data(load: str, data_path: list[str], tokenizer_type: str | None,
                         tokenizer_model: str | None) -> tuple[StoredCheckpoint, dict, PretrainConfig, DataConfig]:
    """The checkpoint (its trainer state and config), and the data config to score it on (the
    tokenizer the checkpoint recorded unless one is given)."""
    stored = StoredCheckpoint.open(load, "--load", ConfigError)
    recorded_type, recorded_model = stored.tokenizer_files or (stored.config.data.tokenizer_type, None)
    data = DataConfig(data_path=list(data_path), split="0,0,100",
                      tokenizer_type=tokenizer_type or (recorded_type if not tokenizer_model else
                                                        infer_tokenizer_type(tokenizer_model)),
                      tokenizer_model=tokenizer_model or recorded_model)
    data.validate()
    return stored, stored.trainer_state, stored.config, data


def load_model(stored: StoredCheckpoint, model_cfg, parallel: ParallelConfig, vocab: int) -> list:
    """The checkpoint's model in eval mode; a masked checkpoint computes as its masks say (the
    hidden mask lives in the norms)."""
    chunks = build_model(model_cfg, parallel, TrainConfig(bf16=stored.config.train.bf16), vocab, wrap_ddp=False)
    ckpt.load_checkpoint(stored, chunks, None, load_optim=False, load_rng=False)
    masks = PruningState.stored_masks(stored.trainer_state)
    if masks is not None:
        build_local_masks(chunks, masks, ModelShape.from_config(model_cfg, vocab)).apply_to_weights()
    for chunk in chunks:
        chunk.eval()
    return chunks


def _mean_loss(chunks: list, iterator, steps: int, seq_length: int, micro_batch_size: int) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterator, model=chunks, num_microbatches=1,
                seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
            total += global_mean_loss(losses)
    return total / steps
