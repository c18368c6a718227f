"""Import: a Llama-family HuggingFace folder (or a GGUF file, ``pretrain.interop.gguf``) -> one
of our checkpoints (``tools/convert_from_hf.py``).

The result is a weights-only checkpoint at iteration 0 that ``python -m pretrain --load`` starts
from with a fresh optimizer, the HF model's tokenizer copied inside it (``save/tokenizer``). The
checkpoint is written into a temporary folder next to ``--save`` and renamed at the end: an
interrupted or refused import leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from data_prep.tokenizers import TokenizerError, build_tokenizer
from pretrain import checkpoint as ckpt
from pretrain.checkpoint.full_weights import build_single
from pretrain.checkpoint.tokenizer import tokenizer_record
from pretrain.config import ConfigError, DataConfig, ParallelConfig, PretrainConfig
from pretrain.interop.gguf import find_gguf, read_gguf
from pretrain.interop.hf_config import ConversionError, model_config_from_hf, read_hf_config
from pretrain.interop.hf_files import HFTensors, copy_tokenizer
from pretrain.interop.hf_names import from_hf
from pretrain.model.memory import check_model_fits
from pretrain.checkpoint.atomic import require_new_folder
from pretrain.pruning.masks import ModelShape


def _checked_tokenizer(recorded: tuple[str, str] | None, hf_vocab: int, load: str) -> dict:
    """The tokenizer record of the import (``pretrain.checkpoint.tokenizer.tokenizer_record``); it must fit the vocabulary."""
    if recorded is None:
        return {}
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
    gguf_file = find_gguf(load)
    if gguf_file is not None:
        require_new_folder(save, "--save")
        hf, loaded, tokenizer_dir, quantization = read_gguf(gguf_file)
        try:
            summary = _import(hf, HFTensors(gguf_file, loaded), gguf_file, tokenizer_dir, save,
                              tensor_parallel, pipeline_parallel, make_vocab_size_divisible_by)
        finally:
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
        return {**summary, "quantization": quantization}
    hf = read_hf_config(load)
    model_config_from_hf(hf, os.path.join(load, "config.json"))  # refused before any weight is read
    require_new_folder(save, "--save")
    return _import(hf, None, load, load, save, tensor_parallel, pipeline_parallel, make_vocab_size_divisible_by)


def _copy_hf_weights(model, tensors, model_cfg, hf_vocab: int, load: str) -> None:
    """Every parameter of ``model`` from the HF tensors (the vocabulary padding rows stay zero)."""
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
    tensors = tensors or HFTensors(load)
    model = build_single(model_cfg, vocab)
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
