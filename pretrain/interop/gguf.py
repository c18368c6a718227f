"""GGUF files (llama.cpp's format, how small models are often shipped) as HF weights to import.

transformers' GGUF loader (the ``gguf`` package) dequantizes the tensors and undoes llama.cpp's
q/k row permutation; the result is a HF Llama state dict, its config and its tokenizer, which
``pretrain.interop.hf_import.import_hf`` imports like a HF folder. The import therefore computes exactly what the
dequantized GGUF computes: the quantization error is the GGUF's own, reported, not added to.
Architectures and quantization types are checked from the file's header first, so an unsupported
file is refused in a second, before anything is dequantized.

transformers reads no ``deci`` file (llama.cpp's architecture for per-layer shapes, which our
export writes for a model pruned per layer: ``pretrain.interop.gguf_export``), so those are read
here (``read_deci_gguf``): the per-layer head, query-group and FFN arrays of the header, each tensor
dequantized by the ``gguf`` package under the name our export gave it, the q/k rows put back in
HF's order, the tokenizer through transformers (its GGUF tokenizer reader is architecture-free).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile

from pretrain.config import ConfigError, ModelConfig
from pretrain.interop.hf_config import ConversionError, hf_config_dict, model_config_from_hf
from pretrain.model.memory import check_model_fits

# GGUF general.architecture values that are Llama-family models our model computes (deci: as our
# export writes per-layer shapes, read by read_deci_gguf)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "deci")
_PLAIN_TYPES = ("F32", "F16", "BF16", "F64")


def find_gguf(load: str) -> str | None:
    """The ``.gguf`` file that ``load`` names (the file, or a folder holding exactly one), or None
    for a folder with none (a HF folder)."""
    if os.path.isfile(load):
        if not load.endswith(".gguf"):
            raise ConversionError(f"--load {load}: a file must be a .gguf model; otherwise give a HF model folder")
        return load
    if not os.path.isdir(load):
        return None
    found = sorted(f for f in os.listdir(load) if f.endswith(".gguf"))
    if len(found) > 1:
        raise ConversionError(f"--load {load} holds {len(found)} .gguf files ({', '.join(found)}): "
                              "give the one to import as --load FOLDER/FILE.gguf")
    if found and os.path.isfile(os.path.join(load, "config.json")):
        return None  # a HF folder that also ships a GGUF: the HF weights are the unquantized ones
    return os.path.join(load, found[0]) if found else None


def supported_quantizations() -> set[str]:
    """The tensor types the ``gguf`` package can dequantize."""
    from gguf import quants

    return set(_PLAIN_TYPES) | {t.name for t in quants._type_traits}


def gguf_header(path: str) -> tuple[str, collections.Counter]:
    """(architecture, count of tensors per quantization type), read without dequantizing."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct errors, or numpy's on a bad file
        raise ConversionError(f"{path}: not a readable GGUF file ({type(err).__name__}: {str(err)[:200]}); "
                              "it is truncated or corrupt: download it again") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ConversionError(f"{path}: the GGUF header has no general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return architecture, collections.Counter(t.tensor_type.name for t in reader.tensors)


def check_gguf(path: str) -> tuple[str, collections.Counter]:
    """Refuse a GGUF whose architecture or quantization types we cannot import; returns both."""
    architecture, types = gguf_header(path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"{path}: GGUF architecture {architecture!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}: Llama-family models such as Llama, SmolLM, Qwen2, "
                              "and deci as our export writes per-layer shapes)")
    unknown = sorted(set(types) - supported_quantizations())
    if unknown:
        raise ConversionError(f"{path}: quantization type(s) {', '.join(unknown)} cannot be dequantized by the gguf "
                              f"package (supported: {', '.join(sorted(supported_quantizations()))}); use a GGUF "
                              "with another quantization, or the model's HF folder")
    return architecture, types


def _check_fits(hf: dict, path: str) -> None:
    """The shape in the GGUF header against memory, before anything is dequantized: transformers'
    fp32 model and our copy of its state are held at once."""
    model = model_config_from_hf(hf, path)
    check_model_fits(model.num_parameters(int(hf["vocab_size"]))["total"], 8, path,
                     "two fp32 copies (dequantized) in one process", "import it on a machine with more memory")


# what transformers raises on a GGUF it cannot read
_TRANSFORMERS_ERRORS = (ValueError, KeyError, NotImplementedError, OSError)


def _saved_tokenizer(tokenizer_class, path: str) -> str:
    """The GGUF's tokenizer, read by transformers' ``tokenizer_class``, saved into a new
    temporary folder (returned; the caller removes it)."""
    try:
        tokenizer = tokenizer_class.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path))
    except _TRANSFORMERS_ERRORS as err:
        raise ConversionError(f"{path}: transformers cannot read this GGUF's tokenizer ({type(err).__name__}: "
                              f"{str(err)[:300]})") from None
    tokenizer_dir = tempfile.mkdtemp(prefix="gguf_tokenizer_")
    tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer_dir


