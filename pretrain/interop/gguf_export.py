"""Export: one of our checkpoints -> a GGUF file for llama.cpp (``tools/convert_to_gguf.py``).

The weights come the way the HF export gets them (``load_full_weights``: a checkpoint with pruning
masks comes back shrunk) and are named by the HF export's mapping (``hf_export.hf_state_dict``),
then by the ``gguf`` package's own HF -> GGUF table, as llama.cpp's ``convert_hf_to_gguf.py`` does.
The architecture is the llama.cpp one that computes our model:

- ``llama`` for uniform shapes; ``qwen2`` for uniform shapes with q/k/v biases (imported Qwen2);
- ``deci`` (Llama-3.1-Nemotron-NAS) for per-layer shapes: llama.cpp reads per-layer arrays of
  ``head_count``, ``head_count_kv`` and ``feed_forward_length`` for every architecture
  (llama.cpp src/llama-model.cpp:1395-1404, ``get_key_or_arr``), but its ``llama`` builds every
  layer with layer 0's sizes (src/models/llama.cpp:53, ``n_head`` = ``hparams.n_head()``) and
  only ``deci`` sizes each layer by its own (src/models/deci.cpp:32-34 and 103-105) — llama.cpp
  0.3.36's sources (``tools/build_llama_cpp.py``).

``attention.key_length``/``value_length`` are always written: llama.cpp otherwise takes the head
size as hidden / heads of layer 0 (src/llama-model.cpp:1440), wrong once heads or the hidden
width are pruned. The tokenizer is embedded as llama.cpp's vocabulary (sentencepiece -> ``llama``,
HF byte-level BPE -> ``gpt2`` with its pre-tokenizer named). The file is written under
``SAVE.tmp`` and renamed at the end; a failure leaves nothing under ``--save``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import dataclasses

import numpy as np
import torch

from data_prep.durable import sync_folder
from data_prep.hf_tokenizer import sentencepiece_proto
from data_prep.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer, TextTokenizer
from pretrain.checkpoint.atomic import is_disk_full
from pretrain.checkpoint.full_weights import FullWeights, load_full_weights
from pretrain.checkpoint.tokenizer import unpadded_vocab
from pretrain.config import ModelConfig
from pretrain.errors import OutputError
from pretrain.interop.hf_config import LLAMA3_ROPE, ConversionError
from pretrain.interop.hf_export import checkpoint_text_tokenizer, hf_state_dict
from pretrain.outputs import require_writable, write_failure

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): the per-layer arrays hold no more
MAX_LAYERS = 512


def _qtype(dtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def gguf_architecture(model: ModelConfig) -> str:
    """The llama.cpp architecture that computes ``model`` (module docstring)."""
    if model.layer_shapes:
        return "deci"
    return "qwen2" if model.add_qkv_bias and not model.use_rope_scaling else "llama"


def check_expressible(model: ModelConfig, where: str) -> None:
    """Refuse, naming the field, a model llama.cpp cannot compute as we do."""
    problems = []
    if model.num_layers > MAX_LAYERS:
        problems.append(f"num_layers {model.num_layers} (llama.cpp holds at most {MAX_LAYERS} layers: "
                        "LLAMA_MAX_LAYERS)")
    if problems:
        raise ConversionError(f"{where}: cannot be written as GGUF: {'; '.join(problems)}")


# --- the vocabulary ---------------------------------------------------------------------------------

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    special: dict = dataclasses.field(default_factory=dict)  # bos/eos/pad/unk -> id, over the tokenizer's

    def pad_to(self, vocab: int) -> None:
        """Rows of the embedding no token uses (an imported model's vocabulary may be larger than
        its tokenizer): llama.cpp needs one token per row, as convert_hf_to_gguf.py writes them."""
        for i in range(len(self.tokens), vocab):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(_UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)


def _sentencepiece_vocab(tokenizer: SentencePieceTokenizer) -> GGUFVocab:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(_UNKNOWN if sp.is_unknown(i) else _CONTROL if sp.is_control(i) else
                     _UNUSED if sp.is_unused(i) else _BYTE if sp.is_byte(i) else _NORMAL)
    proto = sentencepiece_proto(tokenizer.path)
    return GGUFVocab("llama", "default", tokens, types, scores,
                     add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


def _pre_tokenizer(pre: dict | None, path: str) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a tokenizer.json's byte-level pre-tokenizer."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and byte_level(pre):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") or []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # digits one by one, then GPT-2's regex (llama.cpp src/llama-vocab.cpp:362)
    raise ConversionError(f"{path}: its pre_tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp "
                          "names here (GPT-2 byte-level, alone or after single digits as in SmolLM); "
                          "export it with tools/convert_to_hf.py and convert that with llama.cpp's "
                          "convert_hf_to_gguf.py")


def _bpe_vocab(tokenizer: HuggingFaceTokenizer) -> GGUFVocab:
    with open(tokenizer.path) as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{tokenizer.path}: model type {model.get('type')!r}: only BPE tokenizer.json "
                              "files can be embedded in a GGUF here")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), tokenizer.path)
    size = tokenizer.vocab_size
    tokens: list[str | None] = [None] * size
    types = [_NORMAL] * size
    for token, i in model["vocab"].items():
        if i < size:
            tokens[i] = token
    for added in spec.get("added_tokens") or []:
        i = added["id"]
        if i < size:
            tokens[i] = added["content"]
            types[i] = _CONTROL if added.get("special") else _USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    folder = os.path.dirname(tokenizer.path)
    config = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if not isinstance(template, str) and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja")) as f:  # where transformers 5 saves it
            template = f.read()
    # the model's own special tokens (an instruct model ends a turn with its eos, not our EOD)
    ids = {token: i for i, token in enumerate(tokens)}
    special = {key: ids[config[f"{key}_token"]] for key in ("bos", "eos", "pad", "unk")
               if isinstance(config.get(f"{key}_token"), str) and config[f"{key}_token"] in ids}
    return GGUFVocab("gpt2", pre, tokens, types, merges=merges, special=special,
                     chat_template=template if isinstance(template, str) else None)


def gguf_vocab(tokenizer: TextTokenizer) -> GGUFVocab:
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_vocab(tokenizer)
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return _bpe_vocab(tokenizer)
    raise ConversionError(f"--tokenizer-type {tokenizer.name} cannot be embedded in a GGUF (sentencepiece "
                          "models and HF tokenizer.json BPE can)")


def _write_vocab(writer, vocab: GGUFVocab, tokenizer: TextTokenizer) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    unk = getattr(tokenizer, "unk", None)
    special = {"eos": tokenizer.eod, "bos": tokenizer.bos, "pad": tokenizer.pad,
               "unk": unk if unk is not None and unk >= 0 else None, **vocab.special}
    for key, add in (("eos", writer.add_eos_token_id), ("bos", writer.add_bos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if special[key] is not None:
            add(special[key])
    # our pipeline adds no BOS/EOS when encoding text (the EOD goes between documents)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- the tensors ------------------------------------------------------------------------------------

def _rope_pairs_adjacent(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF/megatron rotate the halves of a head (i, i + d/2); llama.cpp's ``llama``/``deci`` RoPE
    rotates adjacent pairs (2i, 2i+1): the rows of q and k (weights and biases) are reordered per
    head, as convert_hf_to_gguf.py's ``LlamaModel.permute`` does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_pairs_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``_rope_pairs_adjacent``: llama.cpp's q/k rows back in HF's order (a GGUF read back)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(model: ModelConfig) -> torch.Tensor:
    """The ``rope_freqs`` tensor: llama.cpp divides each RoPE frequency by its factor; this is
    megatron-core's Llama 3 scaling of the same frequencies (as convert_hf_to_gguf.py computes it)."""
    dim, factor = model.head_dim, float(model.rope_scaling_factor)
    low, high, old = (LLAMA3_ROPE[k] for k in ("low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings"))
    freqs = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(weights: FullWeights, vocab: int, arch: str) -> dict[str, torch.Tensor]:
    """GGUF-named fp32 tensors of ``weights``, the vocabulary cut to ``vocab`` rows."""
    import gguf

    model = weights.config.model
    widths = model.layer_widths()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.num_layers)
    out = {}
    for hf_name, t in hf_state_dict(weights, vocab).items():
        if arch != "qwen2" and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            groups, heads, _ = widths[int(hf_name.split(".")[2])]
            t = _rope_pairs_adjacent(t, heads if ".q_proj." in hf_name else groups)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"no GGUF name for {hf_name} in llama.cpp's {arch} architecture")
        out[name] = t.float().contiguous()
    if model.use_rope_scaling:
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(model)
    return out


