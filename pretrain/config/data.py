"""The data section: datasets and their blends (Megatron-LM's ``--data-path`` forms), the tokenizer."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

from pretrain.config.flags import flag, require
from pretrain.errors import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    cli_group: ClassVar[str] = "data"

    data_path: list[str] = flag(default_factory=list, help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    # left None by the command line, so that a --split beside per-split data is seen (and refused)
    split: str = flag("969,30,1", resolved_later=True, help="train,valid,test shares of --data-path "
                      "(default 969,30,1)")
    # the command line leaves both to the --load checkpoint's recorded tokenizer, else infers the
    # type from the model file (pretrain.run.arguments)
    tokenizer_type: str = flag(
        "GPTSentencePieceTokenizer", resolved_later=True,
        help="default: the --load checkpoint's, else HuggingFaceTokenizer for a HF folder or tokenizer.json, "
             "else GPTSentencePieceTokenizer")
    tokenizer_model: str | None = flag(
        None, resolved_later=True, help="a sentencepiece model, a HF tokenizer folder or a tokenizer.json; "
        "default: the tokenizer recorded in the --load checkpoint")
    vocab_size_for_null_tokenizer: int | None = flag(None, name="--null-vocab-size", at_least=1,
                                                     help="vocabulary of NullTokenizer")
    mock_data: bool = flag(False, help="synthetic data (no --data-path)")
    data_cache_path: str | None = flag(None)
    # Megatron-LM's --test-data-path: a separate held-out set (the --split test share is then
    # unused); evaluated on the same sequences at every evaluation, whatever the run's seed
    test_data_path: list[str] = flag(
        default_factory=list, help="a held-out test set (PREFIX, or weight/prefix pairs), evaluated with validation "
        "and at the end on the same sequences every time; the test share of --split is then unused")
    # Megatron-LM's per-split blends: training and validation data of their own, instead of
    # --data-path cut by --split
    train_data_path: list[str] = flag(default_factory=list, help="training data of its own (instead of --data-path "
                                      "and --split): PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    valid_data_path: list[str] = flag(default_factory=list, help="validation data of its own (with "
                                      "--train-data-path)")
    # megatron-core builds the index files of several datasets of a blend in parallel (rank 0 first)
    num_dataset_builder_threads: int = flag(1, help="threads building the datasets of a blend at start-up", at_least=1)

    def blend(self, flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
        """Megatron-LM's ``--data-path`` forms (``parse_blend``) of ``data_path``."""
        return parse_blend(self.data_path, flag)

    @property
    def per_split(self) -> bool:
        """Training (and validation) data given per split, not cut from --data-path by --split."""
        return bool(self.train_data_path)

    def training_blend(self) -> tuple[list[str], list[float] | None]:
        """What training reads: --train-data-path's blend, else --data-path's."""
        return parse_blend(self.train_data_path, "--train-data-path") if self.per_split else self.blend()

    def blend_per_split(self) -> list:
        """megatron-core's ``blend_per_split``: [train, valid, test] (the test set is built apart)."""
        valid = parse_blend(self.valid_data_path, "--valid-data-path") if self.valid_data_path else None
        return [self.training_blend(), valid, None]

    def all_prefixes(self) -> list[str]:
        """Every dataset training or validation reads (not --test-data-path)."""
        if not self.per_split:
            return self.blend()[0]
        valid = parse_blend(self.valid_data_path, "--valid-data-path")[0] if self.valid_data_path else []
        return self.training_blend()[0] + valid

    def test_data(self) -> "DataConfig":
        """The --test-data-path set as a dataset config of its own (all of it is test data)."""
        return dataclasses.replace(self, data_path=list(self.test_data_path), split="0,0,100", test_data_path=[],
                                   train_data_path=[], valid_data_path=[])

    def validate(self) -> None:
        require(self.num_dataset_builder_threads >= 1,
                 f"--num-dataset-builder-threads {self.num_dataset_builder_threads}: must be at least 1")
        if self.mock_data:
            return
        if self.per_split:
            require(not self.data_path, "--data-path and --train-data-path both give the training data: give "
                     "--data-path (cut by --split) or --train-data-path/--valid-data-path, not both")
        else:
            require(not self.valid_data_path, "--valid-data-path goes with --train-data-path (with --data-path, "
                     "--split cuts the validation data)")
            require(bool(self.data_path), "--data-path is required (or --train-data-path, or --mock-data for "
                     "synthetic data)")
        prefixes = self.all_prefixes()
        test_prefixes = parse_blend(self.test_data_path, "--test-data-path")[0] if self.test_data_path else []
        training_flag = "--train-data-path/--valid-data-path" if self.per_split else "--data-path"
        for flag, group in ((training_flag, prefixes), ("--test-data-path", test_prefixes)):
            for prefix in group:
                for ext in (".bin", ".idx"):
                    require(
                        os.path.isfile(prefix + ext),
                        f"{flag}: {prefix + ext} does not exist; build it with "
                        "tools/preprocess_data.py (give the prefix without .bin/.idx)",
                    )
        shared = {os.path.realpath(p) for p in prefixes} & {os.path.realpath(p) for p in test_prefixes}
        require(not shared, f"--test-data-path {' '.join(sorted(shared))} is also in {training_flag}: a test "
                 "set must be data that training never reads")
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {self.split!r}: expected numbers like 969,30,1") from None
        require(len(values) <= 3 and sum(values) > 0 and min(values) >= 0,
                 f"--split {self.split!r}: up to three non-negative numbers, not all zero")
        if self.tokenizer_type != "NullTokenizer":
            require(bool(self.tokenizer_model), f"--tokenizer-model is required for {self.tokenizer_type}")
            require(os.path.exists(self.tokenizer_model or ""),
                     f"--tokenizer-model {self.tokenizer_model!r} does not exist")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(items: list[str], flag: str) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path`` forms: ``PREFIX``, ``W1 PREFIX1 W2 PREFIX2 ...``, or
    ``PREFIX1 PREFIX2 ...`` (no weights: each dataset once, weighted by its size). Every weight
    must be a finite number > 0: megatron-core's blend never finishes sampling a dataset of weight
    0 (``_get_num_epochs`` loops forever), and a negative one has no meaning."""
    if len(items) == 1:
        return [items[0]], None
    if not any(_is_number(item) for item in items):
        return list(items), None
    require(len(items) % 2 == 0, f"{flag} takes one prefix, or weight/prefix pairs: W1 PREFIX1 W2 PREFIX2 ...")
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} is not a weight (pairs are W PREFIX)") from None
        require(math.isfinite(weights[-1]) and weights[-1] > 0,
                 f"{flag}: weight {weight} of {prefix}: a weight must be a number > 0; leave the dataset out of "
                 "the blend to not train on it")
        prefixes.append(prefix)
    return prefixes, weights


def read_data_args(path: str) -> list[str]:
    """Megatron-LM's ``--data-args-path``: a file holding what ``--data-path`` would (weights and
    prefixes separated by any whitespace, e.g. one ``W PREFIX`` a line), for blends too long for a
    command line."""
    try:
        with open(path) as f:
            items = f.read().split()
    except OSError as err:
        raise ConfigError(f"--data-args-path {path}: cannot read it ({err.strerror or err})") from None
    require(bool(items), f"--data-args-path {path}: the file is empty; list 'W PREFIX' pairs or prefixes in it")
    parse_blend(items, f"--data-args-path {path}")  # its own name in the message, not --data-path's
    return items
