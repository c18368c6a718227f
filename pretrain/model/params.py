"""This rank's parameters: the model inside its wrappers, and each Llama parameter with its layout.

The one place that walks a built model's modules for the pruning (masks, saliency, compensation)
and unwraps a model chunk (DDP, Float16Module, ...) to the megatron-core model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_patches.norms import RMSNorm
from pretrain.model.layout import ParamLayout, layer_name, param_layout, stage_layers


def unwrap(model_chunk):
    """The megatron-core model inside a chunk's wrappers (each keeps the one it wraps as ``module``)."""
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


@dataclass
class LocalParam:
    """One parameter this rank holds, with what it is and the module that applies it."""

    param: torch.nn.Parameter | None  # None: the tied output layer (its weight is the embedding)
    layout: ParamLayout
    module: torch.nn.Module | None  # the linear (or norm) holding it; its input is what obs/activation read
    applied_weight: torch.Tensor | None = None  # the weight multiplying the module's input


def local_parameters(model_chunks: list) -> list[LocalParam]:
    """The Llama parameters of this rank's model chunks (norms only where they are our mask-aware
    ``RMSNorm``); layers carry their global index, checked against ``stage_layers``."""
    from megatron.core import parallel_state as ps  # lazy: megatron-core is heavy

    out = []

    def add(param, name, layer=None, module=None, applied=None):
        rest = name if layer is None else layer_name(layer, name)
        out.append(LocalParam(param, param_layout(rest), module, applied))

    for chunk in model_chunks:
        model = unwrap(chunk)
        tied = getattr(model, "share_embeddings_and_output_weights", False)
        if getattr(model, "pre_process", False):
            add(model.embedding.word_embeddings.weight, "embedding.word_embeddings.weight",
                module=model.embedding.word_embeddings)
        layers = model.decoder.layers
        if len(layers):
            expected = stage_layers(model.config.num_layers, ps.get_pipeline_model_parallel_world_size(),
                                    ps.get_pipeline_model_parallel_rank())
            found = [layer.layer_number - 1 for layer in layers]
            if found != list(expected):
                raise RuntimeError(f"megatron-core placed layers {found} on this stage; the layout expects "
                                   f"{list(expected)} (pretrain/model/layout.py stage_layers)")
        for layer in layers:
            i = layer.layer_number - 1
            attn, mlp = layer.self_attention, layer.mlp
            add(attn.linear_qkv.weight, "self_attention.linear_qkv.weight", i, attn.linear_qkv)
            if isinstance(getattr(attn.linear_qkv, "bias", None), torch.nn.Parameter):
                add(attn.linear_qkv.bias, "self_attention.linear_qkv.bias", i, attn.linear_qkv)
            add(attn.linear_proj.weight, "self_attention.linear_proj.weight", i, attn.linear_proj)
            add(mlp.linear_fc1.weight, "mlp.linear_fc1.weight", i, mlp.linear_fc1)
            add(mlp.linear_fc2.weight, "mlp.linear_fc2.weight", i, mlp.linear_fc2)
            for rest in ("input_layernorm", "pre_mlp_layernorm"):
                norm = getattr(layer, rest)
                if isinstance(norm, RMSNorm):
                    add(norm.weight, f"{rest}.weight", i, norm)
        final = getattr(model.decoder, "final_layernorm", None)
        if isinstance(final, RMSNorm):
            add(final.weight, "decoder.final_layernorm.weight", module=final)
        if getattr(model, "post_process", False):
            # its own weight (untied), the last stage's copy of the embedding (tied, PP > 1: its
            # gradient is synced with the embedding's, counted there), or the embedding itself
            # (tied, PP = 1: counted as the embedding)
            weight = model.output_layer.weight
            applied = weight if weight is not None else model.shared_embedding_or_output_weight()
            add(None if tied else weight, "output_layer.weight", module=model.output_layer, applied=applied)
    return out
