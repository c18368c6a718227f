"""HuggingFace interop: our checkpoints <-> Llama-family HF folders, in one process.

Export (``export_hf``): the checkpoint (any TP/PP; ``dist_checkpointing`` reshards on load) is read
into a TP=1/PP=1 model; a checkpoint with pruning masks is shrunk first (the weights only, with
``pretrain.model.shrunk``); names and the qkv/fc1 layouts are mapped by ``state_adapter.to_hf``.
Uniform shapes give a stock ``LlamaForCausalLM`` folder; per-layer shapes give a
``PrunedLlamaForCausalLM`` (``pretrain/hf_remote_code``, built on transformers' Llama modules)
loaded with ``trust_remote_code=True``. The tokenizer goes along (``data_prep.hf_tokenizer``).

Import (``import_hf``): a Llama (or our per-layer export) folder becomes a weights-only checkpoint
at iteration 0 that ``python -m pretrain --load`` starts from with a fresh optimizer.

Both write into a temporary folder next to ``--save`` and rename it at the end: an interrupted or
refused conversion leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass

import torch

from pretrain.config import ConfigError, DataConfig, ModelConfig, ParallelConfig, PretrainConfig
from pretrain.model.memory import check_model_fits
from pretrain.checkpoint.atomic import require_new_folder
from pretrain.checkpoint.stored import checkpoint_tokenizer

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
_REMOTE_CODE = os.path.join(os.path.dirname(__file__), "hf_remote_code")
_SUPPORTED_TYPES = ("llama", "qwen2", "pruned_llama")


class ConversionError(ValueError):
    """The conversion cannot be done as asked; the message says why and what to do."""


@dataclass
class FullWeights:
    """A checkpoint's parameters as full (TP=1, PP=1) tensors keyed by megatron-core names."""

    config: PretrainConfig
    vocab_size: int  # padded, as stored
    tensors: dict
    trainer_state: dict
    folder: str
    shrunk: bool


def _build_single(model_cfg: ModelConfig, vocab: int, dtype: torch.dtype = torch.float32):
    from pretrain.config import TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model

    init_distributed(1, 1)
    set_random_seed(0)  # megatron's RNG tracker must exist before a forward pass
    train = TrainConfig(bf16=dtype == torch.bfloat16)
    return build_model(model_cfg, ParallelConfig(), train, vocab, use_te=False, wrap_ddp=False)[0]


def load_full_weights(load: str) -> FullWeights:
    """Read a checkpoint's weights; a checkpoint with pruning masks comes back shrunk."""
    from pretrain import checkpoint as ckpt
    from pretrain.pruning.masks import ModelShape
    from pretrain.pruning.state import PruningState
    from pretrain.model.shrunk import shrink_parameter, shrunk_model_config, shrunk_name

    folder = ckpt.find_checkpoint(load)
    if folder is None:
        raise ConversionError(f"--load {load}: no valid checkpoint there")
    if ckpt.deepspeed_only(folder):
        raise ConversionError(ckpt.deepspeed_only(folder))
    state = ckpt.read_trainer_state(folder)
    cfg = PretrainConfig.from_dict(state["config"])
    vocab = int(state["vocab_size"])
    check_model_fits(cfg.model.num_parameters(vocab)["total"], 4, folder, "fp32 weights in one process",
                     "convert it on a machine with more memory")
    model = _build_single(cfg.model, vocab)
    ckpt.load_checkpoint(folder, [model], None, load_optim=False, load_rng=False)
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    masks = PruningState.stored_masks(state)
    if masks is None:
        return FullWeights(cfg, vocab, tensors, state, folder, shrunk=False)
    shape = ModelShape.from_config(cfg.model, vocab)
    if shape.parameter_count(masks) == shape.parameter_count(shape.full_masks()):
        return FullWeights(cfg, vocab, tensors, state, folder, shrunk=False)
    small = {}
    for name, tensor in tensors.items():
        new_name = shrunk_name(name, masks)
        if new_name is not None:  # None: a dropped layer's
            small[new_name] = shrink_parameter(name, tensor, masks, shape)
    new_cfg = dataclasses.replace(cfg, model=shrunk_model_config(cfg.model, masks, shape))
    return FullWeights(new_cfg, vocab, small, state, folder, shrunk=True)


# --- export ---------------------------------------------------------------------------------------

