"""A fix for megatron-core's distributed optimizer when it runs on torch's Adam.

Not CPU-specific: megatron-core picks its Adam at import time (Transformer Engine's FusedAdam, else
apex's, else ``torch.optim.Adam``), so a GPU machine without TE and apex has the same problem as
a CPU one. torch's Adam keeps ``step`` in every parameter's state; loading a "fully_reshardable"
checkpoint then fails with ``KeyError: 'step'`` in
``DistributedOptimizer._set_main_param_and_optimizer_states`` (the loader drops ``step`` from the
source tensors, the destination state still has it; ``load_state_dict`` sets ``step`` itself).
The fix feeds the destination's own ``step`` back, so that key copies onto itself.

Applied when it is needed (a feature check: megatron-core's distributed optimizer uses torch's
Adam, and the method it wraps exists), whatever the device; a no-op otherwise.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def distributed_optimizer_uses_torch_adam() -> bool:
    """Whether megatron-core's DistributedOptimizer builds torch's Adam (no TE or apex FusedAdam)."""
    try:
        from megatron.core.optimizer import distrib_optimizer
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return False
    adam = getattr(distrib_optimizer, "Adam", None)
    return adam is not None and getattr(adam, "__module__", "").startswith("torch.")


def torch_adam_step_fix_needed() -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = getattr(DistributedOptimizer, "_set_main_param_and_optimizer_states", None)
    return (method is not None and not getattr(method, "_step_fix", False)
            and distributed_optimizer_uses_torch_adam())


def apply_torch_adam_step_fix() -> bool:
    """Apply the fix if needed (idempotent). Returns whether the fix is in place."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = getattr(DistributedOptimizer, "_set_main_param_and_optimizer_states", None)
    if original is None:
        return False
    if getattr(original, "_step_fix", False):
        return True
    if not distributed_optimizer_uses_torch_adam():
        return False

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not getattr(
            self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
        ):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return original(self, model_param, tensors)

    _set_main_param_and_optimizer_states._step_fix = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    logger.info("torch-Adam 'step' fix applied to megatron-core's DistributedOptimizer")
    return True
