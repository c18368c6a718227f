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


# what megatron-core's OptimizerParamScheduler stores and checks on load: the schedule itself
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                 "wd_incr_steps")


def schedule_settings(optim: OptimConfig, total_iters: int) -> dict:
    """The LR/weight-decay schedule of ``optim`` over a run of ``total_iters``, in the scheduler's
    own keys (``SCHEDULE_KEYS``, as its ``state_dict`` stores them, plus what it needs besides)."""
    decay_iters = optim.lr_decay_iters or total_iters
    return dict(
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
        wsd_decay_steps=max(1, decay_iters // 10) if optim.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if optim.lr_decay_style == "WSD" else None,
    )


def build_scheduler(optimizer, optim: OptimConfig, total_iters: int, override: bool = False):
    """megatron-core's scheduler. On resume it takes the checkpoint's schedule, or with ``override``
    (--override-opt_param-scheduler) keeps this one: ``resume.with_checkpoint_schedule`` has
    already made the two agree or refused the run, so nothing is dropped unsaid."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, **schedule_settings(optim, total_iters),
                                   use_checkpoint_opt_param_scheduler=not override,
                                   override_opt_param_scheduler=override)


def learning_rate_at(schedule: dict, step: int) -> float:
    """The LR after ``step`` steps of ``schedule`` (``SCHEDULE_KEYS``: ours or a checkpoint's)."""
    import types

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    probe = types.SimpleNamespace(param_groups=[{}])
    settings = {k: schedule[k] for k in SCHEDULE_KEYS}
    wsd = settings["lr_decay_style"] == "WSD"
    scheduler = OptimizerParamScheduler(
        probe, **settings, init_lr=0.0 if settings["lr_warmup_steps"] > 0 else settings["max_lr"],
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False,
        wsd_decay_steps=max(1, settings["lr_decay_steps"] // 10) if wsd else None,
        lr_wsd_decay_style="linear" if wsd else None)
    scheduler.step(increment=step)
    return float(probe.param_groups[0]["lr"])
