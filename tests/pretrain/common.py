"""Helpers for trainer tests: a debug-model config and rank-side workers."""

from __future__ import annotations


from pretrain.config import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                             ParallelConfig, PretrainConfig, TrainConfig, MODEL_PRESETS)


def debug_config(data: dict, *, tp: int = 1, pp: int = 1, iters: int = 6, gbs: int = 8, mbs: int = 2,
                 save: str | None = None, load: str | None = None, save_interval: int | None = None,
                 exit_interval: int | None = None, tensorboard_dir: str | None = None,
                 seq_length: int = 64, **model_overrides) -> PretrainConfig:
    model = dict(MODEL_PRESETS["debug"], seq_length=seq_length)
    model.update(model_overrides)
    return PretrainConfig(
        model=ModelConfig(**model),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(data_path=[data["prefix"]], tokenizer_model=data["tokenizer"], split="98,2,0"),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, lr_warmup_iters=2, clip_grad=1.0),
        train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters, seed=7,
                          log_interval=1, exit_interval=exit_interval),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=save_interval),
        logging=LoggingConfig(tensorboard_dir=tensorboard_dir),
    )


def losses_of(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["history"]]


def full_params(summary: dict) -> dict:
    """Every parameter gathered into its full (TP=1, PP=1) form, keyed by checkpoint key."""
    from pretrain.model.build import unwrap
    from pretrain.model.init import _iter_sharded_tensors

    trainer = summary["trainer"]
    out = {}
    for chunk in trainer.model_chunks:
        for sh in _iter_sharded_tensors(unwrap(chunk).sharded_state_dict()):
            out.setdefault(sh.key, []).append((tuple(sh.global_offset), sh.data.detach().clone()))
    return out


def train_layouts(data: dict, layouts: list, iters: int) -> dict:
    """Rank worker: train the same run under several (tp, pp) layouts; losses per layout."""
    from pretrain.run.segments import run

    results = {}
    for tp, pp in layouts:
        summary = run(debug_config(data, tp=tp, pp=pp, iters=iters))
        results[(tp, pp)] = {"losses": losses_of(summary),
                             "grad_norms": [h["grad_norm"] for h in summary["history"]],
                             "layout": summary["layout"]}
    return results


def captured_step(chunk, estimator, tokens) -> None:
    """One forward/backward of a world-of-one model on ``tokens`` [batch, seq + 1] with the
    saliency estimator capturing (what a training step does around it)."""
    import torch

    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    chunk.zero_grad_buffer()
    estimator.begin_capture()
    losses = chunk(tokens[:, :-1], torch.arange(seq).expand(batch, seq), None, labels=tokens[:, 1:])
    losses.float().mean().backward()
    chunk.finish_grad_sync()
    estimator.end_capture()


def copy_shrunk_weights(small, masked_model, masks, shape) -> None:
    """Fill ``small`` (a model built at the shrunk shape) with the kept slices of ``masked_model``'s
    weights, in memory: the shrink's per-parameter slicing without a checkpoint."""
    import torch

    from pretrain.model.shrunk import shrink_parameter, source_name

    full = dict(masked_model.named_parameters())
    with torch.no_grad():
        for name, p in small.named_parameters():
            source = source_name(name, masks)
            p.copy_(shrink_parameter(source, full[source], masks, shape))
