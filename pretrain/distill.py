"""Knowledge distillation from a frozen teacher checkpoint (``--kd-teacher``).

The loss of a distilled step is ``(1 - α)·CE + α·T²·KL(p_T ‖ q_T)`` with ``p_T = softmax(z_t / T)``
(teacher), ``q_T = softmax(z_s / T)`` (student), averaged over the loss-masked tokens like the CE.
The T² factor (Hinton et al.) keeps the KL's gradient on the CE's scale whatever T is. The logged
``loss`` stays the CE (comparable with runs without a teacher); ``kd_kl`` is the KL at T (without
the T² factor), ``kd_teacher_seconds`` the teacher's forward time of the step and
``kd_teacher_flops_per_token`` its forward FLOPs (the comparison charges them to the run).

How a step runs (``DistillationCallback.wrap_forward_step``): the step's micro-batches are taken
from the data iterator first; the teacher runs over them as its own forward-only pipeline
(megatron-core's schedule, same TP/PP groups, its own shape), so with PP > 1 its logits end on the
last stage, which keeps one logits tensor per micro-batch (vocab-parallel, in the training dtype);
then the student's schedule runs over the same micro-batches with the trainer's own forward step,
whose loss function is wrapped to add the KL. The student's vocab-parallel logits are caught by a
forward hook on its output layer, so its CE is computed exactly as without a teacher (α = 0 is
bit-identical to no teacher). The KL never gathers the vocabulary: ``vocab_parallel_kl`` is a
log-softmax over the TP-split vocabulary (max and sum of exponentials all-reduced over the TP group,
like megatron-core's vocab-parallel cross-entropy) with its own backward, ``(q_T - p_T) / T``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

import torch

from pretrain import checkpoint as ckpt
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import ConfigError, DistillConfig, ModelConfig, PretrainConfig
from pretrain.model.shape import ModelShape
from pretrain.distributed import device
from pretrain.model.build import build_model, unwrap
from pretrain.model.flops import training_flops_per_token
from pretrain.model.invariants import hidden_masking_possible
from pretrain.pruning.state import PruningState
from pretrain.checkpoint.tokenizer import check_checkpoint_tokenizer
from pretrain.trainer import Callback, StepMetrics


# -- the vocab-parallel KL ------------------------------------------------------------------------

def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


def _vocab_parallel_log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    """log softmax over a vocabulary split along the last dim over ``group`` (exact: the global max
    and the global sum of exponentials are all-reduced)."""
    top = x.max(dim=-1, keepdim=True).values
    _all_reduce(top, torch.distributed.ReduceOp.MAX, group)
    shifted = x - top
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, group)
    return shifted - sum_exp.log()


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL(softmax(t/T) ‖ softmax(s/T)) over a TP-split vocabulary; gradient to s only."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, group):
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: compute in fp32
        log_q = _vocab_parallel_log_softmax(student.to(dtype) / temperature, group)
        log_p = _vocab_parallel_log_softmax(teacher.to(dtype) / temperature, group)
        p = log_p.exp()
        # padded vocabulary rows: -inf logits in both (pretrain.model.build.mask_padded_logits), 0 * (-inf + inf)
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        _all_reduce(kl, torch.distributed.ReduceOp.SUM, group)
        # d KL / d s = (q - p) / T (sum p = 1): one saved tensor, the size of the local logits
        ctx.save_for_backward(log_q.exp_().sub_(p))
        ctx.temperature, ctx.student_dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        (q_minus_p,) = ctx.saved_tensors
        grad = q_minus_p * (grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      group=None) -> torch.Tensor:
    """KL(teacher ‖ student) per position at temperature T, from logits whose last dim is this
    rank's slice of the vocabulary (``group``: the TP group; None or a group of one: the whole
    vocabulary is here). Differentiable in ``student_logits``; the teacher gets no gradient."""
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(temperature), group)


# -- the teacher: checked before training, built in the student's layout --------------------------

@dataclasses.dataclass(frozen=True)
class Teacher:
    """A ``--kd-teacher`` checkpoint, checked against the student (no weights read yet)."""

    folder: str
    model: ModelConfig
    vocab_size: int


def resolve_teacher(cfg: PretrainConfig, vocab_size: int, tokenizer, world_size: int) -> Teacher | None:
    """The ``--kd-teacher`` checkpoint, or a ConfigError saying why it cannot teach this student:
    missing, another vocabulary or tokenizer, pruned but not shrunk, or a shape the student's
    TP/PP layout cannot hold. Reads only the checkpoint's trainer state: runs before any process
    group exists, so every rank stops with the same message."""
    path = cfg.distill.teacher
    if path is None:
        return None
    stored = StoredCheckpoint.find(path) if os.path.exists(path) else None
    if stored is None:
        raise ConfigError(f"--kd-teacher {path}: no checkpoint there (give a --save folder or one of its "
                          "iter_* folders, or a tools/convert_from_hf.py output)")
    if stored.deepspeed_only:  # before any process group, not at the teacher's load
        raise ConfigError(f"--kd-teacher {path}: {stored.deepspeed_only}")
    folder, state, teacher_vocab = stored.folder, stored.trainer_state, stored.vocab_size
    if teacher_vocab is not None and teacher_vocab != vocab_size:
        raise ConfigError(f"--kd-teacher {folder}: its vocabulary ({teacher_vocab} padded) differs from the "
                          f"student's ({vocab_size}): distillation compares the two softmaxes token by "
                          "token, so both must use one tokenizer and one padded vocabulary")
    check_checkpoint_tokenizer("--kd-teacher", folder, state, tokenizer)
    saved = stored.config.model
    masks = PruningState.stored_masks(state)
    if masks is not None and PruningState.removes_groups(masks, ModelShape.from_config(saved, vocab_size)):
        raise ConfigError(f"--kd-teacher {folder}: its weights carry pruning masks with removed groups; "
                          "shrink it first (tools/reshard_checkpoint.py --shrink) and use the shrunk checkpoint")
    # no weight depends on the sequence length: the teacher reads the student's sequences
    model = dataclasses.replace(saved, seq_length=cfg.model.seq_length,
                                max_position_embeddings=max(saved.max_position_embeddings or 0,
                                                            cfg.model.seq_length) or None,
                                # the KL runs over the student's vocabulary: the same padded logits masked
                                unpadded_vocab_size=cfg.model.unpadded_vocab_size)
    try:
        cfg.parallel.validate(model, world_size)
    except ConfigError as err:
        raise ConfigError(f"--kd-teacher {folder}: the teacher's shape does not fit this layout: {err}") from None
    return Teacher(folder=folder, model=model, vocab_size=vocab_size)


def plan_line(config: DistillConfig, teacher: Teacher) -> str:
    """The distillation part of the run's plan."""
    until = f"until {config.until_tokens:,} tokens" if config.until_tokens is not None else "for the whole run"
    params = teacher.model.num_parameters(teacher.vocab_size)["total"]
    return (f"distillation: teacher {teacher.folder} ({params / 1e6:,.2f} M parameters, frozen), "
            f"loss = {1 - config.weight:g}·CE + {config.weight:g}·T²·KL at T {config.temperature:g}, {until}")


