"""A run: training in segments, each on one model, from the config and the --load checkpoint to a
stop; between segments the in-run shrink rewrites the checkpoint into the smaller model.

Reads like the algorithm: validate the config, set up the process groups, build tokenizer, data,
model, engine and schedule, resume if asked, then ``Trainer.fit`` with its callbacks
(``pretrain.run.build`` builds each part; ``pretrain.run.plan`` says what will run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch

from pretrain.checkpoint.files import iteration_dir
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.checkpoint.tokenizer import tokenizer_record
from pretrain.config import ConfigError, PretrainConfig
from pretrain.data import require_index_cache
from pretrain.distill import add_distillation
from pretrain.distributed import device, init_distributed, is_rank0, print_rank0, set_random_seed
from pretrain.engines.convert import save_weights_for_shrink
from pretrain.errors import CheckpointError
from pretrain.model.build import unwrap
from pretrain.model.memory import check_training_memory
from pretrain.nodes import check_run_folders
from pretrain.outputs import require_writable
from pretrain.resume import with_checkpoint_schedule
from pretrain.run import run_lock
from pretrain.run.build import (build_callbacks, build_model_and_engine, build_trainer, callback_named, check_data,
                                check_tokenizer, checked_teacher, eval_task_documents, load_run_checkpoint,
                                resolve_config,
                                restore_trainer_state, tokenizer_and_vocab)
from pretrain.run.plan import print_plan
from pretrain.shrink import ShrinkError, reshard_checkpoint


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
            others = [r for r in summary.get("stop_reasons", []) if r != "shrink"]
            checkpointer = callback_named(summary["trainer"], "checkpoint")
            if not others and checkpointer.signal_pending():  # after the step's own check
                checkpointer.save_now(summary["trainer"])
                others = ["signal"]
            if others:
                summary["stop_reason"] = others[0]
                # a stop signal (or --exit-interval) on the step a shrink is due: stop, as asked.
                # The checkpoint saved for the stop records the shrink as due, so --load of it
                # shrinks first; going on would leave a preempted job to be killed mid-segment
                print_rank0(f"stopped at iteration {summary['iteration']} ({', '.join(others)}) where the model was to "
                            "shrink: resuming from the checkpoint shrinks first")
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
    except (ShrinkError, CheckpointError, OSError) as err:
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
    cfg, pruning_note = resolve_config(cfg, stored)
    cfg, tokenizer, vocab_size = tokenizer_and_vocab(cfg, stored)
    check_tokenizer(cfg, tokenizer, stored)  # before any process group work
    task_docs = eval_task_documents(cfg, tokenizer)  # --eval-tasks: bad names or data stop the run here
    teacher = checked_teacher(cfg, vocab_size, tokenizer)  # --kd-teacher: checked before any process group
    layout = init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    _hold_output_folders(cfg)  # one run per --save: before anything is written there
    # several nodes: shared folders, not node-local ones (a dry run creates nothing)
    check_run_folders(None if cfg.train.dry_run else cfg.checkpoint.save, cfg.checkpoint.load,
                      (stored.folder, stored.trainer_state) if stored else None)
    check_data(cfg, tokenizer)  # before anything heavy is built
    cfg, schedule_note = with_checkpoint_schedule(cfg, stored)  # after the data: a wrong dataset is the worse news
    pruning_note = "\n".join(n for n in (pruning_note, schedule_note) if n)
    set_random_seed(cfg.train.seed)
    counts = cfg.model.num_parameters(vocab_size)
    print_plan(cfg, layout, vocab_size, counts, stored, pruning_note)
    if cfg.train.dry_run:
        return {"dry_run": True, "parameters": counts, "layout": layout}
    check_training_memory(cfg, vocab_size, layout["dp_size"], teacher)  # before anything is allocated

    model_chunks, engine, scheduler = build_model_and_engine(cfg, vocab_size, plain_megatron_spec, stored)
    resume = load_run_checkpoint(cfg, stored, model_chunks, engine)
    callbacks = build_callbacks(cfg, layout, vocab_size, extra_callbacks,
                                {**resume.lineage, **tokenizer_record(tokenizer)}, tokenizer, task_docs)
    if teacher is not None:
        callbacks = add_distillation(cfg, teacher, callbacks, stored.pruning if stored else None)
    trainer = build_trainer(cfg, layout, tokenizer, vocab_size, model_chunks, engine, scheduler,
                            callbacks, resume)
    restore_trainer_state(cfg, trainer, resume, stored)
    if cfg.train.skip_train:  # --skip-train: the loaded model measured on the run's batches, nothing saved
        return {"skip_train": True, "evaluation": callback_named(trainer, "eval").evaluate_now(trainer), "layout": layout}
    if cfg.prune.enabled:
        print_rank0(callback_named(trainer, "pruning").plan_line())  # after the restore: the schedule's true ends
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


def _print_end(cfg: PretrainConfig, state) -> None:
    if state.stop_reason:
        print_rank0(f"stopped at iteration {state.iteration}: {', '.join(state.stop_reasons)}")
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
    history, state = callback_named(trainer, "logging").history, trainer.state
    tps = cfg.tokens_per_step()
    return {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "tokens_seen": state.tokens_seen, "history": history, "stop_reason": state.stop_reason,
            "stop_reasons": list(state.stop_reasons),
            "layout": layout, "trainer": trainer, "params": params,
            "tokens_per_second": {"start": tps * _steps_per_second(history, last=False),
                                  "end": tps * _steps_per_second(history, last=True)}}
