"""DeepSpeed ZeRO (stages 1-3, optimizer offload) as the trainer's engine (``--engine deepspeed``).

The megatron-core model (TP inside its layers, our masked layer specs) is wrapped by
``deepspeed.initialize`` with megatron-core's ``parallel_state`` as DeepSpeed's ``mpu``, so
DeepSpeed's data-parallel group *is* megatron-core's DP group and its gradient norm counts a
TP-split weight once per TP rank and a replicated one once (``tensor_model_parallel``
attribute). The optimizer is the same AdamW (same no-decay groups) the megatron engine builds,
handed to DeepSpeed as a client optimizer, and the LR schedule stays megatron-core's
``OptimizerParamScheduler`` driving ``param_groups``. ``DeepSpeedEngine`` is the trainer's
``Engine`` (``pretrain.engines.base``), as ``MegatronEngine`` is the default's: callbacks, data
position and checkpoints stay the same.

Pruning reaches the partitioned state through ``ParamSlot``s (``param_slots``): for ZeRO-1/2 the
fragment mapping DeepSpeed's own ``safe_get_full_*`` accessors read (``param._hp_mapping``: this
rank's range of the flattened parameter, its fp32 master fragment, its Adam-moment fragments and
its reduced-gradient fragment, all views), for ZeRO-3 the partition lookups that DeepSpeed's
public ``safe_get_local_*`` accessors are built on (views; the accessors themselves return copies
on a GPU when the optimizer is offloaded: ``_zero3_slots``).

PP > 1 is refused by ``ParallelConfig.validate_engine`` before any process group starts.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from pretrain.config import PretrainConfig, read_deepspeed_json
from pretrain.distributed import launch_environment, print_rank0
from pretrain.engines.base import Engine, ParamSlot, ensure_adam_moments


def deepspeed_settings(cfg: PretrainConfig, data_parallel_size: int) -> tuple[dict, list[str]]:
    """DeepSpeed's config dict for this run and the notes on --deepspeed-config values our flags
    replaced (a flag wins where both set something). The file was validated by ``cfg.validate``."""
    given = read_deepspeed_json(cfg.parallel.deepspeed_config)
    settings, notes = copy.deepcopy(given), []
    source = cfg.parallel.deepspeed_config

    def ours(keys: tuple, value, flag_text: str) -> None:
        node = settings
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        old = node.get(keys[-1], value)
        if old != value:
            notes.append(f"--deepspeed-config {source}: {'.'.join(keys)} {old!r} replaced by {flag_text} ({value!r})")
        node[keys[-1]] = value

    zero = settings.setdefault("zero_optimization", {})
    if cfg.parallel.zero_stage is not None:
        ours(("zero_optimization", "stage"), cfg.parallel.zero_stage, "--zero-stage")
    zero.setdefault("stage", 1)
    if cfg.parallel.offload_optimizer is not None:
        ours(("zero_optimization", "offload_optimizer", "device"), cfg.parallel.offload_optimizer,
             "--offload-optimizer")
    ours(("gradient_clipping",), float(cfg.optim.clip_grad), "--clip-grad")
    ours(("bf16", "enabled"), bool(cfg.train.bf16), "--bf16" if cfg.train.bf16 else "no --bf16")
    t = cfg.train
    settings["train_batch_size"] = t.global_batch_size
    settings["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    settings["gradient_accumulation_steps"] = t.micro_batches_per_step(data_parallel_size)
    # the client optimizer is torch's AdamW (megatron-core's "adam" without apex/TE); DeepSpeed's
    # CPU Adam is a compiled extension (not built here), so an offloaded torch AdamW is allowed
    settings.setdefault("zero_allow_untested_optimizer", True)
    settings.setdefault("zero_force_ds_cpu_optimizer", False)
    settings.setdefault("steps_per_print", 10**9)  # our logging callback reports steps
    offload = zero.get("offload_optimizer", {})
    if isinstance(offload, dict) and offload.get("device") == "cpu":
        offload.setdefault("pin_memory", torch.cuda.is_available())
    return settings, notes


class MegatronMPU:
    """megatron-core's ``parallel_state`` through the ``mpu`` interface DeepSpeed reads. With
    PP = 1 (the only layout this engine takes) DeepSpeed's "model parallel" is megatron's TP."""

    @staticmethod
    def get_data_parallel_group():
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group_ranks() -> list:
        return torch.distributed.get_process_group_ranks(MegatronMPU.get_data_parallel_group())

    @staticmethod
    def get_model_parallel_group():
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    @staticmethod
    def get_tensor_model_parallel_src_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_src_rank()


def _adamw(model, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The megatron engine's optimizer: AdamW, no weight decay on biases and 1-D parameters
    (``wd_mult`` 0, which ``OptimizerParamScheduler`` reads). The LR starts at 0: the scheduler
    sets it before the first step."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    o = cfg.optim
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=o.weight_decay)


def _quiet_cpu_comm() -> None:
    """DeepSpeed's CPU backend builds a shared-memory all-reduce extension on first use (~40 s of
    C++ compile per process; FACTS.md); its training collectives go through torch.distributed
    (gloo) either way, so the extension is not built."""
    if torch.cuda.is_available():
        return
    import importlib

    # by name: ``import deepspeed.comm.torch as m`` would give torch itself (an attribute of deepspeed.comm)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def build_deepspeed_engine(cfg: PretrainConfig, model) -> "DeepSpeedEngine":
    """Wrap ``model`` (an unwrapped megatron-core GPTModel of this rank) in a DeepSpeed engine."""
    import deepspeed

    from megatron.core import parallel_state as ps

    _quiet_cpu_comm()
    # DeepSpeed asserts on LOCAL_RANK, which only torchrun sets: a plain `python -m pretrain`
    # (a world of one) or another launcher has its local rank from launch_environment
    os.environ.setdefault("LOCAL_RANK", str(launch_environment()[2]))
    settings, notes = deepspeed_settings(cfg, ps.get_data_parallel_world_size())
    for note in notes:
        print_rank0(note)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=_adamw(model, cfg), config=settings,
                                                   mpu=MegatronMPU(), dist_init_required=False)
    zero = settings["zero_optimization"]
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    print_rank0(f"engine: DeepSpeed {deepspeed.__version__} ZeRO-{zero['stage']}, optimizer offload {offload}, "
                f"DP group = megatron-core's ({ps.get_data_parallel_world_size()} ranks)")
    return DeepSpeedEngine(engine, int(zero["stage"]), offload)


class DeepSpeedEngine(Engine):
    """A DeepSpeed ZeRO engine as the trainer's ``Engine``."""

    name = "deepspeed"
    # DeepSpeed's own files (model and ZeRO partitions) under the checkpoint's deepspeed/ folder
    own_checkpoint_files = True

    def __init__(self, engine, stage: int, offload: str):
        self.engine, self.stage, self.offload = engine, stage, offload
        self.optimizer = engine.optimizer  # ZeRO's optimizer: its param_groups drive the LR schedule
        self.model = engine.module
        self.model_chunks = [engine.module]

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW inside ZeRO (its params are ZeRO's flat fp32 partitions)."""
        return self.optimizer.optimizer

    def optimizer_state_params(self) -> list:
        """The flat fp32 partitions the AdamW keeps state for (ZeRO-3 puts each into its param
        groups only for the duration of its step, so the groups cannot be asked)."""
        zero = self.optimizer
        return list(zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.torch_optimizer]

    @property
    def partitions_state(self) -> bool:
        return True  # every ZeRO stage partitions the optimizer state over DP

    def init_optimizer_state(self) -> None:
        ensure_adam_moments(self.torch_optimizer, self.optimizer_state_params())

    def reload_master_weights(self) -> None:
        """Nothing to do: DeepSpeed copies the weights into its fp32 masters when it wraps the model,
        and reads its masters with its own files; weights alone are loaded before it wraps the model
        (``pretrain.run.build``)."""

    def full_shape(self, param: torch.nn.Parameter) -> tuple:
        return tuple(getattr(param, "ds_shape", None) or param.shape)  # a ZeRO-3 partition keeps it there

    def whole_weight(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self.gathered_weight(param) if hasattr(param, "ds_tensor") else param.detach()

    # -- the training step
    def forward_backward(self, forward_step, data_iterator, num_microbatches: int, seq_length: int = 0,
                         micro_batch_size: int = 0) -> list:
        """Every micro-batch's forward and ``engine.backward`` (DeepSpeed scales by the number of
        micro-batches and reduces over DP on the last); the optimizer has not stepped after it.
        Returns the micro-batches' loss dicts, as megatron-core's schedule does (the sequence
        length and micro-batch size are the batches' own here)."""
        self.engine.train()
        losses = []
        for i in range(num_microbatches):
            # DeepSpeed counts micro-steps itself; the last backward is the accumulation boundary
            self.engine.set_gradient_accumulation_boundary(i == num_microbatches - 1)
            output, loss_func = forward_step(data_iterator, self.engine)
            loss, stats = loss_func(output)
            self.engine.backward(loss)
            losses.append(stats)
        return losses

    def discard_gradients(self) -> None:
        """Drop the gradients of the micro-batches run since the last step (the language-model pass
        of a distilled scoring step: ``Trainer._lm_gradient_pass``), so that the next micro-batches
        start a fresh accumulation window. This is what DeepSpeed does itself for a step it skips on
        an overflow (``DeepSpeedZeroOptimizer.step``; ``DeepSpeedZeroOptimizer_Stage3.
        _overflow_clean_up`` and the micro-step reset of its ``_pre_step``): no step is taken, the
        weights, masters, moments and step counts stay as they are."""
        zero = self.optimizer
        if hasattr(zero, "_wait_for_offload_copies"):
            zero._wait_for_offload_copies()
        if self.stage == 3:
            zero._overflow_clean_up(zero.loss_scale)  # its zero_grad sets micro_step_id 0: the next reduce copies
            if hasattr(zero, "_offload_boundary_param_ids"):
                zero._offload_boundary_param_ids = set()
            return
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero.micro_step_id = INITIAL_MICRO_STEP_ID
        zero.zero_grad(set_to_none=True)
        zero._release_preflattened_grad_buffers()
        if zero.cpu_offload:
            zero.reset_cpu_buffers()
            zero._offload_accumulated_param_ids = set()
        else:
            for key in zero.averaged_gradients.keys():
                zero.averaged_gradients[key] = None
                zero.all_grad_tensors[key] = None

    def gradients_finite(self) -> bool:
        """Whether the reduced gradients are finite on every rank (DeepSpeed's own overflow check:
        this rank's gradient partitions, max over DP and TP)."""
        return not self.engine.optimizer.has_overflow(partition_gradients=True)

    def step(self, finite: bool = True) -> tuple[bool, float]:
        """One optimizer step, whether ``finite`` or not: DeepSpeed clips by the global norm and
        skips a non-finite step itself (and keeps its micro-step count)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return bool(self.engine.was_step_applied()) and math.isfinite(norm), norm

    # -- checkpoints: DeepSpeed's own files, inside our atomic folder (pretrain.checkpoint)
    def save_files(self, folder: str, tag: str) -> None:
        """Collective: every rank writes its model/ZeRO partition files under ``folder/tag``."""
        # no 'latest' file of DeepSpeed's: our manifest and latest pointer decide what is complete
        self.engine.save_checkpoint(folder, tag=tag, client_state={}, save_latest=False)

    def load_files(self, folder: str, tag: str, load_optim: bool) -> bool:
        """Collective: weights, and (``load_optim``) the ZeRO partitions of the fp32 masters and
        Adam moments. False when DeepSpeed found nothing to load."""
        path, _ = self.engine.load_checkpoint(folder, tag=tag, load_optimizer_states=load_optim,
                                              load_lr_scheduler_states=False, load_module_only=not load_optim)
        return path is not None

    def checkpoint_pickle_globals(self) -> list:
        return checkpoint_pickle_globals()

    # -- partitioned state, for pruning
    def param_slots(self):
        """Every parameter this rank owns part of, with its fp32 master values, Adam moments and
        reduced gradient over that part (views: writing them writes DeepSpeed's state)."""
        if self.stage == 3:
            yield from self._zero3_slots()
        else:
            yield from self._zero12_slots()

    def _link_optimizer_state(self) -> None:
        """Point every parameter's fragment mapping at its Adam moments. DeepSpeed 0.19.8 links
        them once, right after the *first* param group's first step (``_lazy_init_hp_params_
        optimizer_state`` runs inside the per-group loop and then marks itself done), so the
        parameters of a second group (our no-decay group: norms) are left with no moments; linking
        again with DeepSpeed's own helper is idempotent (narrow views of the same state)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.optimizer
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            state = zero.optimizer.state.get(flat)
            if state:
                lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, zero.optimizer.state)

    def _zero12_slots(self):
        self._link_optimizer_state()
        for param in self.model.parameters():
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue
            address = mapping.lp_fragment_address
            state = dict(mapping.optim_fragment or {})  # empty before the first step
            try:
                grad = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
            except (ValueError, KeyError, IndexError):  # outside backward..step: no gradients
                grad = None
            yield ParamSlot(param, address.start, address.start + address.numel, mapping.get_hp_fragment(), state,
                            grad=grad)

    def _zero3_slots(self):
        """ZeRO-3: views of each parameter's partition in the optimizer's flat fp32 groups, its Adam
        moments and its reduced gradient. DeepSpeed's public ``safe_get_local_*`` accessors return
        ``.to(accelerator)`` of these: with the optimizer offloaded to the host and a GPU, a copy,
        so a write to it (a mask, a compensation, a loaded moment) would go nowhere. The partition
        lookups they are built on (``_get_fp32_opt_state_partition``/``_get_fp32_grad_state_
        partition``: ``grad_position`` into ``fp32_partitioned_groups_flat``) give views."""
        zero = self.optimizer
        for param in self.model.parameters():
            if not hasattr(param, "ds_id") or not param.requires_grad:
                continue
            part = param.ds_tensor.ds_numel
            start = self._partition_rank() * part
            end = min(param.ds_numel, start + part)
            if end <= start:
                continue
            main = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False)[0][:end - start]
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                try:
                    state[key] = zero._get_fp32_opt_state_partition(param, False, optim_state_key=key)[0][:end - start]
                except KeyError:  # before the first step torch's AdamW has no state yet
                    pass
            try:
                grad = zero._get_fp32_grad_state_partition(param, release_swap_buffers=False)[0][:end - start]
            except (KeyError, AttributeError, AssertionError):  # outside backward..step: no gradients
                grad = None
            yield ParamSlot(param, start, end, main, state, grad=grad,
                            values=param.ds_tensor.data.view(-1)[:end - start])

    @staticmethod
    def _partition_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @staticmethod
    @torch.no_grad()
    def gathered_weight(param) -> torch.Tensor:
        """A copy of the whole (TP-local) weight of a ZeRO-3 partitioned parameter, as the forward
        uses it. Collective over the parameter's data-parallel group (DeepSpeed's
        ``GatheredParameters``; the parameter is released again on return, a persistent one too, so
        the next forward gathers its partition)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()

    def release_gathered(self, param) -> None:
        """Free the gathered whole weight of a ZeRO-3 parameter (its partition stays), so that the
        next forward gathers the partition again: after the partition was written."""
        param.partition(param_list=[param], has_been_updated=False)

    def mask_weights(self, param_masks: dict) -> None:
        """Zero masked elements of ZeRO-3's partitions of the weights (this rank's share of each
        parameter). A parameter ZeRO-3 does not partition holds its weight itself, and
        ``LocalModelMasks.apply_to_weights`` (which every caller runs first) masked it; the fp32
        masters are masked through ``param_slots``."""
        with torch.no_grad():
            for param, mask in param_masks.items():
                if hasattr(param, "ds_tensor"):
                    part = param.ds_tensor.ds_numel
                    start = self._partition_rank() * part
                    end = min(param.ds_numel, start + part)
                    if end > start:
                        local = param.ds_tensor.data.view(-1)[:end - start]
                        local.masked_fill_(~mask.reshape(-1)[start:end].to(local.device), 0)  # NaN-safe


def checkpoint_pickle_globals() -> list:
    """The classes DeepSpeed's checkpoint files pickle besides tensors and plain containers: data
    (an enum, ordered dicts, its loss-scaler record), none that runs code when unpickled."""
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # LossScaler: a plain object (its attributes restored, no __setstate__) stored even without fp16
    found = [OrderedDict, ZeroStageEnum, LossScaler, torch.Size]
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        found.append(fragment_address)
    except ImportError:
        pass
    return found


