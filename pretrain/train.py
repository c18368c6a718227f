"""Entry point: ``torchrun --nproc-per-node N -m pretrain [flags]`` (or ``python -m pretrain``).

Reads like the algorithm: validate the config, set up the process groups, build tokenizer, data,
model, optimizer and schedule, resume if asked, then ``Trainer.fit`` with its callbacks.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from pretrain.config import ConfigError, PretrainConfig


def run(cfg: PretrainConfig, extra_callbacks: list = (), plain_megatron_spec: bool = False) -> dict:
    """Train per ``cfg`` in this process (one rank of the launched world). Returns a summary.

    With in-run shrinking (``--shrink-at``) training runs in segments: a segment stops when the
    pruning callback asks for a shrink, the checkpoint is rewritten into the smaller model, and
    the next segment continues from it (same step, data position and LR schedule).
    """
    segments = []
    while True:
        summary = _run_segment(cfg, extra_callbacks, plain_megatron_spec)
        segments.append(summary)
        if summary.get("stop_reason") != "shrink":
            break
        cfg = _shrink_in_run(cfg, summary)
    if len(segments) > 1:
        summary = dict(segments[-1])
        summary["history"] = [h for seg in segments for h in seg["history"]]
        summary["segments"] = [{"iteration": s["iteration"], "params": s["params"],
                                "tokens_per_second": s["tokens_per_second"]} for s in segments]
        _print_shrink_speedup(segments)
    return summary


def _steps_per_second(history: list, last: bool) -> float:
    steps = history[-10:] if last else history[2:12]
    seconds = sum(h["step_seconds"] for h in steps)
    return sum(1 for _ in steps) / max(seconds, 1e-9)


def _print_shrink_speedup(segments: list) -> None:
    from pretrain.distributed import print_rank0

    segments = [s for s in segments if s["tokens_per_second"]["end"] > 0]  # a resumed shrink trains no step first
    if len(segments) < 2:
        return
    base = segments[0]["tokens_per_second"]["end"]
    for i, seg in enumerate(segments[1:], 1):
        now = seg["tokens_per_second"]["start"]
        print_rank0(f"segment {i}: {seg['params'] / 1e6:.3f} M parameters, "
                    f"{now:,.0f} tokens/s vs {base:,.0f} before shrinking: speed-up {now / max(base, 1e-9):.2f}x")


def _shrink_in_run(cfg: PretrainConfig, summary: dict) -> PretrainConfig:
    """Save, rewrite the checkpoint into the smaller model (rank 0), continue from it."""
    import dataclasses
    import functools
    import subprocess

    from pretrain.checkpoint import iteration_dir
    from pretrain.distributed import die_with_parent, print_rank0, single_process_environment

    trainer = summary["trainer"]
    checkpointer = next(c for c in trainer.callbacks if c.name == "checkpoint")
    checkpointer.save_now(trainer)
    it = trainer.state.iteration
    source = iteration_dir(cfg.checkpoint.save, it)
    target = os.path.join(cfg.checkpoint.save, f"shrunk_iter_{it:07d}")
    # the layout to continue on: the same, or the one --shrink-*-model-parallel-size asks for
    prune, parallel = cfg.prune, cfg.parallel
    new_parallel = dataclasses.replace(
        parallel,
        tensor_model_parallel_size=prune.shrink_tensor_parallel_size or parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=prune.shrink_pipeline_parallel_size or parallel.pipeline_model_parallel_size)
    ok = torch.tensor([1.0])
    output = ""
    if torch.distributed.get_rank() == 0:
        # a fresh process: the shrink runs in its own world of one
        env = single_process_environment()
        tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                            "reshard_checkpoint.py")
        layout = ["--target-tensor-parallel-size", str(new_parallel.tensor_model_parallel_size),
                  "--target-pipeline-parallel-size", str(new_parallel.pipeline_model_parallel_size)]
        # --overwrite: a resumed run that shrinks at the same step again rewrites its own target
        proc = subprocess.run([sys.executable, tool, "--load", source, "--save", target, "--shrink", "--overwrite",
                               *layout],
                              env=env, capture_output=True, text=True,
                              # killed with this rank, or a restarted run would race it for `target`
                              preexec_fn=functools.partial(die_with_parent, os.getpid()))
        output = proc.stdout + proc.stderr
        ok[0] = 1.0 if proc.returncode == 0 else 0.0
        print(next((line for line in proc.stdout.splitlines() if line.startswith("wrote")), output[-2000:]),
              flush=True)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item() < 1:
        raise RuntimeError(f"in-run shrink of {source} failed:\n{output[-3000:]}")
    del summary["trainer"], trainer
    if new_parallel != parallel:
        print_rank0(f"continuing on TP {new_parallel.tensor_model_parallel_size} x PP "
                    f"{new_parallel.pipeline_model_parallel_size} (was TP {parallel.tensor_model_parallel_size} x "
                    f"PP {parallel.pipeline_model_parallel_size})")
    print_rank0(f"continuing on the shrunk model from {target}")
    return dataclasses.replace(cfg, parallel=new_parallel, checkpoint=dataclasses.replace(
        cfg.checkpoint, load=target, use_checkpoint_args=True, finetune=False))


def _run_segment(cfg: PretrainConfig, extra_callbacks: list = (), plain_megatron_spec: bool = False) -> dict:
    from megatron.core import parallel_state as ps

    from pretrain import checkpoint as ckpt
    from pretrain.callbacks import CheckpointCallback, EvalCallback, LoggingCallback
    from pretrain.data import (
        MicroBatchIterator, blend_report, build_datasets, build_test_dataset, check_datasets,
        check_tokenizer_matches_data, load_tokenizer,
    )
    from pretrain.distributed import init_distributed, launch_environment, print_rank0, set_random_seed
    from pretrain.flops import training_flops_per_token
    from pretrain.init import deterministic_init
    from pretrain.model import build_model, check_activation_memory, unwrap
    from pretrain.optim import build_optimizer, build_scheduler
    from pretrain.trainer import Trainer

    _, world_size, _ = launch_environment()
    peeked = _peek_checkpoint(cfg)
    cfg = _with_checkpoint_model(cfg, peeked)
    cfg, pruning_note = _with_checkpoint_pruning(cfg, peeked)
    cfg.validate(world_size)
    tokenizer = load_tokenizer(cfg.data) if not cfg.data.mock_data or cfg.data.tokenizer_model else None
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    tokenizer_vocab = tokenizer.vocab_size if tokenizer else (cfg.model.vocab_size or 8192)
    vocab_size = checkpoint_vocab(peeked, tokenizer_vocab, tp) or cfg.model.padded_vocab_size(tokenizer_vocab, tp)
    if tokenizer is not None and not cfg.data.mock_data:
        check_tokenizer_matches_data(cfg.data, tokenizer)  # before any process group work
        if cfg.data.test_data_path:
            check_tokenizer_matches_data(cfg.data.test_data(), tokenizer)
    layout = init_distributed(tp, pp)
    if tokenizer is not None and not cfg.data.mock_data:
        check_datasets(cfg.data, tokenizer)  # before anything heavy is built
        if cfg.data.test_data_path:
            check_datasets(cfg.data.test_data(), tokenizer)
    set_random_seed(cfg.train.seed)
    dp = layout["dp_size"]
    total_iters = cfg.train.total_iters(cfg.model.seq_length)
    num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)

    counts = cfg.model.num_parameters(vocab_size)
    print_rank0(_plan(cfg, layout, vocab_size, counts, total_iters, num_microbatches))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # once, not on every rank
        for line in blend_report(cfg.data, total_iters * cfg.train.global_batch_size, cfg.model.seq_length):
            print_rank0(line)
    for note in ([pruning_note] if pruning_note else []) + _pruning_warnings(cfg, counts, total_iters, peeked):
        print_rank0(note)
    if cfg.train.dry_run:
        return {"dry_run": True, "parameters": counts, "layout": layout}

    check_activation_memory(cfg.model, cfg.train, vocab_size, tp, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    from pretrain.pruning.invariants import hidden_masking_possible

    # a model whose hidden mask can change needs mask-aware norms (not TE's fused ones)
    model_chunks = build_model(cfg.model, cfg.parallel, cfg.train, vocab_size,
                               hidden_masking=hidden_masking_possible(cfg.prune, _checkpoint_pruning_state(peeked)),
                               plain_megatron_spec=plain_megatron_spec)
    for chunk in model_chunks:
        deterministic_init(unwrap(chunk), cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
    optimizer = build_optimizer(model_chunks, cfg.optim, cfg.parallel, cfg.train)
    # the optimizer holds fp32 master copies (bf16) made before our init: refresh them
    if hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    scheduler = build_scheduler(optimizer, cfg.optim, total_iters)

    # what this model computes per token (a masked model computes at its full size)
    logger = LoggingCallback(cfg.train.log_interval, cfg.logging.tensorboard_dir,
                             flops_per_token=training_flops_per_token(cfg.model, vocab_size))
    callbacks = [logger, EvalCallback(cfg.train.eval_interval, cfg.train.eval_iters, logger),
                 *extra_callbacks]
    if cfg.prune.enabled:
        from pretrain.pruning.callback import PruningCallback
        from pretrain.pruning.masks import ModelShape

        m = cfg.model
        shape = ModelShape.from_config(m, vocab_size)
        total_tokens = total_iters * cfg.train.global_batch_size * m.seq_length
        # kept widths (and layers) must divide over every layout the run will use
        pruner = PruningCallback(cfg.prune, shape, math.lcm(tp, cfg.prune.shrink_tensor_parallel_size or tp),
                                 m.seq_length, cfg.train.global_batch_size, total_tokens,
                                 log_dir=cfg.logging.tensorboard_dir,
                                 pipeline_parallel=math.lcm(pp, cfg.prune.shrink_pipeline_parallel_size or pp))
        print_rank0(f"pruning: {pruner.initial_params / 1e6:.3f} M -> {pruner.final_params / 1e6:.3f} M "
                    f"parameters between {pruner.start_tokens:,} and {pruner.end_tokens:,} tokens "
                    f"({cfg.prune.ramp}), every {cfg.prune.interval} steps; saliency {cfg.prune.saliency}; "
                    f"types {','.join(cfg.prune.types)}; {cfg.prune.granularity}; align {pruner.constraints.align}")
        callbacks.insert(0, pruner)  # first: its step-end numbers feed the log line
    trainer_holder: dict = {}
    checkpointer = CheckpointCallback(
        cfg.checkpoint.save, cfg.checkpoint.save_interval, cfg.checkpoint.keep_last,
        cfg.train.exit_interval, cfg.checkpoint.exit_signal_handler,
        snapshot_fn=lambda: {**trainer_holder["t"].state_dict(), "config": cfg.to_dict(),
                             "layout": layout, "vocab_size": vocab_size,
                             **trainer_holder.get("lineage", {})},
    )
    callbacks.append(checkpointer)  # last: it saves what the others have updated

    resume_state = None
    if cfg.checkpoint.load:
        # an imported (convert_from_hf) checkpoint holds weights only: start from them, fresh
        finetune = cfg.checkpoint.finetune or bool(peeked and peeked[1].get("weights_only"))
        loaded = ckpt.load_checkpoint(
            peeked[0] if peeked else cfg.checkpoint.load, model_chunks, optimizer,
            load_optim=not (cfg.checkpoint.no_load_optim or finetune),
            load_rng=not (cfg.checkpoint.no_load_rng or finetune),
        )
        if loaded is None:
            print_rank0(f"no checkpoint found under --load {cfg.checkpoint.load}; starting from scratch")
        else:
            print_rank0(f"loaded checkpoint {loaded.folder} (iteration {loaded.trainer_state['iteration']})")
            if not finetune:
                resume_state = loaded.trainer_state
            # a shrunk or imported model stays marked as such in every later checkpoint
            trainer_holder["lineage"] = {k: loaded.trainer_state[k] for k in _LINEAGE_KEYS
                                         if loaded.trainer_state.get(k)}

    consumed = resume_state["consumed_samples"] if resume_state else 0
    datasets = None
    if tokenizer is not None or cfg.data.mock_data:
        train_samples = total_iters * cfg.train.global_batch_size
        eval_runs = (total_iters // cfg.train.eval_interval + 1) if cfg.train.eval_interval else 0
        valid_samples = eval_runs * cfg.train.eval_iters * cfg.train.global_batch_size
        datasets = build_datasets(cfg.data, tokenizer or _NullVocab(vocab_size), cfg.model.seq_length,
                                  cfg.train.seed, (train_samples, valid_samples, 0))
    train_ds, valid_ds = datasets[0], datasets[1]
    test_ds = build_test_dataset(cfg.data, tokenizer, cfg.model.seq_length) if tokenizer is not None else None
    dp_rank = ps.get_data_parallel_rank()
    train_iter = MicroBatchIterator(train_ds, consumed, cfg.train.micro_batch_size, dp_rank, dp)

    def valid_factory(consumed_valid: int):
        if valid_ds is None:
            return None
        return MicroBatchIterator(valid_ds, consumed_valid, cfg.train.micro_batch_size, dp_rank, dp)

    def test_factory():  # always from the first test sequence: every evaluation scores the same ones
        return MicroBatchIterator(test_ds, 0, cfg.train.micro_batch_size, dp_rank, dp)

    trainer = Trainer(
        config=cfg, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
        train_iterator=train_iter,
        valid_dataset_iterator_factory=valid_factory if valid_ds is not None else None,
        test_iterator_factory=test_factory if test_ds is not None else None,
        test_batches=(len(test_ds) // cfg.train.global_batch_size) if test_ds is not None else 0,
        callbacks=callbacks, num_microbatches=num_microbatches, total_iters=total_iters,
    )
    trainer_holder["t"] = trainer
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        if loaded.local_state:
            trainer.load_local_state_dict(loaded.local_state)
        checkpointer.last_saved_iteration = trainer.state.iteration
    elif cfg.prune.enabled and _checkpoint_pruning_state(peeked) is not None:
        # --finetune starts a fresh run, but the weights it loaded are pruned: keep their masks
        next(c for c in callbacks if c.name == "pruning").load_state_dict(_checkpoint_pruning_state(peeked))
    state = trainer.fit()
    if state.stop_reason:
        print_rank0(f"stopped at iteration {state.iteration}: {state.stop_reason}")
    if cfg.logging.tensorboard_dir:
        print_rank0(f"tensorboard logs: {os.path.abspath(cfg.logging.tensorboard_dir)} "
                    f"(view with: tensorboard --logdir {cfg.logging.tensorboard_dir})")
    params = sum(p.numel() for c in model_chunks for p in unwrap(c).parameters())
    if torch.distributed.is_initialized():
        t = torch.tensor([float(params)])
        torch.distributed.all_reduce(t)  # summed over all ranks; divide out the DP replicas
        params = int(t.item()) // max(layout["dp_size"], 1)
    tps = cfg.train.global_batch_size * cfg.model.seq_length
    return {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "history": logger.history, "stop_reason": state.stop_reason, "layout": layout,
            "trainer": trainer, "params": params,
            "tokens_per_second": {"start": tps * _steps_per_second(logger.history, last=False),
                                  "end": tps * _steps_per_second(logger.history, last=True)}}


def _checkpoint_pruning_state(peeked: tuple[str, dict] | None) -> dict | None:
    return ((peeked[1].get("callbacks") or {}).get("pruning") or None) if peeked else None


def _with_checkpoint_pruning(cfg: PretrainConfig, peeked: tuple[str, dict] | None) -> tuple[PretrainConfig, str]:
    """A checkpoint's pruning state is never dropped silently (DESIGN invariant 9).

    Resumed without --prune-* flags, the checkpoint's own pruning settings continue; with them,
    the flags' settings continue from the checkpoint's masks. --end-pruning keeps the masks but
    removes nothing more; --drop-pruning-state discards them. Returns the config and a note for
    the log saying which of these happened.
    """
    import dataclasses

    prune = cfg.prune
    state = _checkpoint_pruning_state(peeked)
    if prune.end_pruning and prune.drop_state:
        raise ConfigError("--end-pruning and --drop-pruning-state exclude each other: pick one")
    if state is None:
        if prune.end_pruning or prune.drop_state:
            flag = "--end-pruning" if prune.end_pruning else "--drop-pruning-state"
            where = f"the checkpoint {peeked[0]}" if peeked else "no checkpoint (--load)"
            raise ConfigError(f"{flag} applies to a checkpoint with pruning state, and {where} has none")
        return cfg, ""
    folder = peeked[0]
    if prune.drop_state:
        off = dataclasses.replace(prune, target_params=None, target_ratio=None, drop_state=True)
        return dataclasses.replace(cfg, prune=off), (
            f"--drop-pruning-state: the pruning state of {folder} is discarded; its pruned groups "
            "(zero weights) train again")
    if not prune.enabled:
        saved = PretrainConfig.from_dict(peeked[1]["config"]).prune
        adopted = dataclasses.replace(saved, end_pruning=prune.end_pruning, drop_state=False)
        if prune.end_pruning or prune.shrink_at or prune.shrink_auto:
            # the shrink is this command's decision when it says anything about it
            adopted = dataclasses.replace(
                adopted, shrink_at=prune.shrink_at, shrink_auto=prune.shrink_auto,
                shrink_every_fraction=prune.shrink_every_fraction,
                shrink_tensor_parallel_size=prune.shrink_tensor_parallel_size,
                shrink_pipeline_parallel_size=prune.shrink_pipeline_parallel_size)
        cfg = dataclasses.replace(cfg, prune=adopted)
        source = "its own pruning settings (no --prune-* flags given)"
    else:
        source = "the --prune-* settings of this command"
    if cfg.prune.end_pruning:
        return cfg, (f"--end-pruning: the masks of {folder} stay applied; no further groups are removed"
                     + ("" if cfg.prune.shrink_at or cfg.prune.shrink_auto else
                        " (shrink them with --shrink-at or tools/reshard_checkpoint.py --shrink)"))
    return cfg, (f"resuming the pruning state of {folder} with {source}; --end-pruning stops removing "
                 "groups, --drop-pruning-state discards the masks")


def _pruning_warnings(cfg: PretrainConfig, counts: dict, total_iters: int,
                      peeked: tuple[str, dict] | None) -> list[str]:
    """Pruning settings that would silently do nothing in this run."""
    prune = cfg.prune
    if not prune.enabled or prune.end_pruning:
        return []
    notes = []
    run_tokens = total_iters * cfg.train.global_batch_size * cfg.model.seq_length
    if prune.start_tokens >= run_tokens:
        notes.append(f"WARNING: the pruning window starts at {prune.start_tokens:,} tokens "
                     f"(--prune-start-tokens), after this run's last token ({run_tokens:,}): this run prunes nothing")
    resumed = _checkpoint_pruning_state(peeked) is not None
    if prune.target_params is not None and not resumed and prune.target_params >= counts["total"]:
        notes.append(f"WARNING: --prune-target-params {prune.target_params:,} is not below the model's "
                     f"{counts['total']:,} parameters: nothing will be pruned")
    return notes


# trainer-state keys that say where the model came from; carried into every later checkpoint
_LINEAGE_KEYS = ("shrink_history", "imported_from")


def _peek_checkpoint(cfg: PretrainConfig) -> tuple[str, dict] | None:
    """(folder, trainer state) of the checkpoint ``--load`` will use, found once per segment."""
    from pretrain.arguments import peek_checkpoint

    return peek_checkpoint(cfg.checkpoint.load)


def _with_checkpoint_model(cfg: PretrainConfig, peeked: tuple[str, dict] | None) -> PretrainConfig:
    """The model shape saved in the checkpoint: with --use-checkpoint-args, or always for a shrunk
    checkpoint (it carries its smaller shape; the run's flags describe the original model) and an
    imported one (its shape is the HF model's)."""
    import dataclasses

    use = cfg.checkpoint.use_checkpoint_args or (
        peeked is not None and any(peeked[1].get(k) for k in _LINEAGE_KEYS))
    if not use:
        return cfg
    if peeked is None:
        raise ConfigError("--use-checkpoint-args needs a valid checkpoint under --load")
    saved = PretrainConfig.from_dict(peeked[1]["config"])
    if cfg.checkpoint.use_checkpoint_args:
        return dataclasses.replace(cfg, model=saved.model)
    # the shape is the checkpoint's; the sequence length (no weights depend on it) stays the run's
    return dataclasses.replace(cfg, model=dataclasses.replace(saved.model, seq_length=cfg.model.seq_length))


def checkpoint_vocab(peeked: tuple[str, dict] | None, tokenizer_vocab: int, tp: int) -> int | None:
    """The padded vocabulary of the checkpoint to load, when it fits this TP size.

    Padding depends on TP (a multiple of make_vocab_size_divisible_by x TP); a checkpoint padded
    for another TP keeps its own size when that divides the new TP, so it loads unchanged.
    """
    if peeked is None or peeked[1].get("vocab_size") is None:
        return None
    folder, vocab = peeked[0], peeked[1]["vocab_size"]
    if vocab < tokenizer_vocab:
        raise ConfigError(f"--load {folder}: its vocabulary ({vocab}) is smaller than the tokenizer's "
                          f"({tokenizer_vocab}); use the tokenizer the checkpoint was trained with")
    if vocab % tp:
        raise ConfigError(f"--load {folder}: its padded vocabulary ({vocab}) is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    return int(vocab)


class _NullVocab:
    """Stand-in tokenizer for --mock-data runs without a tokenizer."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad, self.name, self.path = vocab_size, vocab_size - 1, vocab_size - 1, "mock", None
        self.unique_identifiers = {"class": "mock", "vocab": vocab_size}

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        return " ".join(map(str, ids))


def _plan(cfg: PretrainConfig, layout: dict, vocab_size: int, counts: dict, total_iters: int,
          num_microbatches: int) -> str:
    m, t = cfg.model, cfg.train
    tokens = total_iters * t.global_batch_size * m.seq_length
    lines = [
        "=" * 72,
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(query groups {m.query_groups}, head dim {m.head_dim}), FFN {m.ffn_hidden_size}, "
        f"vocab {vocab_size} (padded), seq {m.seq_length}, "
        f"{'untied' if m.untie_embeddings_and_output_weights else 'tied'} embeddings",
        f"parameters: {counts['total'] / 1e6:,.2f} M total, {counts['non_embedding'] / 1e6:,.2f} M "
        f"non-embedding ({counts['per_layer'] / 1e6:,.3f} M per layer)",
        f"layout: world {layout['world_size']} = TP {layout['tp_size']} x PP {layout['pp_size']} x "
        f"DP {layout['dp_size']}; backend {'nccl' if torch.cuda.is_available() else 'gloo (CPU)'}; "
        f"{'bf16' if t.bf16 else 'fp32'}",
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x DP {layout['dp_size']} "
        f"x {num_microbatches} micro-batches; {t.global_batch_size * m.seq_length:,} tokens/step",
        f"plan: {total_iters} iterations, {tokens / 1e6:,.2f} M tokens; lr {cfg.optim.lr} "
        f"({cfg.optim.lr_decay_style}, warmup {cfg.optim.lr_warmup_iters}, min {cfg.optim.min_lr})",
        f"data: {'mock' if cfg.data.mock_data else _data_summary(cfg.data.data_path)} split {cfg.data.split}",
        f"checkpoints: save {cfg.checkpoint.save} every {cfg.checkpoint.save_interval}; "
        f"load {cfg.checkpoint.load}",
        "=" * 72,
    ]
    return "\n".join(lines)


def _data_summary(data_path: list[str], most: int = 8) -> str:
    """``--data-path`` for the plan; a long blend (--data-args-path) as its ends and its length."""
    if len(data_path) <= most:
        return " ".join(data_path)
    return f"{' '.join(data_path[:4])} ... {' '.join(data_path[-2:])} ({len(data_path):,} items)"


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower())


def main(argv: list[str] | None = None) -> int:
    from data_prep.tokenizers import TokenizerError
    from pretrain.arguments import build_parser, config_from_args
    from pretrain.checkpoint import CheckpointError
    from pretrain.trainer import NonFiniteError

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    args = build_parser().parse_args(argv)
    os.environ["PRETRAIN_LAUNCHER"] = args.launcher  # read by launch_environment
    try:
        cfg = config_from_args(args)
        run(cfg)
    except (ConfigError, TokenizerError, CheckpointError, NonFiniteError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C, or one outside training): nothing saved since the last "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, MemoryError) as err:
        if not _is_out_of_memory(err):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: out of memory ({first_line}). Lower --micro-batch-size or --seq-length, or spread "
              "the model over more ranks (--tensor/pipeline-model-parallel-size)", file=sys.stderr, flush=True)
        return 2
    finally:
        from pretrain.distributed import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
