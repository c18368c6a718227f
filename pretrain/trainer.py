"""The generic training loop. Features (logging, evaluation, checkpoints, pruning) are callbacks.

``Trainer.fit`` is the whole algorithm: take a global batch, let the engine
(``pretrain.engines.base.Engine``: megatron-core or DeepSpeed) run the forward/backward over its
micro-batches and step the optimizer, step the LR schedule, advance the data position, and let the
callbacks act.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from pretrain.errors import NonFiniteError
from pretrain.distributed import device, print_rank0
from pretrain.engines.base import Engine


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    # training tokens so far: the one count every schedule, log line and record uses
    tokens_seen: int = 0
    consumed_valid_samples: int = 0
    should_stop: bool = False
    # every reason asked for at the step it stopped: a stop signal that arrives on the step a
    # shrink is due must still stop the run (``run.segments``), though "shrink" was asked first
    stop_reasons: list[str] = field(default_factory=list)
    skipped_nonfinite_steps: int = 0
    # set when training stops on an error: the checkpoint callback then saves nothing more
    failed: bool = False
    # this step's loss or gradients are not finite: callbacks must not learn from it
    nonfinite_step: bool = False

    @property
    def stop_reason(self) -> str:
        """The first reason asked for: what the run reports."""
        return self.stop_reasons[0] if self.stop_reasons else ""


@dataclass
class StepMetrics:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float
    tokens: int
    extra: dict = field(default_factory=dict)
    # the step also ran the language-model loss's forward/backward of its own (``Trainer._lm_gradient_pass``)
    lm_pass: bool = False


class Callback:
    """Hooks the trainer calls; a callback with state returns it from ``state_dict``."""

    name: str = "callback"

    def on_train_begin(self, trainer: "Trainer") -> None: ...

    def on_step_begin(self, trainer: "Trainer") -> None: ...

    def wrap_forward_step(self, trainer: "Trainer", step_func, data_iterator) -> tuple:
        """(forward step, data iterator) for this step's schedule; distillation runs its teacher here."""
        return step_func, data_iterator

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        """Gradients are reduced (megatron-core's finalize ran); the optimizer has not stepped."""

    def replaces_lm_loss(self, trainer: "Trainer") -> bool:
        """Whether the step about to run trains on a loss other than the language model's
        (distillation), so that its gradients are not the language-model loss's."""
        return False

    def wants_lm_gradients(self, trainer: "Trainer") -> bool:
        """Whether the step about to run needs the language-model loss's reduced gradients (gradient
        saliency): where another loss trains the step, they are computed by a pass of their own."""
        return False

    def on_lm_gradients(self, trainer: "Trainer") -> None:
        """The language-model loss's gradients of this step's batch are reduced, from a pass that
        runs before the training pass and only where ``replaces_lm_loss`` and ``wants_lm_gradients``
        meet (``trainer.state.nonfinite_step`` says whether that pass was finite); the training pass
        starts from zero gradients after it."""

    def on_step_end(self, trainer: "Trainer", metrics: StepMetrics) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def local_state_dict(self) -> dict:
        """State that differs between ranks (saved per rank, restored under the same layout)."""
        return {}

    def load_local_state_dict(self, state: dict) -> None: ...


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    """megatron-core's forward-step contract: run one micro-batch, return (output, loss_func)."""
    batch = next(data_iterator)
    dev = device()
    tokens = batch["tokens"].to(dev)
    output = model(
        tokens, batch["position_ids"].to(dev), None, labels=batch["labels"].to(dev)
    )
    return output, partial(_loss_func, batch["loss_mask"].to(dev))


