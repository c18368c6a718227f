"""GGUF files (llama.cpp's format, how small models are often shipped) as HF weights to import.

transformers' GGUF loader (the ``gguf`` package) dequantizes the tensors and undoes llama.cpp's
q/k row permutation; the result is a HF Llama state dict, its config and its tokenizer, which
``pretrain.interop.hf_import.import_hf`` imports like a HF folder. The import therefore computes exactly what the
dequantized GGUF computes: the quantization error is the GGUF's own, reported, not added to.
Architectures and quantization types are checked from the file's header first, so an unsupported
file is refused in a second, before anything is dequantized.
"""

from __future__ import annotations

import collections
import os
import tempfile

from pretrain.interop.hf_config import ConversionError, model_config_from_hf
from pretrain.model.memory import check_model_fits

# GGUF general.architecture values that are Llama-family models our model computes
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
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


def check_gguf(path: str) -> collections.Counter:
    """Refuse a GGUF whose architecture or quantization types we cannot import; returns the types."""
    architecture, types = gguf_header(path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"{path}: GGUF architecture {architecture!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}: Llama-family models such as Llama, SmolLM, Qwen2)")
    unknown = sorted(set(types) - supported_quantizations())
    if unknown:
        raise ConversionError(f"{path}: quantization type(s) {', '.join(unknown)} cannot be dequantized by the gguf "
                              f"package (supported: {', '.join(sorted(supported_quantizations()))}); use a GGUF "
                              "with another quantization, or the model's HF folder")
    return types


def _check_fits(hf: dict, path: str) -> None:
    """The shape in the GGUF header against memory, before anything is dequantized: transformers'
    fp32 model and our copy of its state are held at once."""
    model = model_config_from_hf(hf, path)
    check_model_fits(model.num_parameters(int(hf["vocab_size"]))["total"], 8, path,
                     "two fp32 copies (dequantized) in one process", "import it on a machine with more memory")


def read_gguf(path: str) -> tuple[dict, dict, str, dict]:
    """(HF config dict, dequantized fp32 state dict, a temporary folder with its tokenizer, tensors
    per quantization type). The caller removes the tokenizer folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    types = check_gguf(path)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)  # the header only
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        raise ConversionError(f"{path}: transformers cannot read this GGUF's header ({type(err).__name__}: "
                              f"{str(err)[:300]})") from None
    _check_fits(config.to_dict(), path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        raise ConversionError(f"{path}: transformers cannot load this GGUF ({type(err).__name__}: "
                              f"{str(err)[:300]})") from None
    tokenizer_dir = tempfile.mkdtemp(prefix="gguf_tokenizer_")
    tokenizer.save_pretrained(tokenizer_dir)
    hf = config.to_dict()
    hf["architectures"] = [f"{type(model).__name__} (GGUF {name})"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return hf, state, tokenizer_dir, dict(types)
