"""The parts of one segment, built from the config and the --load checkpoint: the config the
checkpoint decides, tokenizer and vocabulary, teacher, model and engine (and which engine's state
the checkpoint holds: the restore table), callbacks, trainer, and the trainer state restored."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from pretrain import checkpoint as ckpt
from pretrain.benchmarks import load_tasks, max_length, parse_tasks, scored_vocab
from pretrain.callbacks import CheckpointCallback, EvalCallback, LoggingCallback, TaskEvaluation
from pretrain.checkpoint import adam as checkpoint_adam
from pretrain.checkpoint.stored import StoredCheckpoint, lineage
from pretrain.checkpoint.tokenizer import check_checkpoint_tokenizer
from pretrain.config import ConfigError, PretrainConfig
from pretrain.data import (MicroBatchIterator, build_datasets, build_test_dataset, check_datasets,
                           check_tokenizer_matches_data, load_tokenizer)
from pretrain.distill import plan_line, resolve_teacher
from pretrain.distributed import launch_environment, print_rank0
from pretrain.engines.adam_state import scatter_into_engine
from pretrain.engines.deepspeed import build_deepspeed_engine
from pretrain.engines.megatron import MegatronEngine
from pretrain.engines.optim import build_scheduler
from pretrain.errors import BenchmarkError
from pretrain.model.build import build_model, check_activation_memory, unwrap, zero_padded_vocab_rows
from pretrain.model.flops import training_flops_per_token
from pretrain.model.init import deterministic_init
from pretrain.model.invariants import hidden_masking_possible
from pretrain.nodes import ranks_on_this_host
from pretrain.pruning.callback import PruningCallback
from pretrain.pruning.masks import ModelShape
from pretrain.resume import (checkpoint_vocab, with_checkpoint_distill, with_checkpoint_model,
                             with_checkpoint_pruning, with_unpadded_vocab)
from pretrain.run.plan import num_microbatches
from pretrain.trainer import Trainer


def resolve_config(cfg: PretrainConfig, stored: StoredCheckpoint | None) -> tuple[PretrainConfig, str]:
    """The run's config with what the --load checkpoint decides (shape, pruning), validated."""
    cfg = with_checkpoint_model(cfg, stored)
    cfg, pruning_note = with_checkpoint_pruning(cfg, stored)
    cfg, distill_note = with_checkpoint_distill(cfg, stored)
    pruning_note = "\n".join(n for n in (pruning_note, distill_note) if n)
    cfg.validate(launch_environment()[1])
    return cfg, pruning_note


def tokenizer_and_vocab(cfg: PretrainConfig, stored: StoredCheckpoint | None) -> tuple:
    """The config with the model's unpadded vocabulary, the tokenizer (None for mock data without
    one) and the model's padded vocabulary."""

    tokenizer = load_tokenizer(cfg.data) if not cfg.data.mock_data or cfg.data.tokenizer_model else None
    tp = cfg.parallel.tensor_model_parallel_size
    tokenizer_vocab = tokenizer.vocab_size if tokenizer else (cfg.model.vocab_size or 8192)
    vocab_size = checkpoint_vocab(stored, tokenizer_vocab, tp) or cfg.model.padded_vocab_size(tokenizer_vocab, tp)
    return with_unpadded_vocab(cfg, stored, tokenizer_vocab), tokenizer, vocab_size


def checked_teacher(cfg: PretrainConfig, vocab_size: int, tokenizer):
    rank, world_size, _ = launch_environment()
    teacher = resolve_teacher(cfg, vocab_size, tokenizer, world_size)
    if teacher is not None and rank == 0:
        print(plan_line(cfg.distill, teacher), flush=True)
    return teacher


def check_tokenizer(cfg: PretrainConfig, tokenizer, stored: StoredCheckpoint | None) -> None:
    """The tokenizer against every dataset's manifest and the --load checkpoint's, on every rank
    (a mismatch stops all ranks with its message before a collective could hang)."""
    if tokenizer is not None:
        check_tokenizer_matches_data(cfg.data, tokenizer)
    if stored:
        check_checkpoint_tokenizer("--load", stored.folder, stored.trainer_state, tokenizer)


def eval_task_documents(cfg: PretrainConfig, tokenizer) -> dict | None:
    """--eval-tasks: the tasks' documents, read before any process group, so that an unknown name,
    a run without a tokenizer or missing task data stops it at once; None without --eval-tasks."""
    t = cfg.train
    if not t.scores_tasks:
        return None
    if tokenizer is None or cfg.data.tokenizer_type == "NullTokenizer":
        raise ConfigError(f"--eval-tasks {t.eval_tasks}: the tasks are text and this run has no tokenizer to read "
                          "them with: give --tokenizer-model (the one the data was made with), or drop --eval-tasks")
    names = tuple(parse_tasks(t.eval_tasks, "--eval-tasks"))  # an unknown name: a BenchmarkError (ConfigError)
    try:
        return _task_documents(names, t.eval_tasks_num_fewshot, t.eval_tasks_limit)
    except BenchmarkError as err:  # the data missing or damaged: the message says how to install it
        raise BenchmarkError(f"--eval-tasks {t.eval_tasks}: {err}") from None


