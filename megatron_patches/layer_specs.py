"""The layer specs our GPT models are built from.

Three kinds of spec, one layer structure, one set of checkpoint keys:

* ``local``: megatron-core's own local modules (Column/Row parallel linears, DotProductAttention,
  MLP) plus our mask-aware RMSNorm. CPU, and GPUs without Transformer Engine.
* ``te-unfused``: Transformer Engine linears and attention (``TEColumnParallelLinear``,
  ``TERowParallelLinear``, ``TEDotProductAttention``) with our mask-aware RMSNorm kept as separate
  ``input_layernorm`` / ``pre_mlp_layernorm`` modules. The GPU spec whenever the hidden mask can
  change: TE's fused norm-linear normalises over every channel and cannot be told which hidden
  channels are pruned, so the masked model would stop computing what the shrunk one computes.
* ``te-fused``: megatron-core's TE layout (norms fused into ``TELayerNormColumnParallelLinear``,
  ``input_layernorm`` / ``pre_mlp_layernorm`` are ``IdentityOp``). The fastest, used on GPU when
  hidden pruning is impossible.

Checkpoint keys: a fused TE linear saves its norm as ``<linear>.layer_norm_weight``; the other two
kinds map their separate norms onto those same keys (``sharded_state_dict_keys_map``), so a
checkpoint moves freely between CPU and GPU runs, fused or not. The final norm is our RMSNorm in
every kind (``decoder.final_layernorm.weight``).

Which kind a run gets is ``choose_spec_kind``, a pure function of two booleans.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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

# A separate norm's checkpoint key is the fused TE linear's: <linear>.layer_norm_weight.
NORM_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class SpecKind(str, enum.Enum):
    LOCAL = "local"
    TE_UNFUSED = "te-unfused"
    TE_FUSED = "te-fused"

    @property
    def mask_aware_norms(self) -> bool:
        """Whether every norm of a model of this kind is our mask-aware RMSNorm."""
        return self is not SpecKind.TE_FUSED

    @property
    def uses_te(self) -> bool:
        return self is not SpecKind.LOCAL


def choose_spec_kind(te_available: bool, hidden_masking: bool) -> SpecKind:
    """The spec a run must use: TE when it is available, with separate mask-aware norms whenever
    the hidden mask can change (or is already partly False), fused otherwise."""
    if not te_available:
        return SpecKind.LOCAL
    return SpecKind.TE_UNFUSED if hidden_masking else SpecKind.TE_FUSED


def transformer_engine_available() -> bool:
    """TE is usable: CUDA is present and ``transformer_engine`` imports (megatron-core then
    defines its TE modules; without TE it defines them as mocks)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as mcore_te

        return bool(mcore_te.HAVE_TE)
    except Exception:
        return False


@dataclass(frozen=True)
class LayerModules:
    """The module classes of one layer kind (tests pass their own stand-ins)."""

    linear_qkv: type
    linear_proj: type
    core_attention: type
    linear_fc1: type
    linear_fc2: type
    input_layernorm: type
    pre_mlp_layernorm: type
    keys_map: dict


def local_modules(norm: type = RMSNorm) -> LayerModules:
    return LayerModules(ColumnParallelLinear, RowParallelLinear, DotProductAttention,
                        ColumnParallelLinear, RowParallelLinear, norm, norm, dict(NORM_KEYS_MAP))


def te_modules(kind: SpecKind, norm: type = RMSNorm) -> LayerModules:
    """megatron-core's TE module classes for ``kind``; refuses when TE is not importable (without
    TE, megatron-core defines these names as mocks that fail only when a model is built)."""
    from megatron.core.extensions import transformer_engine as mcore_te

    if not mcore_te.HAVE_TE:
        raise RuntimeError(
            f"the {kind.value} layer spec needs Transformer Engine, which does not import here; "
            "install transformer-engine (GPU only) or build the local spec")
    if kind is SpecKind.TE_FUSED:
        fused = mcore_te.TELayerNormColumnParallelLinear
        return LayerModules(fused, mcore_te.TERowParallelLinear, mcore_te.TEDotProductAttention,
                            fused, mcore_te.TERowParallelLinear, IdentityOp, IdentityOp, {})
    return LayerModules(mcore_te.TEColumnParallelLinear, mcore_te.TERowParallelLinear,
                        mcore_te.TEDotProductAttention, mcore_te.TEColumnParallelLinear,
                        mcore_te.TERowParallelLinear, norm, norm, dict(NORM_KEYS_MAP))


def modules_for(kind: SpecKind, norm: type = RMSNorm) -> LayerModules:
    return local_modules(norm) if kind is SpecKind.LOCAL else te_modules(kind, norm)


def layer_spec(modules: LayerModules) -> ModuleSpec:
    """One Llama-style layer (pre-norm attention and SwiGLU MLP) from ``modules``."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=modules.input_layernorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=modules.linear_qkv,
                    core_attention=modules.core_attention,
                    linear_proj=modules.linear_proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=modules.pre_mlp_layernorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=modules.linear_fc1, linear_fc2=modules.linear_fc2),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(modules.keys_map),
        ),
    )


def local_layer_spec(norm: type = RMSNorm) -> ModuleSpec:
    """One Llama-style layer from megatron-core's local (non-TE) modules and our norm."""
    return layer_spec(local_modules(norm))


def gpt_block_spec(config: TransformerConfig, kind: SpecKind = SpecKind.LOCAL, vp_stage: int | None = None,
                   modules: LayerModules | None = None) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage: its layers and the final norm (our RMSNorm
    in every kind). ``modules`` overrides the classes ``kind`` selects (tests)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    spec = layer_spec(modules or modules_for(kind))
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm)
