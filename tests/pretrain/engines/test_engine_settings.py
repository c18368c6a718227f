"""--deepspeed-config and our flags (issue 17): the flag wins where both set something, and says so;
what the file may not decide is refused by validate(), before any process group."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pretrain.config import ConfigError, DataConfig, ModelConfig, MODEL_PRESETS, ParallelConfig, PretrainConfig, \
    TrainConfig


def _cfg(tmp_path, settings: dict | None, **parallel) -> PretrainConfig:
    path = None
    if settings is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(settings))
    return PretrainConfig(model=ModelConfig(**MODEL_PRESETS["debug"]), data=DataConfig(mock_data=True),
                          parallel=ParallelConfig(engine="deepspeed", deepspeed_config=str(path) if path else None,
                                                  **parallel),
                          train=TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=2))


def test_flags_win_over_the_file_with_a_note(tmp_path):
    from pretrain.engines.deepspeed import deepspeed_settings

    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": False}, "gradient_clipping": 5.0,
                          "wall_clock_breakdown": True}, zero_stage=3, offload_optimizer="cpu")
    cfg.validate(4)
    settings, notes = deepspeed_settings(cfg, data_parallel_size=4)
    zero = settings["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["overlap_comm"] is False and settings["wall_clock_breakdown"] is True  # the file's own settings stay
    assert settings["gradient_clipping"] == cfg.optim.clip_grad
    assert settings["train_batch_size"] == 8 and settings["gradient_accumulation_steps"] == 1
    assert any("zero_optimization.stage 2 replaced by --zero-stage (3)" in n for n in notes), notes
    assert any("gradient_clipping 5.0 replaced by --clip-grad" in n for n in notes), notes


def test_the_file_decides_what_no_flag_gave(tmp_path):
    from pretrain.engines.deepspeed import deepspeed_settings

    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    cfg.validate(2)
    settings, notes = deepspeed_settings(cfg, data_parallel_size=2)
    assert settings["zero_optimization"]["stage"] == 2
    assert settings["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert notes == []
    assert _cfg(tmp_path, None).parallel.zero_stage is None  # no file, no flag: stage 1 (deepspeed_settings)
    assert deepspeed_settings(_cfg(tmp_path, None), 1)[0]["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("settings,parallel,message", [
    ({"train_micro_batch_size_per_gpu": 4}, {}, r"train_micro_batch_size_per_gpu 4 contradicts --micro-batch-size \(2\)"),
    ({"gradient_accumulation_steps": 3}, {}, r"gradient_accumulation_steps 3 contradicts"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, r"remove its \"scheduler\" section"),
    ({"fp16": {"enabled": True}}, {}, r"fp16 is not supported"),
    ([1, 2], {}, r"a JSON object is needed, not list"),
    (None, {"zero_stage": 0}, r"--zero-stage 0: DeepSpeed ZeRO has stages 1, 2 and 3"),
    (None, {"pipeline_model_parallel_size": 2}, r"--engine deepspeed with --pipeline-model-parallel-size 2"),
])
def test_what_the_file_may_not_decide(tmp_path, settings, parallel, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, settings, **parallel).validate(4)


def test_engine_flags_need_the_deepspeed_engine():
    cfg = PretrainConfig(model=ModelConfig(**MODEL_PRESETS["debug"]), data=DataConfig(mock_data=True),
                         parallel=ParallelConfig(offload_optimizer="cpu"),
                         train=TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=2))
    with pytest.raises(ConfigError, match=r"--offload-optimizer needs --engine deepspeed"):
        cfg.validate(1)
    dataclasses.replace(cfg, parallel=ParallelConfig()).validate(1)


def test_distillation_and_compensation_are_accepted_under_deepspeed(tmp_path):
    # both run under ZeRO-1/2/3 (tests/pretrain/engines/test_engine_deepspeed_features.py): no longer refused
    cfg = _cfg(tmp_path, None, zero_stage=3)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher="/some/teacher"),
                              prune=dataclasses.replace(cfg.prune, target_ratio=0.5, compensation="obs"))
    cfg.validate(4)
