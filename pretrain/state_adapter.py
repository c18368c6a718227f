"""The one place that knows how megatron-core lays out Llama weights (FACTS.md):

* ``linear_qkv`` rows: per query group ``[q_0 .. q_{hpg-1}, k, v]``, each ``head_dim`` rows;
* ``linear_proj`` columns: heads in order, ``head_dim`` columns each;
* ``linear_fc1`` rows: ``[gate; up]`` (SwiGLU);
* the hidden dimension: embedding/output columns, qkv/fc1 columns, proj/fc2 rows, norms.

Masks (``pretrain.pruning.masks``), the shrink (``shrink_parameter``) and, later, HF conversion
use these functions rather than their own copies of the layout.
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


def shrink_parameter(name: str, tensor: torch.Tensor, masks, shape) -> torch.Tensor:
    """Slice one full (TP=1, PP=1) parameter, or a state tensor of its shape, to the kept groups.

    ``name`` is the parameter's name in an unwrapped GPTModel; layer indices are global.
    """
    hidden = masks.hidden
    hpg, hd = shape.heads_per_group, shape.head_dim
    m = _LAYER.match(name)
    if m is None:
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return tensor[:, hidden]
        if name.endswith("final_layernorm.weight"):
            return tensor[hidden]
        raise KeyError(f"no shrink rule for parameter {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    groups = masks.heads[layer, :shape.groups_of(layer)]
    ffn = masks.ffn[layer, :shape.ffn_of(layer)]
    if rest == "self_attention.linear_qkv.weight":
        return tensor[qkv_rows(groups, hpg, hd)][:, hidden]
    if rest == "self_attention.linear_proj.weight":
        return tensor[hidden][:, proj_columns(groups, hpg, hd)]
    if rest == "mlp.linear_fc1.weight":
        return tensor[fc1_rows(ffn)][:, hidden]
    if rest == "mlp.linear_fc2.weight":
        return tensor[hidden][:, ffn]
    if rest in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
        return tensor[hidden]
    raise KeyError(f"no shrink rule for parameter {name!r}")


def kept_layers(masks) -> list[int]:
    """Indices of the layers that survive (dropped layers are removed by the shrink)."""
    return [l for l in range(masks.heads.shape[0]) if bool(masks.layers[l])]


def source_name(name: str, masks) -> str:
    """The name in the unshrunk model of a parameter of the shrunk model (layers renumbered)."""
    m = _LAYER.match(name)
    if m is None:
        return name
    return f"decoder.layers.{kept_layers(masks)[int(m.group(1))]}.{m.group(2)}"


def is_uniform(masks) -> bool:
    groups, ffn = masks.heads.sum(1), masks.ffn.sum(1)
    return bool((groups == groups[0]).all() and (ffn == ffn[0]).all())


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
