"""Names and shapes of a shrunk model: the shrink of a parameter, the renumbered layers, and the
shrunk model's config. Every layout fact (which rows are a query group's, ``[gate; up]``, what
each dimension indexes) comes from ``pretrain.model.layout``; this module only applies it to names.

The shrink (``pretrain.shrink``) and the shrunk export (``pretrain.checkpoint.full_weights``) use
these functions; HF names live in ``pretrain.interop.hf_names``.
"""

from __future__ import annotations

import dataclasses

import torch

from pretrain.model import layout


def kept_indices(name: str, masks, shape) -> tuple:
    """Per dimension of parameter ``name`` (full, TP=1), the indices the shrink keeps (None: all).

    ``name`` is the parameter's name in an unwrapped GPTModel, or its checkpoint key for a
    single layer (``decoder.layers.{l}.<rest>``); layer indices are global. KeyError for a name
    the shrink has no rule for.
    """
    where = layout.param_layout(name)
    # an axis that keeps everything is None, not a full index: a full index_select is a copy (a
    # gather, along an inner dimension) that changes nothing, and most axes of a shrink keep all
    return tuple(None if kept is None or bool(kept.all()) else kept.nonzero().flatten()
                 for kept in (layout.axis_mask(axis, where.layer, masks, shape) for axis in where.axes))


def slice_to(tensor: torch.Tensor, indices: tuple, first_dim: int = 0) -> torch.Tensor:
    """``tensor`` with dimension ``first_dim + d`` cut to ``indices[d]`` (None keeps it whole)."""
    for d, index in enumerate(indices):
        if index is not None:
            tensor = tensor.index_select(first_dim + d, index)
    return tensor


def shrink_parameter(name: str, tensor: torch.Tensor, masks, shape) -> torch.Tensor:
    """Slice one full (TP=1, PP=1) parameter, or a state tensor of its shape, to the kept groups."""
    return slice_to(tensor, kept_indices(name, masks, shape))


def kept_layers(masks) -> list[int]:
    """Indices of the layers that survive (dropped layers are removed by the shrink)."""
    return [l for l in range(masks.heads.shape[0]) if bool(masks.layers[l])]


def source_name(name: str, masks) -> str:
    """The name in the unshrunk model of a parameter of the shrunk model (layers renumbered)."""
    split = layout.split_layer_name(name)
    if split is None:
        return name
    return layout.layer_name(kept_layers(masks)[split[0]], split[1])


def shrunk_name(name: str, masks) -> str | None:
    """The name in the shrunk model of a parameter of the unshrunk one (None: its layer is dropped)."""
    split = layout.split_layer_name(name)
    if split is None:
        return name
    kept = kept_layers(masks)
    return layout.layer_name(kept.index(split[0]), split[1]) if split[0] in kept else None


def shrunk_model_config(model_cfg, masks, shape):
    """The ModelConfig of the physically smaller model: a plain Llama shape for uniform masks,
    per-layer widths (``layer_shapes``, a heterogeneous model) otherwise."""
    hpg = shape.heads_per_group
    kept = kept_layers(masks)
    groups = [int(masks.heads[l].sum()) for l in kept]
    ffn = [int(masks.ffn[l].sum()) for l in kept]
    uniform = len(set(groups)) == 1 and len(set(ffn)) == 1
    return dataclasses.replace(
        model_cfg,
        num_layers=len(kept),
        hidden_size=int(masks.hidden.sum()),
        num_query_groups=max(groups),
        num_attention_heads=max(groups) * hpg,
        ffn_hidden_size=max(ffn),
        kv_channels=shape.head_dim,
        layer_shapes=None if uniform else [
            {"num_query_groups": g, "num_attention_heads": g * hpg, "ffn_hidden_size": f}
            for g, f in zip(groups, ffn)],
    )
