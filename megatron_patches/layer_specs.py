"""The layer specs our GPT models are built from.

Every model in this project is built from ``gpt_block_spec``: megatron-core's own local modules
(Column/Row parallel linears, DotProductAttention, MLP) plus our RMSNorm. Pruning swaps in
mask-carrying submodule classes here, through the spec, never by editing megatron-core.
On a GPU with Transformer Engine importable, ``use_te=True`` gives megatron-core's TE spec.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_patches.norms import RMSNorm


def transformer_engine_available() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def local_layer_spec(norm: type = RMSNorm) -> ModuleSpec:
    """One Llama-style layer from megatron-core's local (non-TE) modules and our norm."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the Transformer Engine spec (norms fused into the linears
            # there), so a checkpoint moves between CPU (local) and GPU (TE) runs.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def gpt_block_spec(
    config: TransformerConfig, use_te: bool = False, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage: its layers and the final norm."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[local_layer_spec()] * num_layers, layer_norm=RMSNorm
    )
