"""Names and shapes of whole checkpoints: the shrink of a parameter, the shrunk model's config, and
HuggingFace Llama names. Every layout fact (which rows are a query group's, ``[gate; up]``, what
each dimension indexes) comes from ``pretrain.model.layout``; this module only applies it to names.

The shrink (``kept_indices``, ``shrink_parameter``, ``pretrain.shrink``) and HF conversion
(``to_hf``, ``from_hf``, ``pretrain.interop.hf``) use these functions.
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
    return tuple(None if kept is None else kept.nonzero().flatten()
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


# --- HuggingFace Llama names (import and export use these; FACTS.md "HF interop") -----------------

_HF_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _layer_parts(name: str, what: str) -> tuple[str, str, int]:
    split = layout.split_layer_name(name)
    if split is None:
        raise KeyError(f"no HF {what} for parameter {name!r}")
    return f"model.layers.{split[0]}.", split[1], split[0]


def to_hf(name: str, tensor: torch.Tensor, shape) -> dict:
    """One megatron-core parameter (full, TP=1) of a model of ``shape`` -> its HF Llama tensor(s)."""
    if name in _HF_GLOBAL:
        return {_HF_GLOBAL[name]: tensor}
    prefix, rest, layer = _layer_parts(name, "name")
    if rest in _HF_LAYER:
        return {prefix + _HF_LAYER[rest]: tensor}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = layout.split_qkv(tensor.reshape(tensor.shape[0], -1), shape.groups_of(layer), shape)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.reshape((-1,) + tuple(tensor.shape[1:]))
                for p, t in zip("qkv", (q, k, v))}
    if rest == "mlp.linear_fc1.weight":
        gate, up = layout.split_fc1(tensor)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    raise KeyError(f"no HF name for parameter {name!r}")


def from_hf(name: str, get, shape) -> torch.Tensor:
    """The megatron-core parameter ``name`` (full, TP=1) of a model of ``shape`` built from HF
    tensors; ``get(hf_name)`` returns one HF tensor. Exactly inverts ``to_hf``."""
    if name in _HF_GLOBAL:
        return get(_HF_GLOBAL[name])
    prefix, rest, layer = _layer_parts(name, "source")
    if rest in _HF_LAYER:
        return get(prefix + _HF_LAYER[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (get(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv")
        merged = layout.merge_qkv(*(t.reshape(t.shape[0], -1) for t in (q, k, v)), shape.groups_of(layer), shape)
        return merged.reshape((-1,) + tuple(q.shape[1:]))
    if rest == "mlp.linear_fc1.weight":
        return layout.merge_fc1(get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight"))
    raise KeyError(f"no HF source for parameter {name!r}")


def layer_of(name: str) -> int | None:
    split = layout.split_layer_name(name)
    return None if split is None else split[0]
