"""Data at scale on the trainer's side (issue 18): a tokenizer that disagrees with the data's
manifest stops the run before any process group exists; --data-args-path; the log's token counts
and epochs per blend component."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tokenizer_mismatch_stops_before_the_process_group(tiny_dataset, tmp_path):
    """Rank 0 of a world of 2 whose rank 1 never comes: the group would wait for it; the manifest
    check must answer first."""
    import json

    words = {f"w{i}": i for i in range(999)} | {"</s>": 999}
    folder = tmp_path / "other_tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}}))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "pretrain", "--model", "debug", "--seq-length", "64",
                        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
                        "--data-path", tiny_dataset["prefix"], "--tokenizer-model", str(folder), "--split", "98,2,0"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "made with another tokenizer file (sha256" in r.stdout + r.stderr, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr


def test_data_args_path_reads_the_blend_from_a_file(tiny_dataset, tmp_path):
    from pretrain.run.arguments import build_parser, config_from_args

    listing = tmp_path / "blend.txt"
    listing.write_text(f"0.3 {tiny_dataset['prefix']}\n0.7 {tiny_dataset['prefix']}\n")
    base = ["--model", "debug", "--train-iters", "2", "--tokenizer-model", tiny_dataset["tokenizer"]]
    cfg = config_from_args(build_parser().parse_args(base + ["--data-args-path", str(listing)]))
    assert cfg.data.blend() == ([tiny_dataset["prefix"]] * 2, [0.3, 0.7])
    with pytest.raises(ConfigError, match="--data-path and --data-args-path both"):
        config_from_args(build_parser().parse_args(base + ["--data-args-path", str(listing), "--data-path", "x"]))
    with pytest.raises(ConfigError, match="--data-args-path .*missing.txt: cannot read it"):
        config_from_args(build_parser().parse_args(base + ["--data-args-path", str(tmp_path / "missing.txt")]))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        config_from_args(build_parser().parse_args(base + ["--data-args-path", str(tmp_path / "empty.txt")]))


def test_prefixes_without_weights_are_megatrons_size_weighted_blend(tiny_dataset):
    assert DataConfig(data_path=["a", "b"]).blend() == (["a", "b"], None)
    assert DataConfig(data_path=["a", "b", "c"]).blend() == (["a", "b", "c"], None)
    with pytest.raises(ConfigError, match="not a weight"):
        DataConfig(data_path=["1", "a", "b", "c"]).blend()


def test_blend_report_counts_tokens_and_warns_on_repeats(tiny_dataset, tmp_path):
    from pretrain.data import blend_report

    other = str(tmp_path / "no_manifest")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_dataset["prefix"] + ext, other + ext)
    tokens = os.path.getsize(other + ".bin") // 2
    data = DataConfig(data_path=["0.9", tiny_dataset["prefix"], "0.1", other], split="100,0,0")
    # draw exactly the dataset's size: the 0.9 component repeats ~1.8 times, the other ~0.2
    lines = blend_report(data, train_samples=2 * tokens // 64, seq_length=64)
    text = "\n".join(lines)
    assert f"2 dataset(s), {2 * tokens:,} tokens" in lines[0]
    assert f"{tiny_dataset['prefix']}: {tokens:,} tokens, weight 0.9000, ~1.80 epochs" in text
    assert f"{other}: {tokens:,} tokens, weight 0.1000, ~0.20 epochs" in text
    assert "WARNING: 1 blend component(s) will be seen more than once" in text
    assert "WARNING" not in "\n".join(blend_report(data, train_samples=tokens // 64, seq_length=64))


def test_per_split_data_trains_on_all_of_its_training_set(tiny_dataset, tmp_path):
    """--per-split-data-args-path (Megatron-LM's): training and validation data of their own,
    no --split; the same flags one by one; bad combinations refused with the flag named."""
    import dataclasses
    import json

    import torch

    from pretrain.run.arguments import build_parser, config_from_args
    from pretrain.data import build_datasets, load_tokenizer
    from data_prep.preprocess import preprocess

    test_jsonl = tmp_path / "held.jsonl"
    test_jsonl.write_text("".join(json.dumps({"text": f"held out document number {i} " * 20}) + "\n"
                                  for i in range(20)))
    test = preprocess([str(test_jsonl)], str(tmp_path / "held"), "GPTSentencePieceTokenizer",
                      tiny_dataset["tokenizer"], append_eod=True, workers=0, progress=False).outputs[0]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [tiny_dataset["prefix"]], "valid": ["1.0", tiny_dataset["prefix"]],
                                  "test": [test]}))
    base = ["--model", "debug", "--train-iters", "2", "--tokenizer-model", tiny_dataset["tokenizer"]]
    cfg = config_from_args(build_parser().parse_args(base + ["--per-split-data-args-path", str(splits)]))
    flags = config_from_args(build_parser().parse_args(
        base + ["--train-data-path", tiny_dataset["prefix"], "--valid-data-path", "1.0", tiny_dataset["prefix"],
                "--test-data-path", test]))
    assert cfg.data == flags.data and cfg.data.per_split and cfg.data.data_path == []
    cfg.data.validate()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        train, valid, _ = build_datasets(cfg.data, load_tokenizer(cfg.data), 32, 1, (40, 8, 0))
        split = build_datasets(dataclasses.replace(cfg.data, train_data_path=[], valid_data_path=[],
                                                   data_path=[tiny_dataset["prefix"]], split="50,50,0"),
                               load_tokenizer(cfg.data), 32, 1, (40, 8, 0))[0]
    finally:
        torch.distributed.destroy_process_group()
    # every document trains (no --split share held back), and validation reads its own set
    assert len(train.indices) == 2 * len(split.indices) and valid is not None
    with pytest.raises(ConfigError, match="gives the data of every split: drop --data-path"):
        config_from_args(build_parser().parse_args(
            base + ["--per-split-data-args-path", str(splits), "--data-path", tiny_dataset["prefix"]]))
    splits.write_text(json.dumps({"valid": [tiny_dataset["prefix"]]}))
    with pytest.raises(ConfigError, match='non-empty "train" list'):
        config_from_args(build_parser().parse_args(base + ["--per-split-data-args-path", str(splits)]))
    both = config_from_args(build_parser().parse_args(
        base + ["--train-data-path", tiny_dataset["prefix"], "--data-path", tiny_dataset["prefix"]]))
    with pytest.raises(ConfigError, match="--data-path and --train-data-path both"):
        both.data.validate()
