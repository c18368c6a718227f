"""AdamW (megatron-core's optimizer, distributed across data-parallel ranks) and the LR schedule."""

from __future__ import annotations

import torch

from pretrain.config import OptimConfig, ParallelConfig, TrainConfig


def build_optimizer(model_chunks: list, optim: OptimConfig, parallel: ParallelConfig, train: TrainConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",  # megatron-core's "adam" is AdamW (decoupled weight decay)
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=train.bf16,
        params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, optim: OptimConfig, total_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = optim.lr_decay_iters or total_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_iters > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, optim.lr_warmup_iters + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=max(1, decay_iters // 10) if optim.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if optim.lr_decay_style == "WSD" else None,
    )