@functools.lru_cache(maxsize=4)
def _task_documents(names: tuple[str, ...], num_fewshot: int, limit: int | None) -> dict:
    # read once per process: every segment of a run (the in-run shrink starts a new one) scores them
    return load_tasks(names, num_fewshot, limit)


def check_data(cfg: PretrainConfig, tokenizer) -> None:
    if tokenizer is not None and not cfg.data.mock_data:
        check_datasets(cfg.data, tokenizer)
        if cfg.data.test_data_path:
            check_datasets(cfg.data.test_data(), tokenizer)


def build_model_and_engine(cfg: PretrainConfig, vocab_size: int, plain_megatron_spec: bool,
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
        if stored_checkpoint is None:
            # with a --load checkpoint every weight is overwritten by its load (strict: none missing);
            # drawing them first costs a full-size random tensor per parameter on every rank
            # (seconds for a 135M model at start-up, bench/startup.py)
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


def build_callbacks(cfg: PretrainConfig, layout: dict, vocab_size: int, extra_callbacks: list,
                    lineage: dict, tokenizer=None, task_docs: dict | None = None) -> list:
    """Pruning first (its step-end numbers feed the log line), checkpointing last (it saves what
    the others have updated, and ``lineage``: a shrunk or imported model stays marked as such, and
    the tokenizer's identity, ``resume.tokenizer_record``). ``task_docs``: what
    ``eval_task_documents`` read, scored with ``tokenizer`` at each evaluation."""
    # what this model computes per token (a masked model computes at its full size)
    logger = LoggingCallback(cfg.train.log_interval, cfg.logging.tensorboard_dir,
                             flops_per_token=training_flops_per_token(cfg.model, vocab_size))
    tasks = None
    if task_docs is not None:
        real_vocab = scored_vocab(cfg.model.unpadded_vocab_size, tokenizer.vocab_size, vocab_size)
        tasks = TaskEvaluation(task_docs, tokenizer, max_length(cfg.model), real_vocab,
                               cfg.train.eval_tasks_num_fewshot, cfg.train.eval_tasks_limit,
                               batch_size=max(8, cfg.train.micro_batch_size))
    callbacks = [logger, EvalCallback(cfg.train.eval_interval, cfg.train.eval_iters, logger, tasks,
                                      cfg.train.eval_tasks_interval),
                 *extra_callbacks]
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
class Resume:
    """What the --load checkpoint gives this segment."""

    loaded: object | None = None  # pretrain.checkpoint.LoadedCheckpoint
    trainer_state: dict | None = None  # None: start at iteration 0 (no checkpoint, --finetune, imported)
    lineage: dict = dataclasses.field(default_factory=dict)


def load_run_checkpoint(cfg: PretrainConfig, stored: StoredCheckpoint | None, model_chunks: list, engine) -> Resume:
    if not cfg.checkpoint.load:
        return Resume()
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
        return Resume()
    print_rank0(f"loaded checkpoint {loaded.folder} (iteration {loaded.trainer_state['iteration']})")
    return Resume(loaded, None if finetune else loaded.trainer_state, lineage(loaded.trainer_state))


def build_trainer(cfg: PretrainConfig, layout: dict, tokenizer, vocab_size: int, model_chunks: list, engine,
                  scheduler, callbacks: list, resume: Resume):
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
        callbacks=callbacks, num_microbatches=num_microbatches(cfg, layout), total_iters=cfg.total_iters(),
    )
    return trainer


def restore_trainer_state(cfg: PretrainConfig, trainer, resume: Resume, stored: StoredCheckpoint | None) -> None:
    """The checkpoint's trainer state (iteration, data position, schedule, callbacks)."""
    if resume.trainer_state is not None:
        trainer.load_state_dict(resume.trainer_state)
        if resume.loaded.local_state:
            trainer.load_local_state_dict(resume.loaded.local_state)
        if stored is not None and cfg.checkpoint.save and \
                os.path.realpath(os.path.dirname(stored.folder)) == os.path.realpath(cfg.checkpoint.save):
            # --save holds this iteration already. Loaded from elsewhere it does not, and a shrink
            # due at once (one a stop interrupted) reads its source from --save: it saves first
            callback_named(trainer, "checkpoint").last_saved_iteration = trainer.state.iteration
    elif cfg.prune.enabled and stored and stored.pruning is not None:
        # --finetune starts a fresh run, but the weights it loaded are pruned: keep their masks
        callback_named(trainer, "pruning").load_state_dict(stored.pruning)


def callback_named(trainer, name: str):
    return next(c for c in trainer.callbacks if c.name == name)


class _NullVocab:
    """Stand-in tokenizer for --mock-data runs without a tokenizer."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad, self.name, self.path = vocab_size, vocab_size - 1, vocab_size - 1, "mock", None
        self.unique_identifiers = {"class": "mock", "vocab": vocab_size}

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        return " ".join(map(str, ids))