def _export_tokenizer(weights: FullWeights, tokenizer_model: str | None, tmp: str):
    from data_prep.tokenizers import TokenizerError, build_tokenizer, infer_tokenizer_type

    cfg = weights.config
    recorded = checkpoint_tokenizer(weights.folder, weights.trainer_state)
    if cfg.data.tokenizer_type == "NullTokenizer" or not (tokenizer_model or recorded):
        return None, {}
    tokenizer_type, path = (infer_tokenizer_type(tokenizer_model), tokenizer_model) if tokenizer_model else recorded
    try:
        tokenizer = build_tokenizer(tokenizer_type, path)
    except TokenizerError as err:
        raise ConversionError(f"{err} (the checkpoint's tokenizer; pass --tokenizer-model to point at it, "
                              "or --no-tokenizer)") from None
    from pretrain.resume import check_checkpoint_tokenizer

    try:
        check_checkpoint_tokenizer("--load", weights.folder, weights.trainer_state, tokenizer)
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    from data_prep.hf_tokenizer import export_hf_tokenizer

    try:
        ids = export_hf_tokenizer(tokenizer, tmp, cfg.model.seq_length)
    except TokenizerError as err:
        raise ConversionError(str(err)) from None
    return tokenizer, ids


# the fixed parts of megatron-core's Llama 3 RoPE scaling (RotaryEmbedding._apply_scaling)
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config_dict(model: ModelConfig, vocab: int, special_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of the export: stock Llama (Qwen2 with q/k/v biases) for uniform shapes, our
    per-layer class otherwise."""
    from transformers import LlamaConfig, Qwen2Config

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
        rope_scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **_LLAMA3_ROPE}
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


def hf_state_dict(weights: FullWeights, vocab: int, zero_o_proj_bias: bool = False) -> dict:
    """HF-named tensors of ``weights``, the vocabulary cut to ``vocab`` rows (and zero
    ``o_proj.bias`` tensors for a Llama config with ``attention_bias``)."""
    from pretrain.pruning.masks import ModelShape
    from pretrain.model.shrunk import to_hf

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


def save_safetensors(tensors: dict, folder: str, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> list:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` past ``shard_bytes``."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name].to(dtype).contiguous().clone()
        if current and size + t.numel() * t.element_size() > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        names.append(file)
        for key, t in shard.items():
            weight_map[key] = file
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def export_hf(load: str, save: str, dtype: str = "fp32", tokenizer_model: str | None = None,
              export_tokenizer: bool = True, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a HuggingFace folder for the checkpoint under ``load``. Returns a summary."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConversionError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    require_new_folder(save, "--save")
    weights = load_full_weights(load)
    model = weights.config.model
    from pretrain.checkpoint import staged_output
    from pretrain.resume import unpadded_vocab

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
                shutil.copyfile(os.path.join(_REMOTE_CODE, file), os.path.join(tmp, file))
        generation = {k: v for k, v in special_ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({**generation, "_from_model_config": True}, f, indent=2)
        tensors = hf_state_dict(weights, vocab, zero_o_proj_bias=config["model_type"] == "llama"
                                and bool(config.get("attention_bias")))
        files = save_safetensors(tensors, tmp, torch_dtype, shard_bytes)
    return {"folder": save, "architecture": config["architectures"][0], "vocab_size": vocab,
            "shrunk": weights.shrunk, "files": files, "source": weights.folder,
            "parameters": sum(t.numel() for t in tensors.values()), "tokenizer": tokenizer is not None}


# --- import ---------------------------------------------------------------------------------------

def _read_hf_config(folder: str) -> dict:
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
        found = {k: rope.get(k) for k in _LLAMA3_ROPE}
        if any(found[k] is None or float(found[k]) != v for k, v in _LLAMA3_ROPE.items()):
            problems.append(f"Llama 3 RoPE scaling with {found} (megatron-core computes it with {_LLAMA3_ROPE})")
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


class _HFTensors:
    """Lazy access to a HF folder's tensors (safetensors, sharded or not; or pytorch_model.bin)."""

    def __init__(self, folder: str, loaded: dict | None = None):
        from safetensors import safe_open

        self._open = safe_open
        self._handles: dict = {}
        self._bin = None
        self.used: set[str] = set()
        if loaded is not None:  # tensors already in memory (a dequantized GGUF), named after ``folder``
            self._bin, self._files = loaded, {k: folder for k in loaded}
            return
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ConversionError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
            self._files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
            missing = sorted({f for f in self._files.values() if not os.path.isfile(f)})
            if missing:
                raise ConversionError(f"{index} names {missing[0]}, which is missing")
        elif os.path.isfile(single):
            self._files = {k: single for k in self._handle(single).keys()}
        elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
            self._bin = self._load_bin(os.path.join(folder, "pytorch_model.bin"))
            self._files = {k: "pytorch_model.bin" for k in self._bin}
        else:
            raise ConversionError(f"--load {folder}: no model.safetensors(.index.json) or pytorch_model.bin")

    @staticmethod
    def _load_bin(path: str) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConversionError(f"{path}: refused: it holds Python objects other than tensors (a pickle that "
                                  f"could run code: {str(err).splitlines()[-1][:300]})") from None
        except Exception as err:
            raise ConversionError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:300]}); the file is "
                                  "truncated or corrupt: download it again") from None

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._open(file, "pt")
            except Exception as err:  # safetensors' own error type (a truncated or corrupt file)
                raise ConversionError(f"{file}: not a readable safetensors file ({err}); it is truncated or "
                                      "corrupt: download it again") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; refused if it cannot be read or holds NaN/inf."""
        if name not in self._files:
            raise ConversionError(f"the HF weights have no tensor {name!r}")
        self.used.add(name)
        file = self._files[name]
        if self._bin is not None:
            value = self._bin[name]
        else:
            try:
                value = self._handle(file).get_tensor(name)
            except Exception as err:
                raise ConversionError(f"{file}: cannot read tensor {name!r} ({err}); the file is truncated or "
                                      "corrupt: download it again") from None
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ConversionError(f"{file}: tensor {name!r} holds {bad} NaN/inf values of {value.numel()}; "
                                      "the model file is corrupt (or was saved after a diverged run)")
        return value


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja")


def copy_tokenizer(source: str, target: str) -> tuple[str, str] | None:
    """Copy the tokenizer files of the HF folder ``source`` into ``target``; returns the
    (--tokenizer-type, --tokenizer-model) that read the copy, or None when ``source`` has none."""
    from data_prep.tokenizers import infer_tokenizer_type

    files = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if not any(f in files for f in ("tokenizer.json", "tokenizer.model")):
        return None
    os.makedirs(target, exist_ok=True)
    for file in files:
        shutil.copyfile(os.path.join(source, file), os.path.join(target, file))
    return infer_tokenizer_type(target), target


def _checked_tokenizer(recorded: tuple[str, str] | None, hf_vocab: int, load: str) -> dict:
    """The tokenizer record of the import (``pretrain.resume.tokenizer_record``); it must fit the vocabulary."""
    if recorded is None:
        return {}
    from data_prep.tokenizers import TokenizerError, build_tokenizer

    from pretrain.resume import tokenizer_record

    try:
        tokenizer = build_tokenizer(*recorded)
    except TokenizerError as err:
        raise ConversionError(f"{load}: its tokenizer cannot be read ({err})") from None
    if tokenizer.vocab_size > hf_vocab:
        raise ConversionError(f"{load}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocabulary ({hf_vocab}): it is not this model's tokenizer")
    # a sentencepiece model beside the tokenizer.json (our export writes both, checked to encode alike;
    # HF folders hold the two forms of one tokenizer): data it made fits the imported model too
    folder = recorded[1] if os.path.isdir(recorded[1]) else os.path.dirname(recorded[1])
    other = os.path.join(folder, "tokenizer.model")
    also = (other,) if os.path.isfile(other) and os.path.abspath(other) != getattr(tokenizer, "path", None) else ()
    return tokenizer_record(tokenizer, also)


def import_hf(load: str, save: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              make_vocab_size_divisible_by: int = 128) -> dict:
    """Write a weights-only checkpoint (iteration 0) of the HF model in ``load`` (a folder, or a
    ``.gguf`` file / a folder holding one), with a copy of its tokenizer in ``save/tokenizer``."""
    from pretrain.interop.gguf import find_gguf, read_gguf

    gguf_file = find_gguf(load)
    if gguf_file is not None:
        require_new_folder(save, "--save")
        hf, loaded, tokenizer_dir, quantization = read_gguf(gguf_file)
        try:
            summary = _import(hf, _HFTensors(gguf_file, loaded), gguf_file, tokenizer_dir, save,
                              tensor_parallel, pipeline_parallel, make_vocab_size_divisible_by)
        finally:
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
        return {**summary, "quantization": quantization}
    hf = _read_hf_config(load)
    model_config_from_hf(hf, os.path.join(load, "config.json"))  # refused before any weight is read
    require_new_folder(save, "--save")
    return _import(hf, None, load, load, save, tensor_parallel, pipeline_parallel, make_vocab_size_divisible_by)


def _copy_hf_weights(model, tensors, model_cfg, hf_vocab: int, load: str) -> None:
    """Every parameter of ``model`` from the HF tensors (the vocabulary padding rows stay zero)."""
    from pretrain.pruning.masks import ModelShape
    from pretrain.model.shrunk import from_hf

    shape = ModelShape.from_config(model_cfg, model.embedding.word_embeddings.weight.shape[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = from_hf(name, tensors.get, shape)
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if value.shape[0] != hf_vocab:
                    raise ConversionError(f"{load}: {name} has {value.shape[0]} rows, config.json says "
                                          f"vocab_size {hf_vocab}")
                param.zero_()  # the padding rows megatron adds for TP stay zero
                param[:hf_vocab].copy_(value)
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise ConversionError(f"{load}: {name} has shape {tuple(value.shape)}, the config implies "
                                      f"{tuple(param.shape)}")
            param.copy_(value)


def _check_all_used(tensors, model_cfg, load: str) -> None:
    """Refuse HF tensors the import did not use (an unsupported variant would lose them)."""
    unused = sorted(n for n in tensors.names() - tensors.used if not n.endswith("rotary_emb.inv_freq"))
    for name in [n for n in unused if n.endswith("self_attn.o_proj.bias")]:
        # Llama's attention_bias also biases o_proj; our model has none, so only zeros import
        if bool(tensors.get(name).any()):
            raise ConversionError(f"{load}: {name} is not zero; biases on the attention output projection "
                                  "are not supported (q/k/v biases are)")
        unused.remove(name)
    if model_cfg.untie_embeddings_and_output_weights is False:
        unused = [n for n in unused if n != "lm_head.weight"]  # a tied copy some exports write
    if unused:
        raise ConversionError(f"{load}: tensors the Llama architecture does not use: {unused[:5]}"
                              f"{' ...' if len(unused) > 5 else ''} (an unsupported variant?)")


def _import(hf: dict, tensors, load: str, tokenizer_source: str, save: str, tensor_parallel: int,
            pipeline_parallel: int, make_vocab_size_divisible_by: int) -> dict:
    from pretrain import checkpoint as ckpt

    config_path = load if tensors is not None else os.path.join(load, "config.json")
    model_cfg = model_config_from_hf(hf, config_path)
    # the HF model's vocabulary is the one its softmax covers: our padding rows beyond it are masked
    model_cfg = dataclasses.replace(model_cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                    unpadded_vocab_size=int(hf["vocab_size"]))
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    try:
        parallel.validate(model_cfg, tensor_parallel * pipeline_parallel)
    except ConfigError as err:
        raise ConversionError(f"the model does not fit --tensor-model-parallel-size {tensor_parallel} x "
                              f"--pipeline-model-parallel-size {pipeline_parallel}: {err}") from None
    hf_vocab = int(hf["vocab_size"])
    vocab = model_cfg.padded_vocab_size(hf_vocab, tensor_parallel)
    check_model_fits(model_cfg.num_parameters(vocab)["total"], 4, config_path, "fp32 weights in one process",
                     "import it on a machine with more memory")
    tensors = tensors or _HFTensors(load)
    model = _build_single(model_cfg, vocab)
    _copy_hf_weights(model, tensors, model_cfg, hf_vocab, load)
    _check_all_used(tensors, model_cfg, load)
    with ckpt.staged_output(save) as tmp:
        # the tokenizer goes inside the checkpoint: training, evaluation and export find it there
        recorded = copy_tokenizer(tokenizer_source, os.path.join(tmp, "tokenizer"))
        tokenizer = _checked_tokenizer(recorded, hf_vocab, load)
        final_tokenizer = os.path.join(os.path.abspath(save), "tokenizer")
        data = DataConfig(tokenizer_type=recorded[0], tokenizer_model=final_tokenizer) if recorded else DataConfig()
        cfg = PretrainConfig(model=model_cfg, parallel=parallel, data=data)
        state = {"iteration": 0, "consumed_samples": 0, "config": cfg.to_dict(), "vocab_size": vocab,
                 "layout": {}, "weights_only": True, **tokenizer,
                 "imported_from": {"path": os.path.abspath(load), "vocab_size": hf_vocab,
                                   "architecture": (hf.get("architectures") or ["?"])[0]}}
        folder = ckpt.save_checkpoint(tmp, 0, [model], None, state)
    return {"folder": os.path.join(save, os.path.basename(folder)), "vocab_size": vocab, "hf_vocab_size": hf_vocab,
            "parameters": sum(p.numel() for p in model.parameters()), "config": cfg,
            "tokenizer": final_tokenizer if recorded else None}
