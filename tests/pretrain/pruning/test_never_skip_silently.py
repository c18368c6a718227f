"""The mask builder and the saliency estimator stop on what they cannot handle instead of skipping
it (DESIGN invariant 1): a norm that is not mask-aware once hidden channels are dropped, a
parameter the layout does not know when scoring."""

import dataclasses
import types

import pytest
import torch

from tests.dist_helper import run_distributed

pytestmark = [pytest.mark.distributed]


def worker():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.identity_op import IdentityOp

    import megatron_patches.layer_specs as specs
    from pretrain.config import MODEL_PRESETS, ModelConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model, build_transformer_config
    from pretrain.model.invariants import MaskInvariantError
    from pretrain.pruning.masks import ModelShape, build_local_masks
    from pretrain.pruning.saliency import SaliencyEstimator

    init_distributed(1, 1)
    set_random_seed(1)
    model_cfg = ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=16))
    shape = ModelShape.from_config(model_cfg, 128)
    out = {}

    # a model whose layers lack the input norm (as the fused TE spec has it)
    config = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(seed=1))
    no_norm = dataclasses.replace(specs.local_modules(), input_layernorm=IdentityOp)
    model = GPTModel(config=config, transformer_layer_spec=specs.gpt_block_spec(config, modules=no_norm),
                     vocab_size=128, max_sequence_length=16, position_embedding_type="rope")
    out["full_masks_built"] = len(build_local_masks([model], shape.full_masks(), shape).param_masks)
    heads_only = shape.full_masks()
    heads_only.heads[0, 0] = False
    out["heads_masks_built"] = len(build_local_masks([model], heads_only, shape).param_masks)
    hidden_dropped = shape.full_masks()
    hidden_dropped.hidden[3] = False
    try:
        build_local_masks([model], hidden_dropped, shape)
    except MaskInvariantError as err:
        out["hidden_dropped"] = str(err)

    # scoring a model with a parameter the layout does not know
    model = build_model(model_cfg, ParallelConfig(), TrainConfig(seed=1), 128, wrap_ddp=False)[0]
    model.decoder.layers[1].mlp.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(4)))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = types.SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # FP32Optimizer-like
    estimator = SaliencyEstimator("taylor", shape, [model], optimizer)
    try:
        estimator.partial_table()
    except RuntimeError as err:
        out["unknown_parameter"] = str(err)
    # without it, the same model scores
    del model.decoder.layers[1].mlp.extra_scale
    optimizer = types.SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    table = SaliencyEstimator("taylor", shape, [model], optimizer).partial_table()
    out["scored"] = bool((table.heads != 0).all() and (table.hidden != 0).all())
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, 1)[0]


def test_masks_without_dropped_hidden_channels_build_on_a_model_without_norms(results):
    # nothing reads the hidden mask then: a heads/FFN-only run may use the fused TE spec
    assert results["full_masks_built"] > 0 and results["heads_masks_built"] == results["full_masks_built"]


def test_dropped_hidden_channels_on_a_model_without_norms_stop_the_mask_builder(results):
    message = results.get("hidden_dropped", "")
    assert "decoder.layers.0.input_layernorm" in message and "IdentityOp" in message, message


def test_scoring_a_parameter_the_layout_does_not_know_stops(results):
    message = results.get("unknown_parameter", "")
    assert "decoder.layers.1.mlp.extra_scale" in message and "pretrain/model/layout.py" in message, message
    assert results["scored"]
