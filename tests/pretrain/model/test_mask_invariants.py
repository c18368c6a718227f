"""Start-up invariants for hidden pruning: a model whose norms cannot be masked, or a parameter
the mask builder does not know, stops the run with a message naming the module."""

import dataclasses

import pytest
import torch

from tests.dist_helper import run_distributed


def test_hidden_masking_possible():
    from pretrain.config import PruneConfig
    from pretrain.model.invariants import hidden_masking_possible

    on = PruneConfig(target_ratio=0.5)
    assert hidden_masking_possible(on)
    assert not hidden_masking_possible(dataclasses.replace(on, types=("heads", "ffn")))
    assert not hidden_masking_possible(PruneConfig())  # no pruning flags
    assert not hidden_masking_possible(None)
    partly = {"masks": {"hidden": torch.tensor([True, False, True])}}
    full = {"masks": {"hidden": torch.ones(3, dtype=torch.bool)}}
    # a checkpoint whose masks already drop hidden channels: masking is live whatever the flags
    assert hidden_masking_possible(None, partly)
    assert hidden_masking_possible(dataclasses.replace(on, types=("heads",)), partly)
    assert not hidden_masking_possible(None, full)
    assert not hidden_masking_possible(dataclasses.replace(on, drop_state=True, types=("heads",)), partly)
    # --end-pruning keeps the masks and prunes nothing more
    assert not hidden_masking_possible(dataclasses.replace(on, end_pruning=True), full)
    assert hidden_masking_possible(dataclasses.replace(on, end_pruning=True), partly)


def invariants_worker():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.identity_op import IdentityOp

    import megatron_patches.layer_specs as specs
    from pretrain.config import ConfigError, MODEL_PRESETS, ModelConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model, build_transformer_config
    from pretrain.model.invariants import MaskInvariantError, check_masks_cover_model
    from pretrain.pruning.masks import ModelShape, check_hidden_masking_invariants

    init_distributed(1, 1)
    set_random_seed(1)
    model_cfg = ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=16))
    shape = ModelShape.from_config(model_cfg, 128)
    out = {}
    good = build_model(model_cfg, ParallelConfig(), TrainConfig(seed=1), 128, wrap_ddp=False)  # checks pass
    out["kind"] = good[0].spec_kind

    # a spec that lacks the layer norms (the fused TE layout without its fused linears)
    config = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(seed=1))
    no_norm = dataclasses.replace(specs.local_modules(), input_layernorm=IdentityOp)
    model = GPTModel(config=config, transformer_layer_spec=specs.gpt_block_spec(config, modules=no_norm),
                     vocab_size=128, max_sequence_length=16, position_embedding_type="rope")
    try:
        check_hidden_masking_invariants([model], shape)
    except MaskInvariantError as err:
        out["no_norm"] = str(err)

    # a parameter the mask builder does not know
    model = good[0]
    model.decoder.layers[1].mlp.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(4)))
    from pretrain.pruning.masks import build_local_masks

    try:
        check_masks_cover_model([model], build_local_masks([model], shape.full_masks(), shape).param_masks)
    except MaskInvariantError as err:
        out["unmasked"] = str(err)

    # build_model itself refuses a spec without mask-aware norms when hidden masking is possible,
    # and builds it when it is not
    specs_modules_for = specs.modules_for
    specs.modules_for = lambda kind, norm=None: no_norm
    try:
        build_model(model_cfg, ParallelConfig(), TrainConfig(seed=1), 128, wrap_ddp=False)
    except ConfigError as err:
        out["build"] = f"{type(err).__name__}: {err}"
    out["built_without_hidden"] = len(build_model(model_cfg, ParallelConfig(), TrainConfig(seed=1), 128,
                                                  wrap_ddp=False, hidden_masking=False))
    specs.modules_for = specs_modules_for
    return out


@pytest.mark.distributed
def test_invariant_check_names_the_module():
    res = run_distributed(invariants_worker, 1)[0]
    assert res["kind"] == "local"
    assert "decoder.layers.0.input_layernorm (IdentityOp" in res["no_norm"]
    assert "decoder.layers.3.input_layernorm" in res["no_norm"]
    assert "pre_mlp_layernorm" not in res["no_norm"]
    assert "decoder.layers.1.mlp.extra_scale" in res["unmasked"]
    assert res["build"].startswith("MaskInvariantError") and "input_layernorm" in res["build"]
    assert res["built_without_hidden"] == 1


def fused_norm_worker():
    """TE's fused norm-linear layout (stand-in): every fused linear and its missing norm are named."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_patches.layer_specs import LayerModules, gpt_block_spec
    from pretrain.config import MODEL_PRESETS, ModelConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_transformer_config
    from pretrain.model.invariants import norms_not_mask_aware
    from tests.megatron_patches.test_layer_specs import _fused_standin

    init_distributed(1, 1)
    set_random_seed(1)
    model_cfg = ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=16))
    config = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(seed=1))
    fused = _fused_standin()
    modules = LayerModules(fused, RowParallelLinear, DotProductAttention, fused, RowParallelLinear,
                           IdentityOp, IdentityOp, {})
    model = GPTModel(config=config, transformer_layer_spec=gpt_block_spec(config, modules=modules),
                     vocab_size=128, max_sequence_length=16, position_embedding_type="rope")
    return norms_not_mask_aware([model])


@pytest.mark.distributed
def test_fused_norm_layout_is_reported():
    bad = run_distributed(fused_norm_worker, 1)[0]
    assert "decoder.layers.0.self_attention.linear_qkv (NormLinear: a norm fused into the linear)" in bad
    assert "decoder.layers.0.mlp.linear_fc1 (NormLinear: a norm fused into the linear)" in bad
    assert "decoder.layers.0.pre_mlp_layernorm (IdentityOp, not the mask-aware RMSNorm)" in bad
    assert len(bad) == 4 * 4  # 4 layers x (2 empty norm slots + 2 fused linears)