def read_gguf(path: str) -> tuple[dict, dict, str, dict]:
    """(HF config dict, dequantized fp32 state dict, a temporary folder with its tokenizer, tensors
    per quantization type). The caller removes the tokenizer folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    architecture, types = check_gguf(path)
    if architecture == "deci":
        return read_deci_gguf(path, types)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)  # the header only
    except _TRANSFORMERS_ERRORS as err:
        raise ConversionError(f"{path}: transformers cannot read this GGUF's header ({type(err).__name__}: "
                              f"{str(err)[:300]})") from None
    _check_fits(config.to_dict(), path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except _TRANSFORMERS_ERRORS as err:
        raise ConversionError(f"{path}: transformers cannot load this GGUF ({type(err).__name__}: "
                              f"{str(err)[:300]})") from None
    tokenizer_dir = _saved_tokenizer(AutoTokenizer, path)
    hf = config.to_dict()
    hf["architectures"] = [f"{type(model).__name__} (GGUF {name})"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return hf, state, tokenizer_dir, dict(types)


def _deci_model(reader, tensors: dict, path: str) -> ModelConfig:
    """Our ModelConfig from a ``deci`` header: per-layer arrays of heads, query groups and FFN
    widths (what our export writes), the Llama 3 RoPE factors if the file has them."""
    import torch

    from pretrain.interop.gguf_export import llama3_rope_factors  # lazy: the export pulls in the writer's imports

    def field(key: str, default=None):
        found = reader.fields.get(f"deci.{key}")
        if found is None:
            if default is None:
                raise ConversionError(f"{path}: the deci header has no deci.{key}")
            return default
        return found.contents()

    layers = int(field("block_count"))
    widths = [field("attention.head_count"), field("attention.head_count_kv"), field("feed_forward_length")]
    heads, groups, ffn = [w if isinstance(w, list) else [w] * layers for w in widths]
    if not len(heads) == len(groups) == len(ffn) == layers:
        raise ConversionError(f"{path}: the per-layer arrays have {len(heads)}, {len(groups)} and {len(ffn)} entries "
                              f"for {layers} layers")
    if any(g == 0 or h == 0 or f == 0 for h, g, f in zip(heads, groups, ffn)):
        raise ConversionError(f"{path}: a layer without attention or FFN (deci's linear-attention or no-op blocks) "
                              "is not a model ours computes; only per-layer widths are imported")
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path}: no tensor token_embd.weight; the file is not a complete model")
    hidden = int(field("embedding_length"))
    model = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=max(heads), num_query_groups=max(groups),
        ffn_hidden_size=max(ffn), kv_channels=int(field("attention.key_length", hidden // max(heads))),
        seq_length=min(int(field("context_length", 2048)), 2048),
        max_position_embeddings=int(field("context_length", 2048)),
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF lists dimensions innermost first
        untie_embeddings_and_output_weights="output.weight" in tensors,
        rotary_base=float(field("rope.freq_base", 10000.0)),
        norm_epsilon=float(field("attention.layer_norm_rms_epsilon", 1e-6)),
        add_qkv_bias="blk.0.attn_q.bias" in tensors,
        layer_shapes=[{"num_attention_heads": h, "num_query_groups": g, "ffn_hidden_size": f}
                      for h, g, f in zip(heads, groups, ffn)])
    if "rope_freqs.weight" in tensors:  # Llama 3 scaling, written as each frequency's divisor
        factors = torch.from_numpy(_dequantized(tensors["rope_freqs.weight"]).copy())
        model = dataclasses.replace(model, use_rope_scaling=True, rope_scaling_factor=float(factors.max()))
        if not torch.allclose(factors, llama3_rope_factors(model), rtol=1e-5):
            raise ConversionError(f"{path}: rope_freqs are not Llama 3's RoPE scaling (the one scaling imported)")
    try:
        model.validate()
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None
    return model


def _dequantized(tensor):
    """One tensor of the file (a ``gguf.ReaderTensor``) as fp32 numpy in its row-major (HF) shape."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        return np.asarray(tensor.data, dtype=np.float32)
    return quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)


def read_deci_gguf(path: str, types: collections.Counter) -> tuple[dict, dict, str, dict]:
    """``read_gguf`` for a ``deci`` file (module docstring): the same four results."""
    import gguf
    import torch
    from transformers import PreTrainedTokenizerFast

    from pretrain.interop.gguf_export import rope_pairs_halves  # lazy: as in _deci_model

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    model = _deci_model(reader, tensors, path)
    vocab = model.vocab_size
    hf = hf_config_dict(model, vocab, {}, torch.float32)
    _check_fits(hf, path)
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, model.num_layers)
    state, used = {}, set()
    hf_names = ["model.embed_tokens.weight", "model.norm.weight"] + \
        (["lm_head.weight"] if model.untie_embeddings_and_output_weights else [])
    for i in range(model.num_layers):
        layer = f"model.layers.{i}."
        hf_names += [layer + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                         "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                         "mlp.down_proj.weight")]
        if model.add_qkv_bias:
            hf_names += [layer + f"self_attn.{p}_proj.bias" for p in "qkv"]
    widths = model.layer_widths()
    for hf_name in hf_names:
        name = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in tensors:
            raise ConversionError(f"{path}: no tensor {name} ({hf_name}); the file is not a complete model")
        t = torch.from_numpy(_dequantized(tensors[name]).copy())
        if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            groups, heads, _ = widths[int(hf_name.split(".")[2])]
            t = rope_pairs_halves(t, heads if ".q_proj." in hf_name else groups)
        state[hf_name] = t
        used.add(name)
    extra = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if extra:
        raise ConversionError(f"{path}: tensors {', '.join(extra[:5])} are not part of a model ours computes")
    # transformers' GGUF tokenizer reader asks nothing of the architecture (its AutoTokenizer does)
    tokenizer_dir = _saved_tokenizer(PreTrainedTokenizerFast, path)
    hf["architectures"] = [f"PrunedLlamaForCausalLM (GGUF {os.path.basename(path)}, deci)"]
    return hf, state, tokenizer_dir, dict(types)
