"""HuggingFace interop, by its old one-module name: ``from pretrain.interop.hf import X`` keeps
working. The code lives in ``hf_names`` (parameter names, qkv/fc1 layouts), ``hf_config``
(config.json <-> ModelConfig), ``hf_files`` (safetensors, tokenizer files), ``hf_export`` and
``hf_import``; a checkpoint's whole weights in ``pretrain.checkpoint.full_weights`` and its
tokenizer in ``pretrain.checkpoint.tokenizer``.
"""

from __future__ import annotations

from pretrain.checkpoint.full_weights import FullWeights, build_single, load_full_weights
from pretrain.checkpoint.tokenizer import checkpoint_tokenizer
from pretrain.interop.hf_config import ConversionError, hf_config_dict, model_config_from_hf, read_hf_config
from pretrain.interop.hf_export import REMOTE_CODE, export_hf, hf_state_dict
from pretrain.interop.hf_files import SHARD_BYTES, HFTensors, copy_tokenizer, save_safetensors
from pretrain.interop.hf_import import import_hf

__all__ = ["SHARD_BYTES", "REMOTE_CODE", "ConversionError", "FullWeights", "HFTensors", "build_single",
           "checkpoint_tokenizer", "copy_tokenizer", "export_hf", "hf_config_dict", "hf_state_dict", "import_hf",
           "load_full_weights", "model_config_from_hf", "read_hf_config", "save_safetensors"]