def _stored_as(t: torch.Tensor, dtype: str):
    """(GGML type, numpy dtype of its stored array, its byte shape) of a tensor for ``--dtype``.
    Norms, biases and RoPE factors stay f32 (llama.cpp's convert does the same); a q8_0 matrix
    whose rows are not whole 32-value blocks (a pruned width) is written f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if t.dim() == 1 else _qtype(dtype)
    if qtype == Q.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    if qtype in (Q.F32, Q.F16):
        return qtype, np.dtype(np.float32 if qtype == Q.F32 else np.float16), tuple(t.shape)
    return qtype, np.dtype(np.uint8), gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype)


def _hyperparameters(writer, model: ModelConfig, vocab: int, dtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.add_vocab_size(vocab)
    writer.add_context_length(model.max_position_embeddings or model.seq_length)
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    if model.layer_shapes:
        groups, heads, ffn = zip(*model.layer_widths())
        writer.add_head_count(list(heads))
        writer.add_head_count_kv(list(groups))
        writer.add_feed_forward_length(list(ffn))
    else:
        writer.add_head_count(model.num_attention_heads)
        writer.add_head_count_kv(model.query_groups)
        writer.add_feed_forward_length(model.ffn_hidden_size)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(float(model.rotary_base))
    writer.add_layer_norm_rms_eps(float(model.norm_epsilon))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="gguf", file=sys.stderr, disable=not enabled)


def export_gguf(load: str, save: str, dtype: str = "f16", tokenizer_model: str | None = None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Write the GGUF file ``save`` for the checkpoint under ``load``. Returns a summary."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    if os.path.isdir(save):
        raise OutputError(f"--save {save} is a folder; give the name of the .gguf file to write")
    if os.path.exists(save) and not overwrite:
        raise OutputError(f"--save {save} already exists: choose a new name, or pass --overwrite to replace it")
    require_writable(save, "--save", folder=False)
    weights = load_full_weights(load)
    model = weights.config.model
    check_expressible(model, f"--load {weights.folder}")
    tokenizer = checkpoint_text_tokenizer(weights, tokenizer_model, otherwise="")
    if tokenizer is None:
        raise ConversionError(f"--load {weights.folder}: the checkpoint names no tokenizer, and llama.cpp needs one "
                              "in the GGUF: pass the one it was trained with as --tokenizer-model")
    vocab = unpadded_vocab(model, weights.trainer_state, tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab or vocab > weights.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary "
                              f"is {vocab}: pass the tokenizer the model was trained with as --tokenizer-model")
    words = gguf_vocab(tokenizer)
    words.pad_to(vocab)
    arch = gguf_architecture(model)
    tensors = gguf_tensors(weights, vocab, arch)

    tmp = os.path.abspath(save) + ".tmp"
    writer = gguf.GGUFWriter(None, arch)
    try:
        _hyperparameters(writer, model, vocab, dtype, os.path.splitext(os.path.basename(save))[0])
        _write_vocab(writer, words, tokenizer)
        types = {}
        # shapes first (the header precedes the data), then each tensor encoded as it is written:
        # one encoded tensor in memory at a time
        for name, t in tensors.items():
            qtype, np_dtype, byte_shape = _stored_as(t, dtype)
            types[name] = qtype
            writer.add_tensor_info(name, byte_shape, np_dtype, math.prod(byte_shape) * np_dtype.itemsize,
                                   raw_dtype=qtype if np_dtype == np.uint8 else None)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _progress(sum(t.numel() * 4 for t in tensors.values()), progress) as bar:
            for name, t in tensors.items():
                writer.write_tensor_data(gguf.quants.quantize(t.numpy(), types[name]))
                bar.update(t.numel() * 4)
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, save)
        sync_folder(os.path.dirname(os.path.abspath(save)))  # the new name on the disk too
    except BaseException as err:
        # numpy's tofile reports a short write as "N requested and M written", without errno:
        # whether the disk is full is asked before the partial file is removed
        if isinstance(err, OSError) and err.errno is None and is_disk_full(err, tmp):
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        failure = write_failure(err, save, "--save", under=os.path.dirname(tmp))
        if failure is None:
            raise
        raise failure from None
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return {"file": save, "architecture": arch, "vocab_size": vocab, "shrunk": weights.shrunk,
            "source": weights.folder, "bytes": os.path.getsize(save), "types": counts,
            "parameters": sum(t.numel() for n, t in tensors.items() if not n.startswith("rope_freqs")),
            "tokenizer": words.model + (f" ({words.pre})" if words.pre and words.pre != "default" else "")}
