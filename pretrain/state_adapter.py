"""The one place that knows how megatron-core lays out Llama weights (FACTS.md):

* ``linear_qkv`` rows: per query group ``[q_0 .. q_{hpg-1}, k, v]``, each ``head_dim`` rows;
* ``linear_proj`` columns: heads in order, ``head_dim`` columns each;
* ``linear_fc1`` rows: ``[gate; up]`` (SwiGLU);
* the hidden dimension: embedding/output columns, qkv/fc1 columns, proj/fc2 rows, norms.

Masks (``pretrain.pruning.masks``), the shrink (``shrink_parameter``) and HF conversion (``to_hf``,
``from_hf``) use these functions rather than their own copies of the layout.
"""

from __future__ import annotations

import dataclasses
import re

import torch


def qkv_rows(group_mask: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row mask of ``linear_qkv`` for a mask over its query groups."""
    return group_mask.repeat_interleave((heads_per_group + 2) * head_dim)


def proj_columns(group_mask: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Column mask of ``linear_proj`` for a mask over query groups."""
    return group_mask.repeat_interleave(heads_per_group * head_dim)


def fc1_rows(ffn_mask: torch.Tensor) -> torch.Tensor:
    """Row mask of a SwiGLU ``linear_fc1`` (``[gate; up]``) for a mask over FFN channels."""
    return torch.cat([ffn_mask, ffn_mask])


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


_HIDDEN_VECTORS = ("input_layernorm.weight", "pre_mlp_layernorm.weight",
                   # the checkpoint keys of norms fused into the next linear (TE names, FACTS.md)
                   "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")


def kept_indices(name: str, masks, shape) -> tuple:
    """Per dimension of parameter ``name`` (full, TP=1), the indices the shrink keeps (None: all).

    ``name`` is the parameter's name in an unwrapped GPTModel, or its checkpoint key for a
    single layer (``decoder.layers.{l}.<rest>``); layer indices are global.
    """
    def where(mask: torch.Tensor) -> torch.Tensor:
        return mask.nonzero().flatten()

    hidden = where(masks.hidden)
    hpg, hd = shape.heads_per_group, shape.head_dim
    m = _LAYER.match(name)
    if m is None:
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return (None, hidden)
        if name.endswith("final_layernorm.weight"):
            return (hidden,)
        raise KeyError(f"no shrink rule for parameter {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    groups = masks.heads[layer, :shape.groups_of(layer)]
    ffn = masks.ffn[layer, :shape.ffn_of(layer)]
    if rest == "self_attention.linear_qkv.weight":
        return (where(qkv_rows(groups, hpg, hd)), hidden)
    if rest == "self_attention.linear_qkv.bias":
        return (where(qkv_rows(groups, hpg, hd)),)
    if rest == "self_attention.linear_proj.weight":
        return (hidden, where(proj_columns(groups, hpg, hd)))
    if rest == "mlp.linear_fc1.weight":
        return (where(fc1_rows(ffn)), hidden)
    if rest == "mlp.linear_fc2.weight":
        return (hidden, where(ffn))
    if rest in _HIDDEN_VECTORS:
        return (hidden,)
    raise KeyError(f"no shrink rule for parameter {name!r}")


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
    m = _LAYER.match(name)
    if m is None:
        return name
    return f"decoder.layers.{kept_layers(masks)[int(m.group(1))]}.{m.group(2)}"


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


def split_qkv(weight: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
    """``linear_qkv`` (rows per group ``[q.., k, v]``) -> HF ``q_proj, k_proj, v_proj``."""
    per_group = weight.view(groups, heads_per_group + 2, head_dim, -1)
    q = per_group[:, :heads_per_group].reshape(groups * heads_per_group * head_dim, -1)
    return q, per_group[:, -2].reshape(groups * head_dim, -1), per_group[:, -1].reshape(groups * head_dim, -1)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """HF ``q_proj, k_proj, v_proj`` -> megatron-core's per-group interleaved ``linear_qkv``."""
    columns = q.shape[-1]
    heads_per_group = q.shape[0] // (groups * head_dim)
    return torch.cat([q.reshape(groups, heads_per_group * head_dim, columns),
                      k.reshape(groups, head_dim, columns),
                      v.reshape(groups, head_dim, columns)], dim=1).reshape(-1, columns)


def to_hf(name: str, tensor: torch.Tensor, groups: int, heads_per_group: int, head_dim: int) -> dict:
    """One megatron-core parameter (full, TP=1) -> its HF Llama tensor(s); ``groups`` is the
    layer's query-group count (unused outside attention)."""
    if name in _HF_GLOBAL:
        return {_HF_GLOBAL[name]: tensor}
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"no HF name for parameter {name!r}")
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _HF_LAYER:
        return {prefix + _HF_LAYER[rest]: tensor}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor.reshape(tensor.shape[0], -1), groups, heads_per_group, head_dim)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.reshape((-1,) + tuple(tensor.shape[1:]))
                for p, t in zip("qkv", (q, k, v))}
    if rest == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    raise KeyError(f"no HF name for parameter {name!r}")


def from_hf(name: str, get, groups: int, head_dim: int) -> torch.Tensor:
    """The megatron-core parameter ``name`` (full, TP=1) built from HF tensors; ``get(hf_name)``
    returns one HF tensor. Exactly inverts ``to_hf``."""
    if name in _HF_GLOBAL:
        return get(_HF_GLOBAL[name])
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"no HF source for parameter {name!r}")
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _HF_LAYER:
        return get(prefix + _HF_LAYER[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (get(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv")
        merged = merge_qkv(*(t.reshape(t.shape[0], -1) for t in (q, k, v)), groups, head_dim)
        return merged.reshape((-1,) + tuple(q.shape[1:]))
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
    raise KeyError(f"no HF source for parameter {name!r}")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return None if m is None else int(m.group(1))
