"""megatron-core as the trainer's engine (the default, ``--engine megatron``): DDP over the data
parallel group, megatron-core's forward/backward schedules (pipeline-parallel when PP > 1) and its
optimizer (AdamW, distributed across data-parallel ranks or not).

Where each model parameter's master copy and Adam moments live in megatron-core's optimizers, so
pruning can zero them, and which elements' reduced gradients this rank owns:

* ``DistributedOptimizer`` (ZeRO-1 over data-parallel ranks): each DP rank owns a contiguous range
  of every flattened parameter (possibly empty); after the gradient reduce-scatter only that
  range of ``main_grad`` holds the data-parallel mean.
* ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``: every rank holds everything, and the
  gradients are all-reduced.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pretrain.config import PretrainConfig
from pretrain.distributed import device
from pretrain.engines.base import Engine, ParamSlot, ensure_adam_moments
from pretrain.engines.optim import build_optimizer
from pretrain.model.build import unwrap


def inner_optimizers(optimizer) -> list:
    """The optimizers of a (possibly chained) megatron-core optimizer."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class MegatronEngine(Engine):
    """megatron-core's DDP-wrapped model chunks and optimizer."""

    name = "megatron"
    grads_outside_params = False  # reduced gradients are main_grad, views of DDP's grad buffers

    def __init__(self, optimizer, model_chunks: list = ()):
        self.optimizer, self.model_chunks = optimizer, list(model_chunks)

    @classmethod
    def build(cls, cfg: PretrainConfig, model_chunks: list) -> "MegatronEngine":
        """The optimizer over ``model_chunks`` (DDP-wrapped, initialised), ready to train them."""
        engine = cls(build_optimizer(model_chunks, cfg.optim, cfg.parallel, cfg.train), model_chunks)
        # the optimizer holds fp32 master copies (bf16) made before our init: refresh them
        engine.reload_master_weights()
        engine._configure_model_hooks()
        return engine

    def _configure_model_hooks(self) -> None:
        """megatron-core's schedule reads these from the model config: DP grad sync, the
        tied-embedding grad across PP stages, the loss scale, and no grad sync before the last
        micro-batch."""
        from megatron.core.distributed import finalize_model_grads

        mcfg = unwrap(self.model_chunks[0]).config
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        mcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync

    # -- the training step
    def forward_backward(self, forward_step, data_iterator, num_microbatches: int, seq_length: int,
                         micro_batch_size: int) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=self.model_chunks,
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=False)

    def gradients_finite(self) -> bool:
        """Whether every rank's reduced gradients are finite (one flag all-reduced over the world)."""
        checks = []
        for chunk in self.model_chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None:
                    checks.append(torch.isfinite(grad).all())
        # one device-to-host sync for all parameters, not one each
        flag = (torch.stack(checks).all() if checks else torch.tensor(True)).float().reshape(1).to(device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def step(self, finite: bool) -> tuple[bool, float]:
        if not finite:  # no update from this batch: the weights, moments and LR schedule stay as they were
            return False, float("nan")
        update_successful, grad_norm, _ = self.optimizer.step()
        return bool(update_successful), float(grad_norm) if grad_norm is not None else float("nan")

    def discard_gradients(self) -> None:
        """Nothing to do: ``forward_backward`` zeroes the grad buffers before it runs."""

    # -- parameters and optimizer state
    def param_slots(self) -> Iterator[ParamSlot]:
        for opt in inner_optimizers(self.optimizer):
            if hasattr(opt, "model_param_gbuf_map"):  # DistributedOptimizer
                for param in opt.model_param_gbuf_map:
                    r = opt._get_model_param_range_map(param)["param"]
                    tensors = opt._get_main_param_and_optimizer_states(param)
                    main = tensors.pop("param", None)
                    yield ParamSlot(param, r.start, r.end, main, tensors)
            elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
                for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                    for param, main in zip(model_group, main_group):
                        yield ParamSlot(param, 0, param.numel(), main.view(-1), opt.optimizer.state.get(main, {}))
                for group in getattr(opt, "fp32_from_fp32_groups", []):
                    for param in group:
                        yield ParamSlot(param, 0, param.numel(), param.view(-1), opt.optimizer.state.get(param, {}))
            else:  # FP32Optimizer
                for group in opt.optimizer.param_groups:
                    for param in group["params"]:
                        yield ParamSlot(param, 0, param.numel(), param.view(-1), opt.optimizer.state.get(param, {}))

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        inner = (getattr(opt, "optimizer", None) for opt in inner_optimizers(self.optimizer))
        return [opt for opt in inner if isinstance(opt, torch.optim.Optimizer)]

    @property
    def partitions_state(self) -> bool:
        return any(hasattr(o, "model_param_gbuf_map") for o in inner_optimizers(self.optimizer))

    def init_optimizer_state(self) -> None:
        """megatron-core's own ``init_state_fn`` where the optimizer has one (it knows fused and
        precision-aware Adams), then the ``step`` torch's Adam keeps per state."""
        for opt in inner_optimizers(self.optimizer):
            init = getattr(opt, "init_state_fn", None)
            if init is not None and getattr(opt, "optimizer", None) is not None:
                init(opt.optimizer, getattr(opt, "config", None))
        for opt in self.torch_optimizers():
            ensure_adam_moments(opt, [p for group in opt.param_groups for p in group["params"]])

    def reload_master_weights(self) -> None:
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:  # an fp32 optimizer without masters has none
            reload()

    # -- its state in a checkpoint: megatron-core's sharded optimizer state, beside the model's
    def sharded_state_dict(self, model_sd: dict, is_loading: bool, metadata: dict) -> dict:
        if is_loading:
            # megatron-core's DistributedOptimizer.state_dict reads state["step"] when neither apex nor
            # Transformer Engine provides Adam: a fresh torch Adam needs the state its first step makes
            self.init_optimizer_state()
        return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        self._unalias_adam_steps()

    def _unalias_adam_steps(self) -> None:
        """Give every parameter its own Adam ``step`` tensor.

        Without apex/TE, megatron-core's DistributedOptimizer.load_state_dict puts *one* step tensor
        into every parameter's torch-Adam state; torch Adam increments it in place once per parameter,
        so the bias correction after a resume would be wrong (losses drift from the unbroken run).
        """
        for torch_opt in self.torch_optimizers():
            for state in torch_opt.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()


def as_engine(optimizer, model_chunks: list = ()) -> Engine:
    """``optimizer`` itself when it is an engine; a megatron-core optimizer as the megatron engine
    (for its state: the model hooks of a training run are ``MegatronEngine.build``'s)."""
    return optimizer if isinstance(optimizer, Engine) else MegatronEngine(optimizer, model_chunks)
