"""Where a megatron-format checkpoint records the Adam step (``pretrain.engines.adam_state._step_in``).

The moments themselves are checked end to end by the engine tests (tests/pretrain/
test_engine_deepspeed.py): a checkpoint converted either way, or shrunk in-run under ZeRO, continues
the other run's losses step for step, which needs the masters, both moments and the step."""

from __future__ import annotations

from pretrain.engines.adam_state import MARKER, _step_in


def test_step_of_megatron_cores_optimizer_param_groups():
    # megatron-core (torch Adam, no apex/TE) stores the step in every param group of its common state
    common = {"optimizer": {"optimizer": {"param_groups": [{"lr": 1e-3, "step": 7.0}, {"lr": 1e-3, "step": 7.0}]},
                            "param_state_sharding_type": "fully_reshardable"}}
    assert _step_in(common) == 7


def test_step_of_a_chained_optimizer():
    common = {"optimizer": [{"optimizer": {"param_groups": [{"step": 3}]}},
                            {"optimizer": {"param_groups": [{"step": 3}]}}]}
    assert _step_in(common) == 3


def test_step_of_megatron_cores_non_distributed_optimizer():
    # Float16OptimizerWithFloat16Params / FP32Optimizer (--no-use-distributed-optimizer): "common_step"
    common = {"optimizer": {"optimizer": {"state": {"common_step": 4}, "param_groups": [{"lr": 1e-3}]}}}
    assert _step_in(common) == 4


def test_step_written_by_model_space_adam():
    assert _step_in({"optimizer": {"param_state": {}, MARKER: {"step": 12}}}) == 12


def test_no_step_means_no_adam_state():
    # a weights-only checkpoint: no Adam state
    assert _step_in({}) is None
    assert _step_in({"optimizer": {"optimizer": {"param_groups": [{"lr": 1e-3}]}}}) is None
