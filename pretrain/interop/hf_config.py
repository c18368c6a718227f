"""HF ``config.json`` <-> our ``ModelConfig`` for Llama-family models.

``hf_config_dict`` writes an export's config (stock Llama, Qwen2 with q/k/v biases, or our
per-layer ``pruned_llama`` with ``auto_map``); ``model_config_from_hf`` reads one back, refusing
what our model cannot compute before any weight is read.
"""

from __future__ import annotations

import json
import math
import os

import torch

from pretrain.errors import ConversionError
from pretrain.config import ConfigError, ModelConfig

__all__ = ["ConversionError", "hf_config_dict", "model_config_from_hf", "read_hf_config"]

_SUPPORTED_TYPES = ("llama", "qwen2", "pruned_llama")


# the fixed parts of megatron-core's Llama 3 RoPE scaling (RotaryEmbedding._apply_scaling)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config_dict(model: ModelConfig, vocab: int, special_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of the export: stock Llama (Qwen2 with q/k/v biases) for uniform shapes, our
    per-layer class otherwise."""
    from transformers import LlamaConfig, Qwen2Config  # the optional [hf] extra: only its users need it

    kwargs = dict(
        vocab_size=vocab, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups, head_dim=model.head_dim, hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        rms_norm_eps=model.norm_epsilon, rope_theta=model.rotary_base,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        attention_bias=False, mlp_bias=False, torch_dtype=dtype, **special_ids,
    )
    # transformers 5 refuses a Llama config whose hidden size is not a multiple of its heads, even
    # with head_dim given; a hidden-pruned model's often is not: it goes out as our remote-code
    # class, whose config accepts it (the stock config is built with a stand-in width)
    remote = bool(model.layer_shapes) or model.hidden_size % model.num_attention_heads != 0
    if remote:
        kwargs["hidden_size"] = model.num_attention_heads * math.ceil(model.hidden_size / model.num_attention_heads)
    rope_scaling = None
    if model.use_rope_scaling:
        rope_scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **LLAMA3_ROPE}
        kwargs["rope_scaling"] = rope_scaling
    if model.add_qkv_bias and not remote and model.head_dim * model.num_attention_heads == model.hidden_size:
        # Qwen2 (q/k/v biases; its readers take the head size as hidden / heads)
        for key in ("head_dim", "attention_bias", "mlp_bias"):
            kwargs.pop(key)
        config = Qwen2Config(**kwargs, use_sliding_window=False).to_dict()
        config["architectures"] = ["Qwen2ForCausalLM"]
    elif model.add_qkv_bias and not remote:
        # pruned heads: another head size. A stock Llama with attention_bias (q/k/v and o_proj
        # biases; the o_proj biases are written as zeros) computes exactly this model
        kwargs["attention_bias"] = True
        config = LlamaConfig(**kwargs).to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
    else:
        config = LlamaConfig(**kwargs).to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
    # also for readers older than transformers 5 (which reads rope_parameters)
    config["rope_theta"] = model.rotary_base
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    if remote:
        config["hidden_size"] = model.hidden_size
        config["qkv_bias"] = model.add_qkv_bias
        config["model_type"] = "pruned_llama"
        config["architectures"] = ["PrunedLlamaForCausalLM"]
        config["layer_shapes"] = [
            {"num_attention_heads": s["num_attention_heads"], "num_key_value_heads": s["num_query_groups"],
             "intermediate_size": s["ffn_hidden_size"]} for s in model.layer_shapes] if model.layer_shapes else None
        config["auto_map"] = {"AutoConfig": "configuration_pruned_llama.PrunedLlamaConfig",
                              "AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM"}
    return config


def read_hf_config(folder: str) -> dict:
    """The config.json of the HF folder ``folder``; refused with a message when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ConversionError(f"--load {folder}: no such folder")
    if not os.path.isfile(path):
        raise ConversionError(f"--load {folder}: no config.json (is it a HuggingFace model folder?)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: not valid JSON ({err})") from None


def model_config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama-family HF config; refuses what our model cannot compute."""
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported (supported: Llama-family "
                              f"models with model_type {', '.join(_SUPPORTED_TYPES)}, e.g. Llama, SmolLM)")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (needs silu / SwiGLU)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias (linear biases other than on q/k/v are not supported)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        problems.append("use_sliding_window (sliding-window attention is not supported)")
    rope_params = hf.get("rope_parameters") or {}
    rope = hf.get("rope_scaling") or rope_params
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "llama3":
        found = {k: rope.get(k) for k in LLAMA3_ROPE}
        if any(found[k] is None or float(found[k]) != v for k, v in LLAMA3_ROPE.items()):
            problems.append(f"Llama 3 RoPE scaling with {found} (megatron-core computes it with {LLAMA3_ROPE})")
    elif rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (plain RoPE and Llama 3 scaling only)")
    if problems:
        raise ConversionError(f"{path}: cannot import this model: {'; '.join(problems)}")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    layer_shapes = None
    if hf.get("layer_shapes"):
        layer_shapes = [{"num_query_groups": s["num_key_value_heads"], "num_attention_heads": s["num_attention_heads"],
                         "ffn_hidden_size": s["intermediate_size"]} for s in hf["layer_shapes"]]
    positions = int(hf.get("max_position_embeddings", 2048))
    model = ModelConfig(
        num_layers=int(hf["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        kv_channels=int(hf.get("head_dim") or hidden // heads),
        seq_length=min(positions, 2048), max_position_embeddings=positions,
        vocab_size=int(hf["vocab_size"]),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        rotary_base=float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=model_type == "qwen2" or bool(hf.get("qkv_bias")) or bool(hf.get("attention_bias")),
        use_rope_scaling=rope_type == "llama3",
        rope_scaling_factor=float(rope.get("factor", 8.0)) if rope_type == "llama3" else 8.0,
        layer_shapes=layer_shapes,
    )
    try:
        model.validate()
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None
    return model
