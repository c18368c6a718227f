"""Per-layer widths for megatron-core: the config of a heterogeneous (per-layer pruned) model.

megatron-core's TransformerBlock asks ``config.get_config_for_layer(n)`` for every layer when
``heterogeneous_block_specs`` is set, and then checkpoints layers under per-layer keys
(``decoder.layers.{n}....``) instead of one stacked tensor. Its own
``HeterogeneousTransformerConfig`` reads NAS block configs and varies only the query groups and
FFN width; after head pruning we also need per-layer head counts, so this subclass overrides all
three from a plain list. Nothing in megatron-core is edited.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron.core.transformer.transformer_config import TransformerConfig

_LAYER_KEYS = ("num_query_groups", "num_attention_heads", "ffn_hidden_size")


@dataclass
class PerLayerTransformerConfig(TransformerConfig):
    layer_shapes: list | None = None  # per layer: num_query_groups, num_attention_heads, ffn_hidden_size

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layer_shapes or len(self.layer_shapes) != self.num_layers:
            raise ValueError("PerLayerTransformerConfig needs one layer_shapes entry per layer")
        tp = self.tensor_model_parallel_size
        for i, shape in enumerate(self.layer_shapes):
            if shape["num_query_groups"] % tp or shape["ffn_hidden_size"] % tp:
                raise ValueError(f"layer {i}: {shape} does not divide over TP={tp}")
        self.heterogeneous_block_specs = True

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        """A plain TransformerConfig with this (1-based, global) layer's widths."""
        values = {f.name: getattr(self, f.name) for f in fields(TransformerConfig)}
        values.update({k: self.layer_shapes[layer_number - 1][k] for k in _LAYER_KEYS})
        values["heterogeneous_block_specs"] = False
        return TransformerConfig(**values)
