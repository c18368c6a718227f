from pretrain.config import MODEL_PRESETS, ModelConfig


def test_preset_parameter_counts_match_published_models():
    # SmolLM-135M, SmolLM-360M, SmolLM-1.7B and Llama-3.2-1B (tied embeddings)
    expected = {"smollm-135m": 134.5e6, "smollm-360m": 361.8e6, "smollm-1.7b": 1711.4e6,
                "llama-3.2-1b": 1235.8e6}
    for name, params in expected.items():
        cfg = ModelConfig(**MODEL_PRESETS[name])
        cfg.validate()
        total = cfg.num_parameters(cfg.vocab_size)["total"]
        assert abs(total - params) / params < 0.002, (name, total)


def test_vocab_padding_follows_megatron():
    cfg = ModelConfig(**MODEL_PRESETS["debug"])
    assert cfg.padded_vocab_size(1000, tensor_parallel=2) == 1024  # multiple of 64 x 2
    assert cfg.padded_vocab_size(1024, tensor_parallel=1) == 1024
