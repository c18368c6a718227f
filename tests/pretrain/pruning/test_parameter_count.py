"""The one parameter count (``ModelShape``; ``ModelConfig.num_parameters`` delegates to it) against
the ``numel`` of real megatron-core models built by ``pretrain.model.build.build_model`` in a world of
one: uniform, MHA, per-layer widths, q/k/v biases, untied embeddings, and masks with dropped
layers (counted masked, then built at the shrunk shape)."""

import pytest
import torch

from pretrain.config import ModelConfig
from tests.dist_helper import run_distributed

pytestmark = [pytest.mark.distributed]

VOCAB = 96
BASE = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            seq_length=16)
CONFIGS = {
    "uniform": ModelConfig(**BASE),
    "mha": ModelConfig(**{**BASE, "num_query_groups": None}),
    "qkv-bias": ModelConfig(**BASE, add_qkv_bias=True),
    "untied": ModelConfig(**BASE, untie_embeddings_and_output_weights=True),
    "per-layer": ModelConfig(**{**BASE, "kv_channels": 8}, add_qkv_bias=True, layer_shapes=[
        {"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 48},
        {"num_query_groups": 1, "num_attention_heads": 2, "ffn_hidden_size": 16},
        {"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 8}]),
}


def _pruned_masks(shape):
    """Masks with a dropped layer and narrower groups, FFN and hidden elsewhere."""
    masks = shape.full_masks()
    masks.drop_layer(1)
    masks.heads[0, 1] = False
    masks.ffn[2, :shape.ffn_of(2) // 2] = False
    masks.hidden[::4] = False
    return masks


def _pruned_configs():
    from pretrain.pruning.masks import ModelShape
    from pretrain.model.shrunk import shrunk_model_config

    out = {}
    for name in ("uniform", "untied", "qkv-bias", "per-layer"):
        shape = ModelShape.from_config(CONFIGS[name], VOCAB)
        masks = _pruned_masks(shape)
        out[f"{name}, pruned"] = (shrunk_model_config(CONFIGS[name], masks, shape), shape.parameter_count(masks))
    return out


def numel_worker(configs: dict) -> dict:
    from pretrain.config import ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model

    init_distributed(1, 1)
    set_random_seed(0)
    out = {}
    for name, cfg in configs.items():
        model = build_model(cfg, ParallelConfig(), TrainConfig(), VOCAB, use_te=False, wrap_ddp=False)[0]
        out[name] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def built():
    pruned = _pruned_configs()
    configs = {**CONFIGS, **{name: cfg for name, (cfg, _) in pruned.items()}}
    return run_distributed(numel_worker, 1, configs)[0], {name: count for name, (_, count) in pruned.items()}


def _numel(shapes: dict, prefix: str = "") -> int:
    return sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith(prefix))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_equals_the_numel_of_the_real_model(built, name):
    from pretrain.pruning.masks import ModelShape

    shapes = built[0][name]
    cfg = CONFIGS[name]
    shape = ModelShape.from_config(cfg, VOCAB)
    assert shape.parameter_count(shape.full_masks()) == _numel(shapes)
    parts = cfg.num_parameters(VOCAB)
    assert parts["total"] == _numel(shapes)
    assert parts["embedding"] == _numel(shapes, "embedding.")
    assert parts["output_layer"] == _numel(shapes, "output_layer.")
    assert parts["per_layer"] == _numel(shapes, "decoder.layers.0.")
    assert parts["attention"] == _numel(shapes, "decoder.layers.0.self_attention.")
    assert parts["mlp"] == _numel(shapes, "decoder.layers.0.mlp.")
    assert parts["non_embedding"] == _numel(shapes) - _numel(shapes, "embedding.") - _numel(shapes, "output_layer.")


def test_masked_count_equals_the_numel_of_the_shrunk_model(built):
    shapes, expected = built
    assert expected
    for name, count in expected.items():
        assert count == _numel(shapes[name]), name


def test_every_parameter_of_a_real_model_has_a_layout(built):
    from pretrain.model import layout

    for name, shapes in built[0].items():
        for param, size in shapes.items():
            assert len(layout.param_layout(param).axes) == len(size), (name, param)


def test_a_unit_costs_what_removing_it_removes():
    """The solver's unit costs are differences of the one count."""
    from pretrain.pruning.masks import ModelShape

    for cfg in CONFIGS.values():
        shape = ModelShape.from_config(cfg, VOCAB)
        full = shape.full_masks()
        h = shape.hidden
        for kind, cost in (("heads", shape.group_cost(h)), ("ffn", shape.ffn_channel_cost(h)),
                           ("hidden", shape.hidden_channel_cost(full))):
            smaller = full.clone()
            if kind == "hidden":
                smaller.hidden[0] = False
            else:
                getattr(smaller, kind)[0, 0] = False
            assert shape.parameter_count(full) - shape.parameter_count(smaller) == cost, (cfg, kind)
        dropped = full.clone()
        dropped.drop_layer(0)
        assert shape.parameter_count(full) - shape.parameter_count(dropped) == int(shape.layer_costs(full)[0])


def test_shrinking_nothing_keeps_the_count():
    from pretrain.pruning.masks import ModelShape
    from pretrain.model.shrunk import shrunk_model_config

    for cfg in CONFIGS.values():
        shape = ModelShape.from_config(cfg, VOCAB)
        same = shrunk_model_config(cfg, shape.full_masks(), shape)
        assert same.num_parameters(VOCAB)["total"] == cfg.num_parameters(VOCAB)["total"]
