"""Entry point: ``torchrun --nproc-per-node N -m pretrain [flags]`` (or ``python -m pretrain``).

Reads like the algorithm: validate the config, set up the process groups, build tokenizer, data,
model, optimizer and schedule, resume if asked, then ``Trainer.fit`` with its callbacks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch

from data_prep.tokenizers import TokenizerError
from pretrain import checkpoint as ckpt
from pretrain.callbacks import CheckpointCallback, EvalCallback, LoggingCallback
from pretrain.checkpoint import adam as checkpoint_adam
from pretrain.checkpoint.files import iteration_dir
from pretrain.checkpoint.stored import StoredCheckpoint, lineage
from pretrain.config import ConfigError, PretrainConfig
from pretrain.data import (MicroBatchIterator, blend_report, build_datasets, build_test_dataset, check_datasets,
                           check_tokenizer_matches_data, load_tokenizer, require_index_cache)
from pretrain.distill import add_distillation, plan_line, resolve_teacher
from pretrain.distributed import (destroy_distributed, device, init_distributed, is_rank0, launch_environment,
                                  print_rank0, set_random_seed)
from pretrain.engines.adam_state import scatter_into_engine
from pretrain.engines.convert import save_weights_for_shrink
from pretrain.engines.deepspeed import build_deepspeed_engine
from pretrain.engines.megatron import MegatronEngine
from pretrain.engines.optim import build_scheduler
from pretrain.errors import UserError
from pretrain.model.build import build_model, check_activation_memory, unwrap, zero_padded_vocab_rows
from pretrain.model.flops import training_flops_per_token
from pretrain.model.init import deterministic_init
from pretrain.model.invariants import hidden_masking_possible
from pretrain.model.memory import check_training_memory
from pretrain.nodes import check_run_folders, ranks_on_this_host
from pretrain.outputs import require_writable
from pretrain.pruning.callback import PruningCallback
from pretrain.pruning.masks import ModelShape
from pretrain.resume import (check_checkpoint_tokenizer, checkpoint_vocab, tokenizer_record, with_checkpoint_distill,
                             with_checkpoint_model, with_checkpoint_pruning, with_checkpoint_schedule,
                             with_unpadded_vocab)
from pretrain.run import run_lock
from pretrain.run.arguments import build_parser, config_and_checkpoint_from_args
from pretrain.shrink import ShrinkError, reshard_checkpoint
from pretrain.trainer import Trainer


def run(cfg: PretrainConfig, extra_callbacks: list = (), plain_megatron_spec: bool = False,
        checkpoint: StoredCheckpoint | None = None) -> dict:
    """Train per ``cfg`` in this process (one rank of the launched world). Returns a summary.
    ``checkpoint``: the --load checkpoint when the caller found it already (the command line
    does), so that a run looks for it once.

    With in-run shrinking (``--shrink-at``) training runs in segments: a segment stops when the
    pruning callback asks for a shrink, the checkpoint is rewritten into the smaller model, and
    the next segment continues from it (same step, data position and LR schedule).
    """
    for flag, path in (("--save", cfg.checkpoint.save), ("--tensorboard-dir", cfg.logging.tensorboard_dir)):
        if path:  # found now, not at the first save after hours of training
            require_writable(path, flag)
    require_index_cache(cfg.data)
    segments = []
    try:
        while True:
            summary = _run_segment(cfg, extra_callbacks, plain_megatron_spec, checkpoint)
            checkpoint = None  # the next segment loads another checkpoint: the shrunk one
            segments.append(summary)
            if summary.get("stop_reason") != "shrink":
                break
            cfg = _shrink_in_run(cfg, summary)
    finally:
        run_lock.release_all()  # the output folders are free for the next run
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
    trainer = summary.pop("trainer")
    next(c for c in trainer.callbacks if c.name == "checkpoint").save_now(trainer)
    it = trainer.state.iteration
    source = iteration_dir(cfg.checkpoint.save, it)
    if cfg.parallel.engine == "deepspeed":
        # the shrink slices the resharding (megatron) format: the weights go there too (collective)
        source = save_weights_for_shrink(trainer, cfg.checkpoint.save, next(
            c for c in trainer.callbacks if c.name == "checkpoint").snapshot_fn(trainer))
    target = os.path.join(cfg.checkpoint.save, f"shrunk_iter_{it:07d}")
    parallel = _parallel_after_shrink(cfg)
    failure = ""
    if is_rank0():
        # In this process: the shrink streams the checkpoint through one process and issues no
        # collective (its DCP writes are single-process), so it needs no world of its own. The
        # other ranks wait in the all-reduce below. --overwrite semantics: a resumed run that
        # shrinks at the same step again rewrites its own target.
        failure = _shrink_checkpoint(source, target, parallel)
    ok = torch.tensor([0.0 if failure else 1.0], device=device())
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item() < 1:
        raise RuntimeError(f"in-run shrink of {source} failed" + (f": {failure}" if failure else " on rank 0"))
    del trainer
    if parallel != cfg.parallel:
        print_rank0(f"continuing on TP {parallel.tensor_model_parallel_size} x PP "
                    f"{parallel.pipeline_model_parallel_size} (was TP {cfg.parallel.tensor_model_parallel_size} x "
                    f"PP {cfg.parallel.pipeline_model_parallel_size})")
    print_rank0(f"continuing on the shrunk model from {target}")
    return dataclasses.replace(cfg, parallel=parallel, checkpoint=dataclasses.replace(
        cfg.checkpoint, load=target, use_checkpoint_args=True, finetune=False))


def _parallel_after_shrink(cfg: PretrainConfig):
    """The layout to continue on: the same, or the one --shrink-*-model-parallel-size asks for."""
    prune, parallel = cfg.prune, cfg.parallel
    return dataclasses.replace(
        parallel,
        tensor_model_parallel_size=prune.shrink_tensor_parallel_size or parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=prune.shrink_pipeline_parallel_size or parallel.pipeline_model_parallel_size)


def _shrink_checkpoint(source: str, target: str, parallel) -> str:
    """Shrink ``source`` into ``target`` (rank 0 only); returns '' or what went wrong."""
    try:
        r = reshard_checkpoint(source, target, shrink=True, target_tp=parallel.tensor_model_parallel_size,
                               target_pp=parallel.pipeline_model_parallel_size, overwrite=True)
    except (ShrinkError, ckpt.CheckpointError, OSError) as err:
        print(f"error: in-run shrink of {source}: {err}", flush=True)
        return str(err)
    print(f"wrote {r['folder']} (iteration {r['iteration']}): {r['params_before'] / 1e6:.3f} M -> "
          f"{r['params_after'] / 1e6:.3f} M parameters; {r['seconds']:.1f}s", flush=True)
    return ""


def _run_segment(cfg: PretrainConfig, extra_callbacks: list = (), plain_megatron_spec: bool = False,
                 checkpoint: StoredCheckpoint | None = None) -> dict:
    """One stretch of training on one model: from the config and the --load checkpoint to a stop."""
    # the one look for it (unless the command line looked already): every step below reads this one
    stored = checkpoint or StoredCheckpoint.find(cfg.checkpoint.load)
    cfg, pruning_note = _resolve_config(cfg, stored)
    cfg, tokenizer, vocab_size = _tokenizer_and_vocab(cfg, stored)
    _check_tokenizer(cfg, tokenizer, stored)  # before any process group work
    teacher = _resolve_teacher(cfg, vocab_size, tokenizer)  # --kd-teacher: checked before any process group
    layout = init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    _hold_output_folders(cfg)  # one run per --save: before anything is written there
    # several nodes: shared folders, not node-local ones (a dry run creates nothing)
    check_run_folders(None if cfg.train.dry_run else cfg.checkpoint.save, cfg.checkpoint.load,
                      (stored.folder, stored.trainer_state) if stored else None)
    _check_data(cfg, tokenizer)  # before anything heavy is built
    cfg, schedule_note = with_checkpoint_schedule(cfg, stored)  # after the data: a wrong dataset is the worse news
    pruning_note = "\n".join(n for n in (pruning_note, schedule_note) if n)
    set_random_seed(cfg.train.seed)
    counts = cfg.model.num_parameters(vocab_size)
    _print_plan(cfg, layout, vocab_size, counts, stored, pruning_note)
    if cfg.train.dry_run:
        return {"dry_run": True, "parameters": counts, "layout": layout}
    check_training_memory(cfg, vocab_size, layout["dp_size"], teacher)  # before anything is allocated

    model_chunks, engine, scheduler = _build_model_and_engine(cfg, vocab_size, plain_megatron_spec, stored)
    resume = _load_checkpoint(cfg, stored, model_chunks, engine)
    callbacks = _build_callbacks(cfg, layout, vocab_size, extra_callbacks, {**resume.lineage,
                                                                            **tokenizer_record(tokenizer)})
    if teacher is not None:
        callbacks = add_distillation(cfg, teacher, callbacks, stored.pruning if stored else None)
    trainer = _build_trainer(cfg, layout, tokenizer, vocab_size, model_chunks, engine, scheduler,
                             callbacks, resume)
    _restore_state(cfg, trainer, resume, stored)
    if cfg.train.skip_train:  # --skip-train: the loaded model measured on the run's batches, nothing saved
        return {"skip_train": True, "evaluation": _callback(trainer, "eval").evaluate_now(trainer), "layout": layout}
    if cfg.prune.enabled:
        print_rank0(_callback(trainer, "pruning").plan_line())  # after the restore: the schedule's true ends
    state = trainer.fit()
    _print_end(cfg, state)
    return _segment_summary(cfg, trainer, layout)


def _hold_output_folders(cfg: PretrainConfig) -> None:
    """--save and --tensorboard-dir for this run alone (``pretrain.run.run_lock``): rank 0 takes their
    locks, and every rank stops with the same message when another live run holds one or a folder
    cannot be written (found now, not at the first save after hours of training)."""
    message = ""
    if is_rank0():
        for folder, flag in ((cfg.checkpoint.save, "--save"), (cfg.logging.tensorboard_dir, "--tensorboard-dir")):
            if cfg.train.dry_run and folder and not os.path.isdir(folder):
                continue  # a dry run creates nothing, and nobody else writes there yet
            try:
                note = run_lock.acquire(folder, flag, " ".join(sys.argv)) if folder else ""
            except run_lock.FolderInUseError as err:
                message = str(err)
            except OSError as err:
                message = (f"{flag} {folder}: this run cannot write there ({err.strerror or err}): give a folder "
                           "it can write")
            else:
                if note:
                    print(note, flush=True)
            if message:
                break
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shared = [message]
        torch.distributed.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message:
        raise ConfigError(message)


def _resolve_config(cfg: PretrainConfig, stored: StoredCheckpoint | None) -> tuple[PretrainConfig, str]:
    """The run's config with what the --load checkpoint decides (shape, pruning), validated."""
    cfg = with_checkpoint_model(cfg, stored)
    cfg, pruning_note = with_checkpoint_pruning(cfg, stored)
    cfg, distill_note = with_checkpoint_distill(cfg, stored)
    pruning_note = "\n".join(n for n in (pruning_note, distill_note) if n)
    cfg.validate(launch_environment()[1])
    return cfg, pruning_note


