"""Layer specs: which spec a run gets (a pure function), and one set of checkpoint keys for all.

The GPU kinds need Transformer Engine, which does not exist here: the choice is tested by faking
megatron-core's TE-availability flag (its TE class names are then mocks), never TE itself. The key
identity is tested on CPU with a stand-in for TE's fused norm-linear (``ColumnParallelLinear`` plus
a replicated ``layer_norm_weight`` that it applies first), saved and loaded like the real one.
"""

import pytest
import torch

from tests.dist_helper import run_distributed


def test_choose_spec_kind_table():
    from megatron_patches.layer_specs import SpecKind, choose_spec_kind

    assert choose_spec_kind(te_available=False, hidden_masking=False) is SpecKind.LOCAL
    assert choose_spec_kind(te_available=False, hidden_masking=True) is SpecKind.LOCAL
    assert choose_spec_kind(te_available=True, hidden_masking=True) is SpecKind.TE_UNFUSED
    assert choose_spec_kind(te_available=True, hidden_masking=False) is SpecKind.TE_FUSED
    assert [k.mask_aware_norms for k in SpecKind] == [True, True, False]


def test_te_spec_refused_without_transformer_engine():
    from megatron_patches.layer_specs import SpecKind, te_modules, transformer_engine_available

    assert not transformer_engine_available()
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        te_modules(SpecKind.TE_UNFUSED)


def test_chosen_te_spec_has_mask_aware_norms_when_hidden_pruning(monkeypatch):
    from megatron.core.extensions import transformer_engine as mcore_te
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_patches.layer_specs import NORM_KEYS_MAP, choose_spec_kind, layer_spec, modules_for
    from megatron_patches.norms import RMSNorm

    monkeypatch.setattr(mcore_te, "HAVE_TE", True)  # the flag only: the classes stay megatron's mocks
    unfused = layer_spec(modules_for(choose_spec_kind(True, hidden_masking=True))).submodules
    assert unfused.input_layernorm is RMSNorm and unfused.pre_mlp_layernorm is RMSNorm
    attn = unfused.self_attention.submodules
    assert attn.linear_qkv is mcore_te.TEColumnParallelLinear
    assert attn.linear_proj is mcore_te.TERowParallelLinear
    assert attn.core_attention is mcore_te.TEDotProductAttention
    assert unfused.mlp.submodules.linear_fc1 is mcore_te.TEColumnParallelLinear
    assert unfused.sharded_state_dict_keys_map == NORM_KEYS_MAP

    fused = layer_spec(modules_for(choose_spec_kind(True, hidden_masking=False))).submodules
    assert fused.input_layernorm is IdentityOp and fused.pre_mlp_layernorm is IdentityOp
    assert fused.self_attention.submodules.linear_qkv is mcore_te.TELayerNormColumnParallelLinear
    assert fused.mlp.submodules.linear_fc1 is mcore_te.TELayerNormColumnParallelLinear
    assert fused.sharded_state_dict_keys_map == {}


def _fused_standin():
    """TE's TELayerNormColumnParallelLinear, on CPU: norm weight inside the linear, same keys."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class NormLinear(ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            self.eps = config.layernorm_epsilon

        def forward(self, x, *args, **kwargs):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return super().forward(self.layer_norm_weight * h.to(x.dtype), *args, **kwargs)

    return NormLinear


def keys_worker(tmp):
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_patches.layer_specs import LayerModules, gpt_block_spec, local_modules
    from pretrain.config import ModelConfig, MODEL_PRESETS, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.init import _iter_sharded_tensors
    from pretrain.model.build import build_transformer_config

    init_distributed(1, 1)
    set_random_seed(1)
    model_cfg = ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=16))
    config = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(seed=1))
    fused = _fused_standin()
    kinds = {
        "local": local_modules(),
        # TE linears replaced by the local ones: the norm and key-map structure is the spec's
        "unfused": dataclasses.replace(local_modules()),
        "fused": LayerModules(fused, RowParallelLinear, DotProductAttention, fused, RowParallelLinear,
                              IdentityOp, IdentityOp, {}),
    }
    models, keys = {}, {}
    for name, modules in kinds.items():
        torch.manual_seed(3)
        models[name] = GPTModel(config=config, transformer_layer_spec=gpt_block_spec(config, modules=modules),
                                vocab_size=128, max_sequence_length=16, position_embedding_type="rope")
        keys[name] = sorted((sh.key, tuple(sh.global_shape))
                            for sh in _iter_sharded_tensors(models[name].sharded_state_dict()))
    # a checkpoint saved by the local (CPU) model loads into the fused one, norms included
    with torch.no_grad():
        for p in models["local"].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dist_checkpointing.save(models["local"].sharded_state_dict(), tmp)
    state = dist_checkpointing.load(models["fused"].sharded_state_dict(), tmp)
    models["fused"].load_state_dict(state, strict=True)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    position = torch.arange(16).expand(2, 16)
    logits = {n: models[n].eval()(tokens, position, None).detach() for n in ("local", "fused")}
    return {"keys": keys, "max_diff": float((logits["local"] - logits["fused"]).abs().max())}


@pytest.mark.distributed
def test_checkpoint_keys_identical_for_separate_and_fused_norms(tmp_path):
    (tmp_path / "ckpt").mkdir()
    res = run_distributed(keys_worker, 1, str(tmp_path / "ckpt"))[0]
    keys = res["keys"]
    assert keys["local"] == keys["unfused"] == keys["fused"]
    names = [k for k, _ in keys["local"]]
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in names)
    assert res["max_diff"] < 1e-5, res["max_diff"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_without_mask_is_bit_identical_to_the_llama_formula(dtype):
    """The unmasked norm runs torch's rms_norm kernel (issue 32: fewer ops per step); its output and
    gradients must stay bit-identical to HF Llama's formula, which the masked path still computes."""
    from megatron_patches.norms import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden_size=96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    norm = norm.to(dtype)
    x0 = (torch.randn(8, 3, 96, generator=g) * 3).to(dtype)
    upstream = torch.randn(8, 3, 96, generator=g).to(dtype)
    x = x0.clone().requires_grad_()
    y = norm(x)
    y.backward(upstream)
    ref_x, ref_w = x0.clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    h = ref_x.float()
    ref = ref_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    ref.backward(upstream)
    assert torch.equal(y, ref)
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(norm.weight.grad, ref_w.grad)
    # the masked path with every channel kept computes the same numbers
    norm.hidden_mask, norm._num_kept = torch.ones(96), 96
    assert torch.equal(norm(x0), ref.detach())
