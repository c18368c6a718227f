"""The Engine interface: everything that differs between megatron-core and DeepSpeed.

The trainer, the checkpoint, pruning (saliency, compensation, the callback) and the model-space
Adam state talk to an ``Engine`` only: the step (forward/backward, finite check, optimizer step
with skip), where each parameter's master copy, moments and reduced gradient live (``ParamSlot``),
a parameter's full shape and whole weight, masking, master-weight reload and the engine's own
state in a checkpoint. ``MegatronEngine`` (``pretrain.engines.megatron``: DDP and megatron-core's
optimizer) and ``DeepSpeedEngine`` (``pretrain.engines.deepspeed``: ZeRO) implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ParamSlot:
    param: torch.nn.Parameter  # the model parameter
    start: int  # owned range in the flattened parameter
    end: int
    main_param: torch.Tensor | None  # flat fp32 master values for [start, end) (may alias param)
    state: dict  # optimizer state tensors for [start, end) (exp_avg, exp_avg_sq, step)
    # the reduced gradient of [start, end) where the engine keeps it outside the parameter
    # (DeepSpeed's partition buffers); None: ``param.main_grad`` / ``param.grad`` hold it
    grad: torch.Tensor | None = None
    # the parameter's values of [start, end) where the parameter itself holds none of them
    # (a ZeRO-3 partitioned parameter); None: read ``param``
    values: torch.Tensor | None = None


class Engine(ABC):
    """One way to run the model: its step, its optimizer state, its checkpoint files."""

    #: the ``--engine`` value that runs it (named in messages about a checkpoint's engine)
    name: str
    #: whether a checkpoint keeps this engine's state in files of its own that only it reads, on
    #: the layout that wrote them (``save_files``/``load_files``); False: its optimizer state is
    #: megatron-core's sharded state, saved beside the model's (``sharded_state_dict``)
    own_checkpoint_files: bool = False
    #: this rank's model chunks (what the forward runs)
    model_chunks: list
    #: what the LR schedule drives (``param_groups``)
    optimizer: object

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    # -- the training step
    @abstractmethod
    def forward_backward(self, forward_step, data_iterator, num_microbatches: int, seq_length: int,
                         micro_batch_size: int) -> list:
        """Every micro-batch's forward and backward from zero gradients, the gradients reduced over
        data parallel; the optimizer has not stepped. Returns the micro-batches' loss dicts."""

    @abstractmethod
    def gradients_finite(self) -> bool:
        """Whether the reduced gradients are finite on every rank (collective)."""

    @abstractmethod
    def step(self, finite: bool) -> tuple[bool, float]:
        """The optimizer step after ``forward_backward``; none from gradients that are not
        ``finite``. Returns (whether the weights were updated, the gradient norm)."""

    @abstractmethod
    def discard_gradients(self) -> None:
        """Drop the gradients of the micro-batches run since the last step, so that the next
        ``forward_backward`` starts a fresh accumulation; no step, nothing else changes."""

    # -- parameters and optimizer state
    @abstractmethod
    def param_slots(self) -> Iterator[ParamSlot]:
        """Every parameter this rank owns (part of), with its master values, Adam moments and
        reduced gradient over that part (views: writing them writes the engine's state)."""

    @abstractmethod
    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that keep the Adam state."""

    @property
    @abstractmethod
    def partitions_state(self) -> bool:
        """Whether each data-parallel rank owns only part of the optimizer state and reduced
        gradients (each element on exactly one DP rank); False: every rank holds all of it."""

    # whether a ``ParamSlot.grad`` can hold a reduced gradient (DeepSpeed's partition buffers): True
    # unless an engine knows its gradients live in the parameters (``main_grad``/``grad``) only;
    # masking the gradients every step asks it before walking the slots for nothing
    grads_outside_params: bool = True

    @abstractmethod
    def init_optimizer_state(self) -> None:
        """Give every Adam the state its first step would create (zero moments, step 0) where it
        has none yet, so that it can be written (a load, a scatter of model-space state)."""

    def full_shape(self, param: torch.nn.Parameter) -> tuple:
        """The (TP-local) shape of ``param`` as the model defines it, whatever this rank holds."""
        return tuple(param.shape)

    def whole_weight(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's whole (TP-local) weight as the forward uses it (collective over data parallel
        where the engine partitions weights: every DP rank must ask for the same parameters)."""
        return param.detach()

    def release_gathered(self, param: torch.nn.Parameter) -> None:
        """Free a whole weight the engine gathered for the forward, after its partition was written."""

    def mask_weights(self, param_masks: dict) -> None:
        """Zero masked elements of weights the engine holds outside the parameters' own storage
        (``LocalModelMasks.apply_to_weights`` masks the parameters)."""

    @abstractmethod
    def reload_master_weights(self) -> None:
        """Copy the model's weights into the optimizer's fp32 master copies (after the weights
        were written behind the optimizer's back: an init, a load of weights alone)."""

    # -- its state in a checkpoint (``pretrain.checkpoint``)
    def sharded_state_dict(self, model_sd: dict, is_loading: bool, metadata: dict) -> dict:
        """The optimizer's state as megatron-core sharded tensors over ``model_sd`` (the model's)."""
        raise NotImplementedError(f"--engine {self.name} keeps its state in files of its own")

    def load_state_dict(self, state: dict) -> None:
        """The optimizer state ``sharded_state_dict(..., is_loading=True)`` was loaded into."""
        raise NotImplementedError(f"--engine {self.name} keeps its state in files of its own")

    def save_files(self, folder: str, tag: str) -> None:
        """Collective: the engine's own files (weights and optimizer state) under ``folder/tag``."""
        raise NotImplementedError(f"--engine {self.name} saves its state beside the model's")

    def load_files(self, folder: str, tag: str, load_optim: bool) -> bool:
        """Collective: weights and (``load_optim``) optimizer state from ``save_files``'s files;
        False when nothing was found."""
        raise NotImplementedError(f"--engine {self.name} saves its state beside the model's")

    def checkpoint_pickle_globals(self) -> list:
        """The classes the engine's own files pickle besides tensors and plain containers."""
        return []


def ensure_adam_moments(optimizer: torch.optim.Optimizer, params: list) -> None:
    """Zero moments and step 0 for each of ``params`` that torch's (W)Adam ``optimizer`` keeps no
    state for yet: what its first step would create."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for p in params:
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
