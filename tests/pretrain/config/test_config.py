from pretrain.config import MODEL_PRESETS, ModelConfig


def test_preset_parameter_counts_match_published_models():
    # SmolLM-135M, SmolLM-360M, SmolLM-1.7B, Llama-3.2-1B and Qwen2.5-0.5B (tied embeddings)
    expected = {"smollm-135m": 134.5e6, "smollm-360m": 361.8e6, "smollm-1.7b": 1711.4e6,
                "llama-3.2-1b": 1235.8e6, "qwen2.5-0.5b": 494.0e6}
    for name, params in expected.items():
        cfg = ModelConfig(**MODEL_PRESETS[name])
        cfg.validate()
        total = cfg.num_parameters(cfg.vocab_size)["total"]
        assert abs(total - params) / params < 0.002, (name, total)


def test_vocab_padding_follows_megatron():
    cfg = ModelConfig(**MODEL_PRESETS["debug"])
    assert cfg.padded_vocab_size(1000, tensor_parallel=2) == 1024  # multiple of 64 x 2
    assert cfg.padded_vocab_size(1024, tensor_parallel=1) == 1024


def test_rope_scaling_flags_follow_megatron_lm():
    from pretrain.run.arguments import build_parser, config_from_args

    base = ["--model", "debug", "--train-iters", "2", "--mock-data"]
    plain = config_from_args(build_parser().parse_args(base)).model
    scaled = config_from_args(build_parser().parse_args(base + ["--use-rope-scaling", "--rope-scaling-factor",
                                                                "32"])).model
    assert not plain.use_rope_scaling
    assert scaled.use_rope_scaling and scaled.rope_scaling_factor == 32.0
    assert ModelConfig(**MODEL_PRESETS["llama-3.2-1b"]).use_rope_scaling


def test_micro_batches_per_step_is_one_count():
    """Issue 30: the trainer, the DeepSpeed settings and the plan read one count."""
    from pretrain.config import ParallelConfig, PretrainConfig, TrainConfig
    from pretrain.engines.deepspeed import deepspeed_settings

    train = TrainConfig(micro_batch_size=2, global_batch_size=16, train_iters=1)
    assert [train.micro_batches_per_step(dp) for dp in (1, 2, 4, 8)] == [8, 4, 2, 1]
    cfg = PretrainConfig(model=ModelConfig(**MODEL_PRESETS["debug"]), parallel=ParallelConfig(engine="deepspeed"),
                         train=train)
    assert deepspeed_settings(cfg, 4)[0]["gradient_accumulation_steps"] == 2