def build_teacher(teacher: Teacher, cfg: PretrainConfig, hidden_masking: bool) -> list:
    """Collective. The teacher's model chunks on this rank (its own shape, the student's TP/PP
    layout and dtype), loaded from its checkpoint, frozen: eval mode, no gradients, no DDP wrapper,
    no optimizer. ``hidden_masking``: the student's spec choice, so the checkpoint's keys load the
    same way the student's would."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # build_model reseeds: the student's RNG stream goes on
        chunks = build_model(teacher.model, cfg.parallel, cfg.train, teacher.vocab_size, wrap_ddp=False,
                             hidden_masking=hidden_masking)
    ckpt.load_checkpoint(teacher.folder, chunks, None, load_optim=False, load_rng=False)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


# -- the step ------------------------------------------------------------------------------------

class DistillationCallback(Callback):
    """Runs the teacher before each student step while distillation lasts, adds the KL to the loss
    (through ``wrap_forward_step``) and logs ``kd_kl``, ``kd_loss`` and ``kd_teacher_seconds``."""

    name = "distill"

    def __init__(self, config: DistillConfig, teacher_chunks: list, logger=None, teacher_flops_per_token: int = 0):
        self.config = config
        # the teacher's forward pass per token (a third of its training FLOPs): charged to the run
        self.teacher_flops_per_token = teacher_flops_per_token
        self.teacher_chunks = teacher_chunks
        self.logger = logger
        self._hook = None
        self._captured: torch.Tensor | None = None
        self._teacher_logits: list[torch.Tensor] = []
        self._batches: list[dict] = []
        self._next = 0
        self._kl_parts: list[torch.Tensor] = []  # each micro-batch's KL (last stage), summed at step end
        self._teacher_seconds = 0.0
        self._active = False

    def active(self, tokens_seen: int) -> bool:
        return self.config.until_tokens is None or tokens_seen < self.config.until_tokens

    def replaces_lm_loss(self, trainer) -> bool:
        # α = 0 trains on the CE alone (bit-identical to no teacher): its gradients are the CE's
        return self.active(trainer.state.tokens_seen) and self.config.weight > 0

    def on_train_begin(self, trainer) -> None:
        from megatron.core import parallel_state as ps

        if ps.is_pipeline_last_stage():
            # the student's vocab-parallel logits, as its own CE sees them ([seq, batch, vocab / TP])
            self._hook = unwrap(trainer.model_chunks[-1]).output_layer.register_forward_hook(self._catch)

    def _catch(self, module, inputs, output):
        if not self._active:
            return None
        logits = output[0] if isinstance(output, tuple) else output
        self._captured = logits
        if logits.dtype != torch.float32:
            return None
        # megatron-core's vocab-parallel cross-entropy overwrites fp32 logits in place (its
        # ``.float()`` is then no copy): hand it a copy, keep the logits themselves for the KL
        copy = logits.clone()
        return (copy, *output[1:]) if isinstance(output, tuple) else copy

    def wrap_forward_step(self, trainer, step_func, data_iterator):
        if not self.active(trainer.state.tokens_seen):
            return step_func, data_iterator
        self._batches = [next(data_iterator) for _ in range(trainer.num_microbatches)]
        start = time.time()
        self._teacher_logits = self._run_teacher(trainer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._teacher_seconds = time.time() - start
        self._next, self._active = 0, True
        self._kl_parts = []
        return partial(self._student_step, step_func), iter(self._batches)

    @torch.no_grad()
    def _run_teacher(self, trainer) -> list[torch.Tensor]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        logits: list[torch.Tensor] = []

        def keep(output: torch.Tensor):
            logits.append(output)  # [batch, seq, vocab / TP] on the last stage
            return torch.zeros((), device=output.device), {}

        def teacher_step(iterator, model):
            batch = next(iterator)
            dev = device()
            out = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None)
            return out, keep

        get_forward_backward_func()(
            forward_step_func=teacher_step, data_iterator=iter(self._batches), model=self.teacher_chunks,
            num_microbatches=trainer.num_microbatches, seq_length=trainer.config.model.seq_length,
            micro_batch_size=trainer.config.train.micro_batch_size, forward_only=True)
        return logits

    def _student_step(self, step_func, data_iterator, model):
        output, loss_func = step_func(data_iterator, model)
        index = self._next
        self._next += 1
        return output, partial(self._loss, loss_func, index)

    def _loss(self, loss_func, index: int, output_tensor: torch.Tensor):
        from megatron.core import parallel_state as ps

        ce, reported = loss_func(output_tensor)
        student, self._captured = self._captured, None
        teacher = self._teacher_logits[index]
        self._teacher_logits[index] = None  # freed as the step goes
        kl = vocab_parallel_kl(student.transpose(0, 1), teacher, self.config.temperature,
                               ps.get_tensor_model_parallel_group())  # [batch, seq]
        mask = self._batches[index]["loss_mask"].to(device()).reshape(-1).float()
        kl = torch.sum(kl.reshape(-1) * mask) / mask.sum().clamp(min=1)
        alpha, temperature = self.config.weight, self.config.temperature
        loss = (1.0 - alpha) * ce + (alpha * temperature ** 2) * kl
        self._kl_parts.append(kl.detach())
        return loss, {**reported, "kd kl": kl.detach().clone()}

    def on_before_optimizer_step(self, trainer) -> None:
        self._active = False
        self._teacher_logits, self._batches, self._captured = [], [], None

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        if self._next == 0:  # not a distilled step
            return
        local = torch.zeros(2, dtype=torch.float64, device=device())
        if self._kl_parts:
            local[0] = torch.stack(self._kl_parts).double().sum()
            local[1] = len(self._kl_parts)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(local)  # only the last stage's ranks contribute
        kl = float(local[0] / local[1]) if local[1] > 0 else float("nan")
        alpha, temperature = self.config.weight, self.config.temperature
        metrics.extra.update(kd_kl=kl, kd_loss=(1 - alpha) * metrics.loss + alpha * temperature ** 2 * kl,
                             kd_teacher_seconds=self._teacher_seconds,
                             kd_teacher_flops_per_token=self.teacher_flops_per_token)
        if self.logger is not None:
            it = trainer.state.iteration
            self.logger.log_scalar("train/kd_kl", kl, it)
            self.logger.log_scalar("train/kd_loss", metrics.extra["kd_loss"], it)
            self.logger.log_scalar("train/kd_teacher_seconds", self._teacher_seconds, it)
        self._next = 0

    def on_train_end(self, trainer) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None



def add_distillation(cfg: PretrainConfig, teacher: Teacher | None, callbacks: list, stored_pruning: dict | None) -> list:
    """Collective. ``callbacks`` with the distillation callback before the logger (its numbers go
    into the step's log record), the teacher built and loaded; unchanged without a teacher."""
    if teacher is None:
        return callbacks
    chunks = build_teacher(teacher, cfg, hidden_masking_possible(cfg.prune, stored_pruning))
    logger = next((c for c in callbacks if c.name == "logging"), None)
    forward_flops = training_flops_per_token(teacher.model, teacher.vocab_size) // 3
    callback = DistillationCallback(cfg.distill, chunks, logger, teacher_flops_per_token=forward_flops)
    at = callbacks.index(logger) if logger is not None else len(callbacks) - 1
    return callbacks[:at] + [callback] + callbacks[at:]