class Trainer:
    def __init__(self, *, config, model_chunks: list, engine: Engine, scheduler, train_iterator,
                 valid_dataset_iterator_factory=None, test_iterator_factory=None, test_batches: int = 0,
                 callbacks: list[Callback] = (), num_microbatches: int, total_iters: int):
        self.config = config
        self.model_chunks = model_chunks
        self.engine = engine
        self.scheduler = scheduler
        self.train_iterator = train_iterator
        self.valid_iterator_factory = valid_dataset_iterator_factory
        self.test_iterator_factory = test_iterator_factory
        self.test_batches = test_batches  # whole global batches the test set holds
        self.callbacks = list(callbacks)
        self.num_microbatches = num_microbatches
        self.total_iters = total_iters
        self.state = TrainerState()

    @property
    def optimizer(self) -> Engine:
        """The engine, under the name the callers that hand it on use (it stands in for the optimizer:
        checkpoints, pruning and the model-space Adam state take an engine or megatron-core's optimizer)."""
        return self.engine

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step()

    def train_step(self) -> StepMetrics:
        start = time.time()
        data_iterator = self.train_iterator
        lm_pass = self._lm_gradient_pass_due()
        if lm_pass:
            data_iterator = self._lm_gradient_pass()
        for cb in self.callbacks:
            cb.on_step_begin(self)
        step_func = forward_step
        for cb in self.callbacks:
            step_func, data_iterator = cb.wrap_forward_step(self, step_func, data_iterator)
        loss, finite = self._forward_backward(step_func, data_iterator)
        self.state.nonfinite_step = not finite
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        # no update from a non-finite batch: the weights, moments and LR schedule stay as they were
        update_successful, grad_norm = self.engine.step(not self.state.nonfinite_step)
        if update_successful:
            self.scheduler.step(increment=1)
        return StepMetrics(
            loss=loss, grad_norm=grad_norm,
            lr=self.engine.param_groups[0]["lr"], skipped=not update_successful,
            seconds=time.time() - start, tokens=self.tokens_per_step, lm_pass=lm_pass,
        )

    def _forward_backward(self, step_func, data_iterator) -> tuple[float, bool]:
        """One forward/backward of the global batch from zero gradients, reduced over data parallel:
        its mean language-model loss, and whether that and the gradients are finite on every rank."""
        losses = self.engine.forward_backward(step_func, data_iterator, self.num_microbatches,
                                              self.config.model.seq_length, self.config.train.micro_batch_size)
        loss = global_mean_loss(losses)
        return loss, math.isfinite(loss) and self.engine.gradients_finite()

    def _lm_gradient_pass_due(self) -> bool:
        return (any(cb.replaces_lm_loss(self) for cb in self.callbacks)
                and any(cb.wants_lm_gradients(self) for cb in self.callbacks))

    def _lm_gradient_pass(self):
        """The language-model loss's forward/backward over this step's batch, its reduced gradients
        handed to ``on_lm_gradients``, then dropped; an iterator over the same micro-batches for
        the training pass. An extra forward and backward of the student: only on the steps that
        need it (gradient saliency while distilling)."""
        batches = [next(self.train_iterator) for _ in range(self.num_microbatches)]
        self.state.nonfinite_step = not self._forward_backward(forward_step, iter(batches))[1]
        for cb in self.callbacks:
            cb.on_lm_gradients(self)
        self.engine.discard_gradients()
        return iter(batches)

    def _count_nonfinite_step(self, metrics: StepMetrics) -> None:
        """Skip-and-count policy for a step whose loss or gradients were not finite."""
        self.state.skipped_nonfinite_steps += 1
        limit = self.config.train.max_skipped_nonfinite_steps
        print_rank0(f"WARNING: iteration {self.state.iteration}: loss {metrics.loss} / gradients not finite; "
                    f"the step was skipped ({self.state.skipped_nonfinite_steps} of at most {limit} "
                    "allowed by --max-skipped-nonfinite-steps)")
        if self.state.skipped_nonfinite_steps > limit:
            self.state.failed = True
            self.request_stop(
                f"{self.state.skipped_nonfinite_steps} steps had a NaN/inf loss or gradients (the last at "
                f"iteration {self.state.iteration}), more than --max-skipped-nonfinite-steps {limit}. "
                "Nothing was saved after the last good step; the newest checkpoint under --save (if any) "
                "is the state to go back to. Lower --lr, keep --clip-grad > 0, or check the data read "
                f"around sample {self.state.consumed_samples}")

    @property
    def has_test_set(self) -> bool:
        return self.test_iterator_factory is not None and self.test_batches > 0

    def evaluate(self, num_iters: int) -> float:
        """Mean loss over ``num_iters`` global batches of the validation split (each evaluation
        reads the next ones, as Megatron-LM does)."""
        if self.valid_iterator_factory is None or num_iters <= 0:
            return float("nan")
        loss = self._mean_loss(self.valid_iterator_factory(self.state.consumed_valid_samples), num_iters)
        self.state.consumed_valid_samples += num_iters * self.config.train.global_batch_size
        return loss

    def score_on_validation(self, num_iters: int) -> float:
        """Mean loss over the next ``num_iters`` global batches of the validation split without
        consuming them: every call until the next ``evaluate`` reads the same batches (a search
        comparing models on one score)."""
        if self.valid_iterator_factory is None or num_iters <= 0:
            return float("nan")
        return self._mean_loss(self.valid_iterator_factory(self.state.consumed_valid_samples), num_iters)

    def evaluate_test(self, num_iters: int) -> float:
        """Mean loss over the first ``num_iters`` global batches of ``--test-data-path`` (the
        same sequences at every call, so losses along a run and across runs compare)."""
        if not self.has_test_set or num_iters <= 0:
            return float("nan")
        return self._mean_loss(self.test_iterator_factory(), min(num_iters, self.test_batches))

    @torch.no_grad()
    def _mean_loss(self, iterator, num_iters: int) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.model_chunks:
            chunk.eval()
        total, count = 0.0, 0
        for _ in range(num_iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterator, model=self.model_chunks,
                num_microbatches=self.num_microbatches, seq_length=self.config.model.seq_length,
                micro_batch_size=self.config.train.micro_batch_size, forward_only=True,
            )
            total += global_mean_loss(losses)
            count += 1
        for chunk in self.model_chunks:
            chunk.train()
        return total / max(count, 1)

    def request_stop(self, reason: str) -> None:
        self.state.should_stop = True
        if reason not in self.state.stop_reasons:
            self.state.stop_reasons.append(reason)

    def fit(self) -> TrainerState:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        while self.state.iteration < self.total_iters and not self.state.should_stop:
            metrics = self.train_step()
            self.state.iteration += 1
            self.state.consumed_samples += self.config.train.global_batch_size
            self.state.tokens_seen += self.tokens_per_step
            if self.state.nonfinite_step:
                self._count_nonfinite_step(metrics)
                if self.state.failed:
                    break
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self.state.failed:
            raise NonFiniteError(self.state.stop_reason)
        return self.state

    # -- checkpointable state of the trainer and its callbacks
    def state_dict(self) -> dict:
        return {
            "iteration": self.state.iteration,
            "consumed_samples": self.state.consumed_samples,
            "tokens_seen": self.state.tokens_seen,
            "consumed_valid_samples": self.state.consumed_valid_samples,
            "skipped_nonfinite_steps": self.state.skipped_nonfinite_steps,
            "scheduler": self.scheduler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def local_state_dict(self) -> dict:
        return {cb.name: cb.local_state_dict() for cb in self.callbacks}

    def load_local_state_dict(self, state: dict) -> None:
        for cb in self.callbacks:
            if state.get(cb.name):
                cb.load_local_state_dict(state[cb.name])

    def load_state_dict(self, state: dict, load_scheduler: bool = True) -> None:
        self.state.iteration = state["iteration"]
        self.state.consumed_samples = state["consumed_samples"]
        # checkpoints written before tokens_seen was stored: every step had this run's sequence length
        self.state.tokens_seen = state.get("tokens_seen", state["consumed_samples"] * self.config.model.seq_length)
        self.state.consumed_valid_samples = state.get("consumed_valid_samples", 0)
        self.state.skipped_nonfinite_steps = state.get("skipped_nonfinite_steps", 0)
        if load_scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        for cb in self.callbacks:
            if cb.name in state.get("callbacks", {}):
                cb.load_state_dict(state["callbacks"][cb.name])


def global_mean_loss(losses: list) -> float:
    """Mean loss over the global batch, on every rank (only the last PP stage computes it)."""
    from megatron.core import parallel_state as ps

    local = torch.zeros(2, dtype=torch.float64, device=device())  # NCCL refuses host tensors
    if ps.is_pipeline_last_stage() and losses:
        local[0] = sum(float(x["lm loss"]) for x in losses) / len(losses)
        local[1] = 1.0
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(local)
    return float(local[0] / local[1]) if local[1] > 0 else float("nan")
