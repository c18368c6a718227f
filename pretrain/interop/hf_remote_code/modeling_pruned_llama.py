"""A Llama whose layers have their own widths (a per-layer pruned model), for ``trust_remote_code``.

Written by the pruning-aware pretraining system's ``tools/convert_to_hf.py``. It is transformers'
own Llama: each decoder layer is a stock ``LlamaDecoderLayer`` built from a copy of the config that
carries that layer's head count, key/value head count and FFN width (and, with ``qkv_bias``,
Qwen2's biases on q, k and v). Weights keep the stock Llama names, so tools that read Llama
checkpoints read these tensors too.
"""

import copy

from torch import nn
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

try:
    from .configuration_pruned_llama import PrunedLlamaConfig
except ImportError:  # loaded as a plain module (not through trust_remote_code)
    from configuration_pruned_llama import PrunedLlamaConfig


def layer_config(config, layer_idx):
    """The config of one layer: the model's, with this layer's widths."""
    shape = config.layer_shapes[layer_idx]
    out = copy.copy(config)
    out.num_attention_heads = shape["num_attention_heads"]
    out.num_key_value_heads = shape["num_key_value_heads"]
    out.intermediate_size = shape["intermediate_size"]
    return out


class PrunedLlamaModel(LlamaModel):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        if config.layer_shapes is not None:
            self.layers = nn.ModuleList(
                [LlamaDecoderLayer(layer_config(config, i), i) for i in range(config.num_hidden_layers)])
        if getattr(config, "qkv_bias", False):  # Qwen2-style: biases on q, k and v only
            for layer in self.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    old = getattr(layer.self_attn, name)
                    setattr(layer.self_attn, name, nn.Linear(old.in_features, old.out_features, bias=True))
        if config.layer_shapes is not None or getattr(config, "qkv_bias", False):
            self.post_init()


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = PrunedLlamaModel(config)
        self.post_init()
