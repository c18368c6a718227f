"""Datasets are checked before training or evaluating (DESIGN invariant 9): ids outside the
model's vocabulary, empty or truncated ``.bin``/``.idx`` files and a split without training data
stop with a message naming the file, at every TP size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.indexed_dataset import max_token_id, read_index_header, scan_max_token_id
from pretrain.config import ConfigError, DataConfig
from pretrain.data import build_datasets, check_datasets, load_tokenizer
from tests.dist_helper import run_distributed

OUT_OF_VOCAB_ID = 1500  # the tiny tokenizer has 1000 ids


def _copy(tiny_dataset, folder, manifest: bool = True) -> str:
    prefix = str(folder / "copy")
    for ext in (".bin", ".idx") + ((".json",) if manifest else ()):
        shutil.copy(tiny_dataset["prefix"] + ext, prefix + ext)
    return prefix


def _with_out_of_vocab_id(tiny_dataset, folder) -> str:
    """The tiny dataset without its manifest, one token replaced by an id the model cannot embed."""
    prefix = _copy(tiny_dataset, folder, manifest=False)
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[12345] = OUT_OF_VOCAB_ID
    tokens.flush()
    return prefix


def _config(tiny_dataset, prefix: str, split: str = "98,2,0") -> DataConfig:
    return DataConfig(data_path=[prefix], tokenizer_model=tiny_dataset["tokenizer"], split=split)


def test_ids_outside_the_vocabulary_are_refused(tiny_dataset, tmp_path):
    cfg = _config(tiny_dataset, _with_out_of_vocab_id(tiny_dataset, tmp_path))
    with pytest.raises(ConfigError) as err:
        check_datasets(cfg, load_tokenizer(cfg))
    message = str(err.value)
    assert f"--data-path {cfg.data_path[0]}" in message and f"largest token id is {OUT_OF_VOCAB_ID}" in message
    assert "1000 ids" in message and "scan of the .bin" in message
    check_datasets(_config(tiny_dataset, tiny_dataset["prefix"]), load_tokenizer(cfg))  # the right data passes


def test_manifest_gives_the_largest_id_without_a_scan(tiny_dataset, tmp_path, monkeypatch):
    prefix = _copy(tiny_dataset, tmp_path)
    manifest = json.load(open(prefix + ".json"))
    json.dump(dict(manifest, max_token_id=1200), open(prefix + ".json", "w"))
    monkeypatch.setattr("data_prep.indexed_dataset.scan_max_token_id", _must_not_read_the_largest_id)
    assert max_token_id(prefix) == (1200, prefix + ".json")


def test_manifest_of_another_bin_is_not_trusted(tiny_dataset, tmp_path):
    prefix = _with_out_of_vocab_id(tiny_dataset, tmp_path)
    manifest = json.load(open(tiny_dataset["prefix"] + ".json"))
    json.dump(dict(manifest, tokens=manifest["tokens"] - 1), open(prefix + ".json", "w"))
    largest, source = max_token_id(prefix)
    assert largest == OUT_OF_VOCAB_ID and "manifest describes another .bin" in source


def _must_not_read_the_largest_id(*args, **kwargs):
    raise AssertionError("the largest id was to come from elsewhere (the manifest, or rank 0)")


def test_chunked_scan_finds_the_largest_id(tiny_dataset):
    header = read_index_header(tiny_dataset["prefix"])
    tokens = np.fromfile(tiny_dataset["prefix"] + ".bin", dtype=np.uint16)
    assert scan_max_token_id(tiny_dataset["prefix"], header, chunk_tokens=7777) == int(tokens.max())


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


def _overwrite_start(path, data: bytes):
    with open(path, "r+b") as f:
        f.write(data)


DAMAGES = {
    "empty .idx": (".idx", lambda p: _truncate(p, 0), r"\.idx is empty"),
    "truncated .idx": (".idx", lambda p: _truncate(p, 1000), r"\.idx is truncated or damaged"),
    "empty .bin": (".bin", lambda p: _truncate(p, 0), r"\.bin is truncated: 0 bytes"),
    "truncated .bin": (".bin", lambda p: _truncate(p, 5000), r"\.bin is truncated: 5000 bytes"),
    "longer .bin": (".bin", lambda p: _append(p, b"\0\0"), r"\.bin is longer than its index says"),
    "bad magic": (".idx", lambda p: _overwrite_start(p, b"NOTANIDX!"), r"not a Megatron indexed dataset"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_files_are_named(tiny_dataset, tmp_path, damage):
    ext, damage_file, message = DAMAGES[damage]
    prefix = _copy(tiny_dataset, tmp_path, manifest=False)
    damage_file(prefix + ext)
    cfg = _config(tiny_dataset, prefix)
    with pytest.raises(ConfigError, match=message) as err:
        check_datasets(cfg, load_tokenizer(cfg))
    assert prefix + ext in str(err.value)


def test_split_without_training_data_is_refused(tiny_dataset):
    cfg = _config(tiny_dataset, tiny_dataset["prefix"], split="0,100,0")
    with pytest.raises(ConfigError, match="--split 0,100,0: the training share"):
        build_datasets(cfg, load_tokenizer(cfg), seq_length=32, seed=1, num_samples=(10, 2, 0))


def _build_at_tp2(prefix: str, tokenizer_model: str) -> str:
    """On each rank of a TP=2 world: build the datasets, as training does; only rank 0 may read
    the data's largest id, the other learns the verdict from it."""
    import torch

    import pretrain.data
    from pretrain.distributed import init_distributed

    init_distributed(2, 1)
    if torch.distributed.get_rank() != 0:
        pretrain.data.max_token_id = _must_not_read_the_largest_id
    cfg = DataConfig(data_path=[prefix], tokenizer_model=tokenizer_model, split="98,2,0")
    try:
        build_datasets(cfg, load_tokenizer(cfg), seq_length=32, seed=1, num_samples=(10, 2, 0))
    except ConfigError as err:
        return str(err)
    return "accepted"


def test_ids_outside_the_vocabulary_are_refused_by_every_rank_at_tp2(tiny_dataset, tmp_path):
    prefix = _with_out_of_vocab_id(tiny_dataset, tmp_path)
    messages = run_distributed(_build_at_tp2, 2, prefix, tiny_dataset["tokenizer"], timeout=120)
    assert messages[0] == messages[1] and f"largest token id is {OUT_OF_VOCAB_ID}" in messages[0]