def _tokenizer_and_vocab(cfg: PretrainConfig, stored: StoredCheckpoint | None) -> tuple:
    """The config with the model's unpadded vocabulary, the tokenizer (None for mock data without
    one) and the model's padded vocabulary."""

    tokenizer = load_tokenizer(cfg.data) if not cfg.data.mock_data or cfg.data.tokenizer_model else None
    tp = cfg.parallel.tensor_model_parallel_size
    tokenizer_vocab = tokenizer.vocab_size if tokenizer else (cfg.model.vocab_size or 8192)
    vocab_size = checkpoint_vocab(stored, tokenizer_vocab, tp) or cfg.model.padded_vocab_size(tokenizer_vocab, tp)
    return with_unpadded_vocab(cfg, stored, tokenizer_vocab), tokenizer, vocab_size


def _resolve_teacher(cfg: PretrainConfig, vocab_size: int, tokenizer):
    rank, world_size, _ = launch_environment()
    teacher = resolve_teacher(cfg, vocab_size, tokenizer, world_size)
    if teacher is not None and rank == 0:
        print(plan_line(cfg.distill, teacher), flush=True)
    return teacher


def _check_tokenizer(cfg: PretrainConfig, tokenizer, stored: StoredCheckpoint | None) -> None:
    """The tokenizer against every dataset's manifest and the --load checkpoint's, on every rank
    (a mismatch stops all ranks with its message before a collective could hang)."""
    if tokenizer is not None:
        check_tokenizer_matches_data(cfg.data, tokenizer)
    if stored:
        check_checkpoint_tokenizer("--load", stored.folder, stored.trainer_state, tokenizer)


