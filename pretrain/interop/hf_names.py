"""HuggingFace Llama names of our parameters, both ways (FACTS.md "HF interop").

``to_hf`` and ``from_hf`` map one megatron-core parameter (full, TP=1) to its HF tensor(s) and
back; the qkv interleave and ``[gate; up]`` come from ``pretrain.model.layout``, so export, import
and the shrink read one layout.
"""

from __future__ import annotations

import torch

from pretrain.model import layout

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
