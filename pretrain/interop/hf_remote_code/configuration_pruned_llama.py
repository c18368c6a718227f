"""Config of a Llama whose layers have their own widths (a per-layer pruned model).

Written by the pruning-aware pretraining system's ``tools/convert_to_hf.py``. ``layer_shapes`` has
one entry per layer: ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``; the
top-level fields hold the widest layer's values; ``qkv_bias`` adds Qwen2's q/k/v biases.
Everything else is a stock ``LlamaConfig``.
"""

from transformers import LlamaConfig


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"

    def __init__(self, layer_shapes=None, qkv_bias=False, **kwargs):
        self.layer_shapes = layer_shapes
        self.qkv_bias = qkv_bias  # biases on q, k and v only (a pruned Qwen2)
        # transformers 5 refuses a hidden size that is not a multiple of the heads, even with
        # head_dim given; a pruned hidden width need not be one: validate with a stand-in width
        hidden, heads = kwargs.get("hidden_size"), kwargs.get("num_attention_heads")
        if hidden and heads and hidden % heads:
            kwargs["hidden_size"] = heads * -(-hidden // heads)
        super().__init__(**kwargs)
        if hidden and heads and hidden % heads:
            self.hidden_size = hidden
        if self.layer_shapes is not None and len(self.layer_shapes) != self.num_hidden_layers:
            raise ValueError(f"layer_shapes has {len(self.layer_shapes)} entries for "
                             f"{self.num_hidden_layers} layers")