def _check_data(cfg: PretrainConfig, tokenizer) -> None:
    if tokenizer is not None and not cfg.data.mock_data:
        check_datasets(cfg.data, tokenizer)
        if cfg.data.test_data_path:
            check_datasets(cfg.data.test_data(), tokenizer)


def _print_plan(cfg: PretrainConfig, layout: dict, vocab_size: int, counts: dict, stored: StoredCheckpoint | None,
                pruning_note: str) -> None:
    print_rank0(_plan(cfg, layout, vocab_size, counts, _num_microbatches(cfg, layout)))
    if is_rank0():  # the report reads every dataset's index: once, not on every rank
        for line in blend_report(cfg.data, cfg.total_iters() * cfg.train.global_batch_size, cfg.model.seq_length):
            print_rank0(line)
    for note in ([pruning_note] if pruning_note else []) + _pruning_warnings(cfg, counts, cfg.total_iters(), stored):
        print_rank0(note)


def _num_microbatches(cfg: PretrainConfig, layout: dict) -> int:
    return cfg.train.micro_batches_per_step(layout["dp_size"])


def _build_model_and_engine(cfg: PretrainConfig, vocab_size: int, plain_megatron_spec: bool,
                            stored_checkpoint: StoredCheckpoint | None) -> tuple:
    """(this rank's model chunks, the engine that trains them, the LR schedule)."""
    check_activation_memory(cfg.model, cfg.train, vocab_size, cfg.parallel.tensor_model_parallel_size,
                            ranks_on_this_host())
    # a model whose hidden mask can change needs mask-aware norms (not TE's fused ones)
    stored = stored_checkpoint.pruning if stored_checkpoint else None
    model_chunks = build_model(cfg.model, cfg.parallel, cfg.train, vocab_size,
                               hidden_masking=hidden_masking_possible(cfg.prune, stored),
                               plain_megatron_spec=plain_megatron_spec,
                               wrap_ddp=cfg.parallel.engine != "deepspeed")  # DeepSpeed does DP itself
    for chunk in model_chunks:
        deterministic_init(unwrap(chunk), cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
        zero_padded_vocab_rows(unwrap(chunk), cfg.model.unpadded_vocab_size, vocab_size)
    if cfg.parallel.engine == "deepspeed":
        carried = _weights_before_engine(cfg, stored_checkpoint, model_chunks)
        engine = build_deepspeed_engine(cfg, unwrap(model_chunks[0]))
        if carried is not None:
            _load_adam_state(engine, engine.model_chunks, *carried, stored_checkpoint.folder)
    else:
        engine = MegatronEngine.build(cfg, model_chunks)
    # the engine stands in for the optimizer: the trainer, the schedule, checkpoints and pruning ask it
    return engine.model_chunks, engine, build_scheduler(engine.optimizer, cfg.optim, cfg.total_iters(),
                                                        cfg.checkpoint.override_opt_param_scheduler)


def _weights_before_engine(cfg: PretrainConfig, stored: StoredCheckpoint | None, model_chunks: list) -> tuple | None:
    """--engine deepspeed with --load of a megatron-format checkpoint (a run changing engine, a
    converted checkpoint, or the in-run shrink's): its weights go into the model before DeepSpeed
    wraps it (and copies them into its fp32 masters), and its AdamW state is read while the model
    still holds whole (TP-local) parameters: returned as (tensors, step) for ``_load_adam_state``
    once DeepSpeed has partitioned the optimizer; None when there is none to carry."""
    if not stored or stored.engine == "deepspeed":
        return None
    finetune = _starts_fresh(cfg, stored)
    ckpt.load_checkpoint(stored, model_chunks, None, load_optim=False,
                         load_rng=not (cfg.checkpoint.no_load_rng or finetune))
    print_rank0(f"loaded the weights of megatron-format checkpoint {stored.folder} before DeepSpeed wraps the model")
    return None if finetune or cfg.checkpoint.no_load_optim else _read_adam_state(stored.folder, model_chunks)


def _starts_fresh(cfg: PretrainConfig, stored: StoredCheckpoint | None) -> bool:
    """Whether the --load checkpoint gives weights only (--finetune; an imported convert_from_hf
    checkpoint holds nothing else): no optimizer state, no trainer state, no RNG."""
    return cfg.checkpoint.finetune or bool(stored and stored.weights_only)


def _read_adam_state(folder: str, model_chunks: list) -> tuple | None:
    """(tensors, step) of ``folder``'s model-space AdamW state (``pretrain.engines.adam_state``; collective);
    None, said, when it holds none: the Adam moments then start at zero."""
    if checkpoint_adam.has_adam_state(folder):
        return checkpoint_adam.read_checkpoint(folder, model_chunks)
    print_rank0(f"{folder} holds no optimizer state: the Adam moments start at zero")
    return None


def _load_adam_state(engine, model_chunks: list, tensors: dict, step: int, folder: str) -> None:
    """Model-space AdamW state (``pretrain.engines.adam_state``) into the engine's own layout."""
    written = scatter_into_engine(engine, model_chunks, tensors, step)
    print_rank0(f"loaded the fp32 master weights and Adam moments of {folder} (Adam step {step}) into this engine's "
                f"optimizer state ({written:,} elements on rank 0)")


def _build_callbacks(cfg: PretrainConfig, layout: dict, vocab_size: int, extra_callbacks: list,
                     lineage: dict) -> list:
    """Pruning first (its step-end numbers feed the log line), checkpointing last (it saves what
    the others have updated, and ``lineage``: a shrunk or imported model stays marked as such, and
    the tokenizer's identity, ``resume.tokenizer_record``)."""
    # what this model computes per token (a masked model computes at its full size)
    logger = LoggingCallback(cfg.train.log_interval, cfg.logging.tensorboard_dir,
                             flops_per_token=training_flops_per_token(cfg.model, vocab_size))
    callbacks = [logger, EvalCallback(cfg.train.eval_interval, cfg.train.eval_iters, logger), *extra_callbacks]
    if cfg.prune.enabled:
        callbacks.insert(0, _pruning_callback(cfg, vocab_size))
    checkpointer = CheckpointCallback(
        cfg.checkpoint.save, cfg.checkpoint.save_interval, cfg.checkpoint.keep_last,
        cfg.train.exit_interval, cfg.checkpoint.exit_signal_handler,
        snapshot_fn=lambda trainer: {**trainer.state_dict(), "config": cfg.to_dict(), "layout": layout,
                                     "vocab_size": vocab_size, **lineage})
    return callbacks + [checkpointer]


def _pruning_callback(cfg: PretrainConfig, vocab_size: int):
    tp, pp, prune = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, cfg.prune
    # kept widths (and layers) must divide over every layout the run will use
    return PruningCallback(prune, ModelShape.from_config(cfg.model, vocab_size),
                           math.lcm(tp, prune.shrink_tensor_parallel_size or tp), cfg.total_tokens(),
                           log_dir=cfg.logging.tensorboard_dir,
                           pipeline_parallel=math.lcm(pp, prune.shrink_pipeline_parallel_size or pp))


@dataclasses.dataclass
class _Resume:
    """What the --load checkpoint gives this segment."""

    loaded: object | None = None  # pretrain.checkpoint.LoadedCheckpoint
    trainer_state: dict | None = None  # None: start at iteration 0 (no checkpoint, --finetune, imported)
    lineage: dict = dataclasses.field(default_factory=dict)


def _load_checkpoint(cfg: PretrainConfig, stored: StoredCheckpoint | None, model_chunks: list, engine) -> _Resume:
    if not cfg.checkpoint.load:
        return _Resume()
    finetune = _starts_fresh(cfg, stored)
    # False: not megatron-core's optimizer format (a checkpoint converted between engines, or the
    # DeepSpeed in-run shrink's); its AdamW state, if any, is in model space (pretrain.engines.adam_state)
    has_optimizer = not stored or stored.has_megatron_optimizer
    load_optim = not (cfg.checkpoint.no_load_optim or finetune)
    if stored and cfg.parallel.engine == "deepspeed" and stored.engine != "deepspeed":
        # its weights and Adam state are in the engine already (_weights_before_engine): only the
        # trainer state is read here
        loaded = ckpt.LoadedCheckpoint(stored.folder, stored.trainer_state)
    else:
        loaded = ckpt.load_checkpoint(
            stored or cfg.checkpoint.load, model_chunks, engine,
            load_optim=has_optimizer and load_optim, load_rng=not (cfg.checkpoint.no_load_rng or finetune))
        if loaded is not None and not has_optimizer:
            engine.reload_master_weights()  # fp32 masters (bf16 runs) from the loaded weights, not the init's
            adam = _read_adam_state(loaded.folder, model_chunks) if load_optim else None
            if adam is not None:  # converted from DeepSpeed: its AdamW state in model space
                _load_adam_state(engine, model_chunks, *adam, loaded.folder)
    if loaded is None:
        print_rank0(f"no checkpoint found under --load {cfg.checkpoint.load}; starting from scratch")
        return _Resume()
    print_rank0(f"loaded checkpoint {loaded.folder} (iteration {loaded.trainer_state['iteration']})")
    return _Resume(loaded, None if finetune else loaded.trainer_state, lineage(loaded.trainer_state))


def _build_trainer(cfg: PretrainConfig, layout: dict, tokenizer, vocab_size: int, model_chunks: list, engine,
                   scheduler, callbacks: list, resume: _Resume):
    from megatron.core import parallel_state as ps

    t, dp, dp_rank = cfg.train, layout["dp_size"], ps.get_data_parallel_rank()
    eval_runs = (cfg.total_iters() // t.eval_interval + 1) if t.eval_interval else 0
    train_ds, valid_ds, _ = build_datasets(
        cfg.data, tokenizer or _NullVocab(vocab_size), cfg.model.seq_length, t.seed,
        (cfg.total_iters() * t.global_batch_size, eval_runs * t.eval_iters * t.global_batch_size, 0))
    test_ds = build_test_dataset(cfg.data, tokenizer, cfg.model.seq_length) if tokenizer is not None else None

    def batches(dataset, consumed: int):
        return MicroBatchIterator(dataset, consumed, t.micro_batch_size, dp_rank, dp)

    consumed = resume.trainer_state["consumed_samples"] if resume.trainer_state else 0
    trainer = Trainer(
        config=cfg, model_chunks=model_chunks, engine=engine, scheduler=scheduler,
        train_iterator=batches(train_ds, consumed),
        valid_dataset_iterator_factory=(lambda consumed_valid: batches(valid_ds, consumed_valid))
        if valid_ds is not None else None,
        # always from the first test sequence: every evaluation scores the same ones
        test_iterator_factory=(lambda: batches(test_ds, 0)) if test_ds is not None else None,
        test_batches=(len(test_ds) // t.global_batch_size) if test_ds is not None else 0,
        callbacks=callbacks, num_microbatches=_num_microbatches(cfg, layout), total_iters=cfg.total_iters(),
    )
    return trainer


def _restore_state(cfg: PretrainConfig, trainer, resume: _Resume, stored: StoredCheckpoint | None) -> None:
    """The checkpoint's trainer state (iteration, data position, schedule, callbacks)."""
    if resume.trainer_state is not None:
        trainer.load_state_dict(resume.trainer_state)
        if resume.loaded.local_state:
            trainer.load_local_state_dict(resume.loaded.local_state)
        _callback(trainer, "checkpoint").last_saved_iteration = trainer.state.iteration
    elif cfg.prune.enabled and stored and stored.pruning is not None:
        # --finetune starts a fresh run, but the weights it loaded are pruned: keep their masks
        _callback(trainer, "pruning").load_state_dict(stored.pruning)


def _callback(trainer, name: str):
    return next(c for c in trainer.callbacks if c.name == name)


def _print_end(cfg: PretrainConfig, state) -> None:
    if state.stop_reason:
        print_rank0(f"stopped at iteration {state.iteration}: {state.stop_reason}")
    if cfg.logging.tensorboard_dir:
        print_rank0(f"tensorboard logs: {os.path.abspath(cfg.logging.tensorboard_dir)} "
                    f"(view with: tensorboard --logdir {cfg.logging.tensorboard_dir})")


def _segment_summary(cfg: PretrainConfig, trainer, layout: dict) -> dict:
    # a partitioned parameter (ZeRO-3) holds part of itself: count its full shape
    params = sum(math.prod(trainer.engine.full_shape(p)) for c in trainer.model_chunks for p in unwrap(c).parameters())
    if torch.distributed.is_initialized():
        t = torch.tensor([float(params)], device=device())
        torch.distributed.all_reduce(t)  # summed over all ranks; divide out the DP replicas
        params = int(t.item()) // max(layout["dp_size"], 1)
    history, state = _callback(trainer, "logging").history, trainer.state
    tps = cfg.tokens_per_step()
    return {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "tokens_seen": state.tokens_seen, "history": history, "stop_reason": state.stop_reason,
            "layout": layout, "trainer": trainer, "params": params,
            "tokens_per_second": {"start": tps * _steps_per_second(history, last=False),
                                  "end": tps * _steps_per_second(history, last=True)}}


def _pruning_warnings(cfg: PretrainConfig, counts: dict, total_iters: int,
                      stored: StoredCheckpoint | None) -> list[str]:
    """Pruning settings that would silently do nothing in this run."""
    prune = cfg.prune
    if not prune.enabled or prune.end_pruning:
        return []
    notes = []
    run_tokens = total_iters * cfg.tokens_per_step()
    if prune.start_tokens >= run_tokens:
        notes.append(f"WARNING: the pruning window starts at {prune.start_tokens:,} tokens "
                     f"(--prune-start-tokens), after this run's last token ({run_tokens:,}): this run prunes nothing")
    elif prune.end_tokens is not None and prune.end_tokens > run_tokens:
        done = (run_tokens - prune.start_tokens) / (prune.end_tokens - prune.start_tokens)
        notes.append(f"WARNING: --prune-end-tokens {prune.end_tokens:,} is past this run's last token "
                     f"({run_tokens:,}): it stops {done:.0%} of the way through the pruning window, above the target; "
                     "continue it with --load and a longer --train-iters/--train-tokens to reach the target")
    late = [t for t in prune.shrink_at if t > run_tokens]
    if late:
        notes.append(f"WARNING: --shrink-at {','.join(map(str, late))}: past this run's last token ({run_tokens:,}), "
                     "so no shrink there in this run (a resumed, longer run does it)")
    resumed = bool(stored) and stored.pruning is not None
    if prune.target_params is not None and not resumed and prune.target_params >= counts["total"]:
        notes.append(f"WARNING: --prune-target-params {prune.target_params:,} is not below the model's "
                     f"{counts['total']:,} parameters: nothing will be pruned")
    return notes


class _NullVocab:
    """Stand-in tokenizer for --mock-data runs without a tokenizer."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad, self.name, self.path = vocab_size, vocab_size - 1, vocab_size - 1, "mock", None
        self.unique_identifiers = {"class": "mock", "vocab": vocab_size}

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        return " ".join(map(str, ids))


def _plan(cfg: PretrainConfig, layout: dict, vocab_size: int, counts: dict, num_microbatches: int) -> str:
    m, t = cfg.model, cfg.train
    total_iters, tokens = cfg.total_iters(), cfg.total_tokens()
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
        f"{'bf16' if t.bf16 else 'fp32'}" + _engine_summary(cfg.parallel),
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x DP {layout['dp_size']} "
        f"x {num_microbatches} micro-batches; {cfg.tokens_per_step():,} tokens/step",
        f"plan: {total_iters} iterations, {tokens / 1e6:,.2f} M tokens; lr {cfg.optim.lr} "
        f"({cfg.optim.lr_decay_style}, warmup {cfg.optim.lr_warmup_iters}, decay over "
        f"{cfg.optim.lr_decay_iters or total_iters}, min {cfg.optim.min_lr})",
        "data: " + ("mock" if cfg.data.mock_data else
                    f"train {_data_summary(cfg.data.train_data_path)}, valid {_data_summary(cfg.data.valid_data_path)}"
                    if cfg.data.per_split else f"{_data_summary(cfg.data.data_path)} split {cfg.data.split}"),
        f"checkpoints: save {cfg.checkpoint.save} every {cfg.checkpoint.save_interval}; "
        f"load {cfg.checkpoint.load}",
        "=" * 72,
    ]
    return "\n".join(lines)


def _engine_summary(parallel) -> str:
    """The plan's words for --engine deepspeed (nothing for the default engine)."""
    if parallel.engine != "deepspeed":
        return ""
    stage, offload = parallel.deepspeed_zero()
    return f"; engine DeepSpeed ZeRO-{stage}, optimizer offload {offload}"


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
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    args = build_parser().parse_args(argv)
    os.environ["PRETRAIN_LAUNCHER"] = args.launcher  # read by launch_environment
    try:
        cfg, checkpoint = config_and_checkpoint_from_args(args)
        run(cfg, checkpoint=checkpoint)
    except (UserError, TokenizerError) as err:
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
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
