"""The files of a HuggingFace folder: safetensors weights (read lazily, written in shards) and the
tokenizer files that travel with a model."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import torch

from data_prep.tokenizers import infer_tokenizer_type
from pretrain.interop.hf_config import ConversionError

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


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


class HFTensors:
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
    files = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if not any(f in files for f in ("tokenizer.json", "tokenizer.model")):
        return None
    os.makedirs(target, exist_ok=True)
    for file in files:
        shutil.copyfile(os.path.join(source, file), os.path.join(target, file))
    return infer_tokenizer_type(target), target
