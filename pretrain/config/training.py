"""The optimizer, the training length and batch, checkpointing and logging sections."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from pretrain.config.flags import flag, require, require_choice, token_count


@dataclass(kw_only=True)
class OptimConfig:
    cli_group: ClassVar[str] = "optimizer"

    lr: float = flag(3e-4, above=0)
    min_lr: float = flag(3e-5, at_least=0)
    weight_decay: float = flag(0.1, at_least=0)
    adam_beta1: float = flag(0.9, at_least=0, below=1)
    adam_beta2: float = flag(0.95, at_least=0, below=1)
    adam_eps: float = flag(1e-8, above=0)
    clip_grad: float = flag(1.0, at_least=0)
    lr_warmup_iters: int = flag(0, at_least=0)
    lr_decay_iters: int | None = flag(None, help="default: the training length", at_least=1)
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"] = flag("cosine")

    def validate(self) -> None:
        require(self.lr > 0, "--lr must be positive")
        require(0 <= self.min_lr <= self.lr, "--min-lr must be between 0 and --lr")
        require_choice(self, "lr_decay_style", "--lr-decay-style")
        require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        require(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")


@dataclass(kw_only=True)
class TrainConfig:
    cli_group: ClassVar[str] = "training"

    micro_batch_size: int = flag(1, at_least=1)
    global_batch_size: int = flag(8, at_least=1)
    train_iters: int | None = flag(None, at_least=1)
    train_tokens: int | None = flag(None, parse=token_count, help="e.g. 5e10 (instead of --train-iters)", at_least=1)
    seed: int = flag(1234, at_least=0, at_most=2**32 - 1)
    bf16: bool = flag(False)
    eval_interval: int = flag(0, help="0: no evaluation during training", at_least=0)
    eval_iters: int = flag(10, at_least=0)
    # no Megatron-LM flag does this: the benchmarks of pretrain.benchmarks scored on the training
    # model itself wherever the held-out loss is evaluated, so a pruning run shows what it can still do
    eval_tasks: str | None = flag(None, help="score these benchmarks (tools/evaluate.py --tasks names: paper, mmlu, "
                                             "arc_easy, ...) on the training model at every --eval-interval and "
                                             "where the held-out loss is evaluated at the end; none: stop (on resume)")
    eval_tasks_limit: int | None = flag(None, help="--eval-tasks: the first N documents of each task (default: all)",
                                        at_least=1)
    eval_tasks_num_fewshot: int = flag(0, help="--eval-tasks: 0- or 5-shot requests (the benchmark data has these two)",
                                       at_least=0, at_most=5)
    eval_tasks_interval: int | None = flag(None, help="--eval-tasks: score them at the evaluations of every N iterations "
                                                      "(a multiple of --eval-interval) and at the end; 0: at the end "
                                                      "only (default: at every evaluation)", at_least=0)
    log_interval: int = flag(10, at_least=1)
    exit_interval: int | None = flag(None, help="save and exit at this iteration", at_least=1)
    dry_run: bool = flag(False, help="build everything, print the plan, exit")
    # Megatron-LM's flag: measure a checkpoint (a released parent) on the run's own validation and
    # test batches, so its losses compare with the runs trained from it
    skip_train: bool = flag(False, help="load, evaluate the validation split and --test-data-path once "
                                        "(--eval-iters batches), save nothing, exit")
    max_skipped_nonfinite_steps: int = flag(
        3, help="skip a step whose loss or gradients are NaN/inf (no update); after this many in one run, "
                "stop with an error (the last checkpoint stays the newest)", at_least=0)

    def validate(self, data_parallel_size: int, seq_length: int) -> None:
        require(self.micro_batch_size > 0, "--micro-batch-size must be positive")
        per_step = self.micro_batch_size * data_parallel_size
        require(
            self.global_batch_size % per_step == 0,
            f"--global-batch-size ({self.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size "
            f"({data_parallel_size}) = {per_step}",
        )
        require((self.train_iters is None) != (self.train_tokens is None),
                 "give exactly one of --train-iters and --train-tokens")
        require(self.total_iters(seq_length) > 0,
                 "--train-iters/--train-tokens: the training length must be at least one iteration")
        require(self.log_interval > 0, "--log-interval must be positive")
        require(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval/--eval-iters must be >= 0")
        require(self.max_skipped_nonfinite_steps >= 0, "--max-skipped-nonfinite-steps must be >= 0")
        require(self.eval_tasks_num_fewshot in (0, 5), f"--eval-tasks-num-fewshot {self.eval_tasks_num_fewshot}: "
                "use 0 or 5 (the benchmark data holds 0- and 5-shot requests)")
        if self.scores_tasks and self.eval_tasks_interval:  # the tasks are scored where the held-out loss is evaluated
            require(self.eval_interval > 0 and self.eval_tasks_interval % self.eval_interval == 0,
                    f"--eval-tasks-interval {self.eval_tasks_interval}: the tasks are scored at evaluations, so it "
                    f"must be a multiple of --eval-interval ({self.eval_interval}); or 0 to score them at the end only")

    @property
    def scores_tasks(self) -> bool:
        """Whether --eval-tasks names benchmarks to score (``none`` turns a resumed run's off)."""
        return bool(self.eval_tasks) and self.eval_tasks.strip().lower() != "none"

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        """Micro-batches each data-parallel rank runs per step (gradient accumulation steps): the one
        count the trainer, the DeepSpeed engine's settings and the plan use."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)

    def total_iters(self, seq_length: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return int(math.ceil(self.train_tokens / (self.global_batch_size * seq_length)))


@dataclass(kw_only=True)
class CheckpointConfig:
    cli_group: ClassVar[str] = "checkpointing and logging"

    save: str | None = flag(None)
    load: str | None = flag(None)
    save_interval: int | None = flag(None, at_least=1)
    no_load_optim: bool = flag(False)
    no_load_rng: bool = flag(False)
    finetune: bool = flag(False, help="load weights only; start at iteration 0 with a fresh optimizer")
    keep_last: int | None = flag(None, help="keep only the newest N checkpoints", at_least=1)
    use_checkpoint_args: bool = flag(
        False, help="take the model shape from the --load checkpoint (e.g. after a shrink)")
    # Megatron-LM's names and meaning; without either, a resume whose schedule flags differ from
    # the checkpoint's schedule stops and says what each would do (pretrain.resume)
    override_opt_param_scheduler: bool = flag(
        False, name="--override-opt_param-scheduler",
        help="on resume, follow this command's LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, "
             "--lr-decay-iters or the training length, --weight-decay) from the checkpoint's iteration on")
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, name="--use-checkpoint-opt_param-scheduler",
        help="on resume, keep the checkpoint's LR schedule whatever the schedule flags say")
    # not a flag: the command line always saves and stops cleanly on SIGTERM/SIGUSR1/SIGINT
    exit_signal_handler: bool = True

    def validate(self) -> None:
        if self.save_interval is not None:
            require(self.save_interval > 0, "--save-interval must be positive")
            require(self.save is not None, "--save-interval needs --save")
        if self.keep_last is not None:
            require(self.keep_last >= 1, "--keep-last must be >= 1")
        require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other: pick one")


@dataclass(kw_only=True)
class LoggingConfig:
    cli_group: ClassVar[str] = "checkpointing and logging"

    tensorboard_dir: str | None = flag(None)
