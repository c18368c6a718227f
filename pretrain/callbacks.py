"""Callbacks: logging (stdout + tensorboard), evaluation, checkpointing with signal handling."""

from __future__ import annotations

import json
import os
import signal
import time

import torch

from pretrain import benchmarks
from pretrain.checkpoint import save_checkpoint
from pretrain.distributed import device, is_rank0
from pretrain.trainer import Callback, StepMetrics, Trainer


class LoggingCallback(Callback):
    """One line per ``--log-interval`` and the same scalars in tensorboard (rank 0).

    Also appends every step's metrics to ``metrics.jsonl`` beside the tensorboard events, so tests
    and scripts can read the loss curve without tensorboard. Each record has the wall and process
    CPU seconds since the previous one (``elapsed_seconds``, ``process_cpu_seconds``; the first of
    a process: since training began), so the previous step's evaluation and checkpoint are in
    them: what the run cost, summed over its records, however often it was stopped and resumed
    (a resumed step's record replaces the one of the attempt that lost it). The --eval-tasks
    scoring among them is also given alone (``tasks_seconds``, ``tasks_cpu_seconds``), so that
    training time can be told apart from the benchmarks' (``note_task_scoring``).
    """

    name = "logging"

    def __init__(self, log_interval: int, tensorboard_dir: str | None, flops_per_token: int = 0):
        self.log_interval = log_interval
        self.flops_per_token = flops_per_token
        self.tensorboard_dir = tensorboard_dir
        self.writer = None
        self._window: list[StepMetrics] = []
        self._start = time.time()
        self.history: list[dict] = []
        self._last_wall, self._last_cpu = time.time(), time.process_time()
        self._task_seconds, self._task_cpu_seconds = 0.0, 0.0  # scoring since the last record

    def note_task_scoring(self, seconds: float, cpu_seconds: float) -> None:
        """The --eval-tasks scoring that the next step's record includes (``EvalCallback``)."""
        self._task_seconds += seconds
        self._task_cpu_seconds += cpu_seconds

    def on_train_begin(self, trainer: Trainer) -> None:
        self._start = time.time()
        if self.tensorboard_dir and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=self.tensorboard_dir)
        self._last_wall, self._last_cpu = time.time(), time.process_time()
        self._task_seconds, self._task_cpu_seconds = 0.0, 0.0

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        it = trainer.state.iteration
        tokens_seen = trainer.state.tokens_seen
        record = {"iteration": it, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                  "tokens": tokens_seen, "step_seconds": m.seconds, "flops_per_token": self.flops_per_token,
                  **m.extra}
        now_wall, now_cpu = time.time(), time.process_time()  # (process: every thread of it)
        record["elapsed_seconds"], record["process_cpu_seconds"] = now_wall - self._last_wall, now_cpu - self._last_cpu
        self._last_wall, self._last_cpu = now_wall, now_cpu
        if self._task_seconds or self._task_cpu_seconds:
            record["tasks_seconds"], record["tasks_cpu_seconds"] = self._task_seconds, self._task_cpu_seconds
            self._task_seconds, self._task_cpu_seconds = 0.0, 0.0
        if m.lm_pass:  # a second forward/backward of the model (saliency while distilling): charged to the run
            record["lm_pass_flops_per_token"] = self.flops_per_token
        self.history.append(record)
        self._window.append(m)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", m.loss, it)
            self.writer.add_scalar("train/lr", m.lr, it)
            self.writer.add_scalar("train/grad_norm", m.grad_norm, it)
            self.writer.add_scalar("train/tokens_per_second", m.tokens / max(m.seconds, 1e-9), it)
            self.writer.add_scalar("train/loss_vs_tokens", m.loss, tokens_seen)
            with open(os.path.join(self.tensorboard_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if it % self.log_interval == 0 or it == trainer.total_iters:
            window = self._window
            seconds = sum(x.seconds for x in window)
            toks = sum(x.tokens for x in window)
            skipped = sum(x.skipped for x in window)
            if is_rank0():
                print(
                    f"iteration {it:>7d}/{trainer.total_iters} | loss {m.loss:.4f} | "
                    f"lr {m.lr:.3e} | grad norm {m.grad_norm:.3f} | "
                    f"tokens/s {toks / max(seconds, 1e-9):,.0f} | "
                    f"elapsed {time.time() - self._start:,.1f}s"
                    + (f" | params {m.extra['params'] / 1e6:.3f} M (kept heads {m.extra['kept_heads']:.0%}, "
                       f"ffn {m.extra['kept_ffn']:.0%}, hidden {m.extra['kept_hidden']:.0%}"
                       + (f", layers {m.extra['kept_layers']:.0%}" if m.extra.get("kept_layers", 1) < 1 else "")
                       + ")"
                       if "params" in m.extra else "")
                    + (f" | skipped {skipped}" if skipped else ""),
                    flush=True,
                )
            self._window = []

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class EvalCallback(Callback):
    """Validation every ``--eval-interval`` steps and at the end; the ``--test-data-path`` set
    alongside (and at the end even without an interval). Each evaluation is also a line of
    ``evals.jsonl`` beside the tensorboard events."""

    name = "eval"

    def __init__(self, eval_interval: int, eval_iters: int, logger: LoggingCallback | None = None,
                 tasks: "TaskEvaluation | None" = None, tasks_interval: int | None = None):
        self.eval_interval = eval_interval
        self.eval_iters = eval_iters
        self.logger = logger
        self.tasks = tasks  # --eval-tasks: scored where the held-out loss is, at the end and ...
        self.tasks_interval = tasks_interval  # ... every this many iterations (None: every evaluation; 0: none)
        self.last_loss: float | None = None
        self.last_test_loss: float | None = None
        self.last_benchmarks: dict | None = None  # the record of the last --eval-tasks scoring

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        it = trainer.state.iteration
        at_end = it == trainer.total_iters
        validate = bool(self.eval_interval) and (it % self.eval_interval == 0 or at_end)
        if validate or (trainer.has_test_set and at_end):
            tasks = at_end or self.tasks_interval is None or bool(self.tasks_interval and it % self.tasks_interval == 0)
            self.evaluate_now(trainer, validate, tasks)

    def evaluate_now(self, trainer: Trainer, validate: bool = True, tasks: bool = True) -> dict:
        """Validation (when ``validate``), the test set and (when ``tasks``) the --eval-tasks, at the
        trainer's current iteration: printed, to tensorboard and a line of ``evals.jsonl``."""
        it = trainer.state.iteration
        record = {}
        if validate:
            loss = trainer.evaluate(self.eval_iters)
            self.last_loss = record["valid_loss"] = loss
            if is_rank0():
                ppl = float(torch.exp(torch.tensor(min(loss, 50.0))))
                print(f"validation at iteration {it} | loss {loss:.4f} | perplexity {ppl:.2f}", flush=True)
            if self.logger is not None:
                self.logger.log_scalar("valid/loss", loss, it)
        if trainer.has_test_set:
            loss = trainer.evaluate_test(self.eval_iters)
            self.last_test_loss = record["test_loss"] = loss
            if is_rank0():
                print(f"test at iteration {it} | loss {loss:.4f}", flush=True)
            if self.logger is not None:
                self.logger.log_scalar("test/loss", loss, it)
        if self.tasks is not None and tasks:
            wall, cpu = time.time(), time.process_time()
            summary = self.tasks.evaluate(trainer)
            wall, cpu = time.time() - wall, time.process_time() - cpu
            self.last_benchmarks = record["benchmarks"] = {**TaskEvaluation.record(summary), "seconds": wall,
                                                           "cpu_seconds": cpu}
            if self.logger is not None:
                self.logger.note_task_scoring(wall, cpu)
            if is_rank0():
                print(f"benchmarks at iteration {it} | " + " | ".join(
                    f"{name} {m['primary']} {m['score']:.4f}" for name, m in summary["tasks"].items())
                    + (f" | paper average {summary['average']:.4f}" if "average" in summary else "")
                    + f" | {summary['seconds']:.1f}s", flush=True)
            if self.logger is not None:
                for tag, value in benchmarks.scalars(summary).items():
                    self.logger.log_scalar(tag, value, it)
        record = {"iteration": it, "tokens": trainer.state.tokens_seen, **record}
        if self.logger is not None and self.logger.tensorboard_dir and is_rank0():
            os.makedirs(self.logger.tensorboard_dir, exist_ok=True)
            with open(os.path.join(self.logger.tensorboard_dir, "evals.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


class TaskEvaluation:
    """--eval-tasks: the benchmarks of ``pretrain.benchmarks`` scored on the training model itself
    (masked or shrunk, any TP/PP, each data-parallel rank a share of the documents, either engine)
    wherever ``EvalCallback`` evaluates. The documents come read once (``docs``); their tokenization
    into this rank's rows is made at the first evaluation and kept for the process, so that later
    evaluations and segments only score. Scoring reads no data, draws no random number and leaves
    no gradient: the run trains exactly as it would without it."""

    _prepared: dict = {}  # (documents, max length, data-parallel rank and size) -> PreparedTasks

    def __init__(self, docs: dict, tokenizer, max_length: int, real_vocab: int, num_fewshot: int = 0,
                 limit: int | None = None, batch_size: int = 8):
        self.docs, self.tokenizer, self.max_length = docs, tokenizer, max_length
        self.real_vocab, self.num_fewshot, self.limit, self.batch_size = real_vocab, num_fewshot, limit, batch_size

    def evaluate(self, trainer: Trainer) -> dict:
        """The summary of ``pretrain.benchmarks.score_prepared`` on the trainer's model (collective)."""
        from megatron.core import parallel_state as ps

        key = (id(self.docs), self.max_length, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = benchmarks.prepare_documents(self.tokenizer, self.docs, self.max_length,
                                                                          self.num_fewshot)
        summary = benchmarks.score_prepared(trainer.model_chunks, prepared, self.real_vocab, self.batch_size,
                                            progress=False)
        summary["limit"] = self.limit
        return summary

    @staticmethod
    def record(summary: dict) -> dict:
        """What a line of ``evals.jsonl`` keeps of a summary: per task its metrics, and the average."""
        out = {"tasks": {name: {k: m[k] for k in ("acc", "acc_norm", "primary", "score", "documents")}
                         for name, m in summary["tasks"].items()},
               "limit": summary.get("limit"), "num_fewshot": summary["num_fewshot"]}
        if "average" in summary:
            out["paper_average"] = summary["average"]
        return out


class CheckpointCallback(Callback):
    """Saves every ``save_interval`` steps, at the end, and when SIGTERM/SIGUSR1/SIGINT arrive.

    A signal only sets a flag; at the end of the current step all ranks agree (all-reduce) on
    stopping, save together and leave the loop, so the process exits cleanly with a checkpoint.
    """

    name = "checkpoint"

    def __init__(self, save: str | None, save_interval: int | None, keep_last: int | None,
                 exit_interval: int | None = None, handle_signals: bool = True,
                 snapshot_fn=None):
        self.save = save
        self.save_interval = save_interval
        self.keep_last = keep_last
        self.exit_interval = exit_interval
        self.handle_signals = handle_signals
        self.snapshot_fn = snapshot_fn  # (trainer) -> trainer_state dict to store
        self._signal_received: int | None = None
        self._previous_handlers: dict = {}
        self.last_saved_iteration: int | None = None

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._signal_received is not None:  # a second Ctrl-C: quit now, without saving
                raise KeyboardInterrupt
            if is_rank0():
                print(f"interrupted: stopping after this step{' and saving a checkpoint' if self.save else ''} "
                      "(Ctrl-C again to quit at once)", flush=True)
        self._signal_received = signum

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                try:
                    self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass

    def _agreed_signal(self) -> bool:
        # on the collective's device: NCCL refuses host tensors
        flag = torch.tensor([1.0 if self._signal_received is not None else 0.0], device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def signal_pending(self) -> bool:
        """Whether a stop signal reached any rank after the last step's check (collective: every
        rank calls it): the in-run shrink asks before it goes on to the next segment."""
        return self.handle_signals and self._agreed_signal()

    def save_now(self, trainer: Trainer) -> None:
        if not self.save or self.last_saved_iteration == trainer.state.iteration:
            return
        save_checkpoint(self.save, trainer.state.iteration, trainer.model_chunks, trainer.engine,
                        self.snapshot_fn(trainer), keep_last=self.keep_last,
                        local_state=trainer.local_state_dict())
        self.last_saved_iteration = trainer.state.iteration

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        it = trainer.state.iteration
        if self.handle_signals and self._agreed_signal():
            if is_rank0():
                print(f"signal received: saving a checkpoint at iteration {it} and exiting" if self.save else
                      f"signal received: stopping at iteration {it}; nothing is saved (no --save)", flush=True)
            self.save_now(trainer)
            trainer.request_stop("signal")
            return
        if self.save_interval and it % self.save_interval == 0:
            self.save_now(trainer)
        if self.exit_interval and it % self.exit_interval == 0:
            self.save_now(trainer)
            trainer.request_stop(f"--exit-interval {self.exit_interval}")

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.state.iteration >= trainer.total_iters and not trainer.state.failed:
            self.save_now(trainer)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
