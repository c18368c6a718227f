"""Export: one of our checkpoints -> a HuggingFace folder (``tools/convert_to_hf.py``).

The checkpoint is read whole in one process (``pretrain.checkpoint.full_weights``: a checkpoint
with pruning masks comes back shrunk); names and the qkv/fc1 layouts are mapped by
``hf_names.to_hf``. Uniform shapes give a stock ``LlamaForCausalLM`` folder; per-layer shapes give
a ``PrunedLlamaForCausalLM`` (``hf_remote_code/``, built on transformers' Llama modules) loaded
with ``trust_remote_code=True``. The tokenizer goes along (``data_prep.hf_tokenizer``). The folder
is written into a temporary folder next to ``--save`` and renamed at the end: an interrupted or
refused export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from data_prep.hf_tokenizer import export_hf_tokenizer
from data_prep.tokenizers import TextTokenizer, TokenizerError, build_tokenizer, infer_tokenizer_type
from pretrain.checkpoint import staged_output
from pretrain.checkpoint.full_weights import FullWeights, load_full_weights
from pretrain.checkpoint.tokenizer import check_checkpoint_tokenizer, checkpoint_tokenizer, unpadded_vocab
from pretrain.config import ConfigError
from pretrain.interop.hf_config import ConversionError, hf_config_dict
from pretrain.interop.hf_files import SHARD_BYTES, save_safetensors
from pretrain.interop.hf_names import to_hf
from pretrain.checkpoint.atomic import require_new_folder
from pretrain.pruning.masks import ModelShape

# the per-layer model's config and modeling files, copied into a per-layer export
REMOTE_CODE = os.path.join(os.path.dirname(__file__), "hf_remote_code")


def checkpoint_text_tokenizer(weights: FullWeights, tokenizer_model: str | None,
                              otherwise: str = ", or --no-tokenizer") -> TextTokenizer | None:
    """The tokenizer the checkpoint was trained with (``--tokenizer-model`` when its recorded path
    is stale), held to the tokenizer identity rule; None when the checkpoint names none."""
    recorded = checkpoint_tokenizer(weights.folder, weights.trainer_state)
    if weights.config.data.tokenizer_type == "NullTokenizer" or not (tokenizer_model or recorded):
        return None
    tokenizer_type, path = (infer_tokenizer_type(tokenizer_model), tokenizer_model) if tokenizer_model else recorded
    try:
        tokenizer = build_tokenizer(tokenizer_type, path)
    except TokenizerError as err:
        raise ConversionError(f"{err} (the checkpoint's tokenizer; pass --tokenizer-model to point at it"
                              f"{otherwise})") from None
    try:
        check_checkpoint_tokenizer("--load", weights.folder, weights.trainer_state, tokenizer)
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    return tokenizer


def _export_tokenizer(weights: FullWeights, tokenizer_model: str | None, tmp: str):
    tokenizer = checkpoint_text_tokenizer(weights, tokenizer_model)
    if tokenizer is None:
        return None, {}
    try:
        ids = export_hf_tokenizer(tokenizer, tmp, weights.config.model.seq_length)
    except TokenizerError as err:
        raise ConversionError(str(err)) from None
    return tokenizer, ids


def hf_state_dict(weights: FullWeights, vocab: int, zero_o_proj_bias: bool = False) -> dict:
    """HF-named tensors of ``weights``, the vocabulary cut to ``vocab`` rows (and zero
    ``o_proj.bias`` tensors for a Llama config with ``attention_bias``)."""
    model = weights.config.model
    shape = ModelShape.from_config(model, weights.vocab_size)
    out = {}
    for name, tensor in weights.tensors.items():
        for hf_name, value in to_hf(name, tensor, shape).items():
            if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
                value = value[:vocab]
            out[hf_name] = value
    if zero_o_proj_bias:
        for i in range(model.num_layers):
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(model.hidden_size)
    return out


def export_hf(load: str, save: str, dtype: str = "fp32", tokenizer_model: str | None = None,
              export_tokenizer: bool = True, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a HuggingFace folder for the checkpoint under ``load``. Returns a summary."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConversionError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    require_new_folder(save, "--save")
    weights = load_full_weights(load)
    model = weights.config.model
    with staged_output(save) as tmp:
        tokenizer, special_ids = _export_tokenizer(weights, tokenizer_model, tmp) if export_tokenizer else (None, {})
        # the real vocabulary, the one the model's softmax covers: the padding rows megatron adds
        # for TP are not part of the model (their logits are -inf); an imported model keeps its own
        # vocabulary, which may have rows its tokenizer never uses
        vocab = unpadded_vocab(model, weights.trainer_state, tokenizer.vocab_size if tokenizer else weights.vocab_size)
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary "
                                  f"is {vocab}: pass the tokenizer the model was trained with")
        if vocab > weights.vocab_size:
            raise ConversionError(f"the tokenizer has {vocab} tokens but the checkpoint's vocabulary is "
                                  f"{weights.vocab_size}: pass the tokenizer the model was trained with")
        config = hf_config_dict(model, vocab, special_ids, torch_dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if config["model_type"] == "pruned_llama":
            for file in ("configuration_pruned_llama.py", "modeling_pruned_llama.py"):
                shutil.copyfile(os.path.join(REMOTE_CODE, file), os.path.join(tmp, file))
        generation = {k: v for k, v in special_ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({**generation, "_from_model_config": True}, f, indent=2)
        tensors = hf_state_dict(weights, vocab, zero_o_proj_bias=config["model_type"] == "llama"
                                and bool(config.get("attention_bias")))
        files = save_safetensors(tensors, tmp, torch_dtype, shard_bytes)
    return {"folder": save, "architecture": config["architectures"][0], "vocab_size": vocab,
            "shrunk": weights.shrunk, "files": files, "source": weights.folder,
            "parameters": sum(t.numel() for t in tensors.values()), "tokenizer": tokenizer is not None}
