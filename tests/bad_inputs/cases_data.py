"""Bad data: datasets of another vocabulary, empty or truncated ``.bin``/``.idx``, a split without
training data, inputs without documents (training, evaluation, inspection and data preparation)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tests.bad_inputs.harness import BadInput, Fixtures, python, tool

OUT_OF_VOCAB_ID = 1500  # the fixtures' tokenizer has 1000 ids


def _dataset_copy(case_dir: Path, f: Fixtures) -> str:
    """The fixture dataset's .bin/.idx (no manifest) under the case's folder."""
    prefix = str(case_dir / "data_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(f.dataset + ext, prefix + ext)
    return prefix


def _other_vocabulary(case_dir: Path, f: Fixtures) -> str:
    prefix = _dataset_copy(case_dir, f)
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = OUT_OF_VOCAB_ID
    tokens.flush()
    return prefix


def _truncated(case_dir: Path, f: Fixtures, ext: str, size: int) -> str:
    prefix = _dataset_copy(case_dir, f)
    with open(prefix + ext, "r+b") as file:
        file.truncate(size)
    return prefix


def _train(f: Fixtures, data: str, split: str = "98,2,0") -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", data,
                  "--tokenizer-model", f.tokenizer, "--split", split, "--micro-batch-size", "2",
                  "--global-batch-size", "2", "--train-iters", "2")


def _evaluate(f: Fixtures, data: str) -> list[str]:
    return tool("evaluate.py", "--load", f.checkpoint, "--data-path", data, "--seq-length", "32",
                "--max-samples", "4")


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _with_manifest(case_dir: Path, f: Fixtures, name: str, **changes) -> str:
    """The fixture dataset with its manifest under ``name``, some manifest fields changed."""
    import json

    prefix = str(case_dir / name)
    for ext in (".bin", ".idx"):
        shutil.copy(f.dataset + ext, prefix + ext)
    with open(f.dataset + ".json") as src:
        manifest = json.load(src)
    manifest.update(changes)
    _write(Path(prefix + ".json"), json.dumps(manifest))
    return prefix


def _merge_other_tokenizer(d: Path, f: Fixtures) -> list[str]:
    a = _with_manifest(d, f, "a")
    b = _with_manifest(d, f, "b", tokenizer_model_sha256="0" * 64)
    return tool("merge_datasets.py", "--input", a, b, "--output-prefix", str(d / "out"))


def _merge_into_existing(d: Path, f: Fixtures) -> list[str]:
    a = _with_manifest(d, f, "a")
    _write(d / "out.bin", "an earlier dataset")
    return tool("merge_datasets.py", "--input", a, "--output-prefix", str(d / "out"))


def _shard_list_with_missing_file(d: Path, f: Fixtures) -> list[str]:
    listing = _write(d / "inputs.txt", f"{f.corpus}\n{d / 'missing.jsonl'}\n")
    return ["env", f"INPUT_LIST={listing}", f"OUTPUT_PREFIX={d / 'out'}", f"TOKENIZER_MODEL={f.tokenizer}",
            f"PYTHON={python()[0]}", "bash", "slurm/preprocess.sbatch"]


def _train_with(f: Fixtures, *data_flags: str) -> list[str]:
    """A training command whose data is given by ``data_flags`` alone."""
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32", *data_flags, "--tokenizer-model",
                  f.tokenizer, "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2")


def _per_split_json(d: Path, f: Fixtures) -> str:
    import json

    return _write(d / "splits.json", json.dumps({"train": [f.dataset], "valid": ["1", f.dataset, "0", f.dataset]}))


_WEIGHT = r"weight {w} of .*: a weight must be a number > 0; leave the dataset out of the blend"

CASES = [
    BadInput("data-merge-different-tokenizers", _merge_other_tokenizer,
             message=r"b was made with another tokenizer than .*a .*Preprocess them with one tokenizer",
             leftovers=("out.bin", "out.idx", "out.json")),
    BadInput("data-merge-output-exists", _merge_into_existing,
             message=r"--output-prefix .*out: .*out\.bin exists; pass --overwrite to replace it",
             leftovers=("out.idx", "out.json")),
    BadInput("data-preprocess-array-missing-input", _shard_list_with_missing_file,
             message=r"input .*missing\.jsonl: no such file .*\n.*nothing was submitted",
             leftovers=("out.shards",)),
    BadInput("data-train-ids-outside-vocabulary",
             lambda d, f: _train(f, _other_vocabulary(d, f)),
             message=rf"data_text_document: its largest token id is {OUT_OF_VOCAB_ID} .*\(1000 ids"),
    BadInput("data-train-split-without-training-data",
             lambda d, f: _train(f, f.dataset, split="0,100,0"),
             message=r"--split 0,100,0: the training share \(the first number\) is 0"),
    BadInput("data-train-truncated-bin",
             lambda d, f: _train(f, _truncated(d, f, ".bin", 4096)),
             message=r"data_text_document\.bin is truncated: 4096 bytes"),
    BadInput("data-evaluate-ids-outside-vocabulary",
             lambda d, f: _evaluate(f, _other_vocabulary(d, f)),
             message=rf"data_text_document: its largest token id is {OUT_OF_VOCAB_ID} "),
    BadInput("data-evaluate-empty-idx",
             lambda d, f: _evaluate(f, _truncated(d, f, ".idx", 0)),
             message=r"data_text_document\.idx is empty"),
    BadInput("data-inspect-truncated-idx",
             lambda d, f: tool("inspect_dataset.py", _truncated(d, f, ".idx", 100)),
             message=r"data_text_document\.idx is truncated or damaged"),
    BadInput("data-preprocess-empty-jsonl",
             lambda d, f: tool("preprocess_data.py", "--input", _write(d / "empty.jsonl", ""),
                               "--output-prefix", str(d / "out"), "--tokenizer-type",
                               "GPTSentencePieceTokenizer", "--tokenizer-model", f.tokenizer),
             message=r"--input .*empty\.jsonl: it holds no documents",
             leftovers=("out_text_document.bin", "out_text_document.idx", "out_text_document.json")),
    BadInput("data-tokenizer-input-without-text",
             lambda d, f: python("-m", "data_prep.train_tokenizer", "--input",
                                 _write(d / "blank.jsonl", "\n\n"), "--output", str(d / "tok")),
             message=r"--input .*blank\.jsonl: no text to train on", leftovers=("tok.model", "tok.vocab")),
    BadInput("data-corpus-empty-text-dir",
             lambda d, f: python("-m", "data_prep.build_corpus", "--text-dir", str(d),
                                 "--output", str(d / "out" / "corpus.jsonl")),
             message=r"--text-dir .*: no document found", leftovers=("out/corpus.jsonl",)),
    BadInput("data-corpus-debian-docs-not-fetched",
             lambda d, f: python("-m", "data_prep.build_corpus", "--source", "debian-docs",
                                 "--debian-docs-dir", str(d / "no-cache"),
                                 "--output", str(d / "out" / "big.jsonl")),
             message=r"needs 23 Debian package\(s\) not unpacked in .*no-cache: linux-doc-6\.1 [\s\S]*"
                     r"Add --fetch-packages", leftovers=("out/big.jsonl",)),
    # issue 31 item 7: a weight of 0 hung megatron-core's blend forever; every blend input is checked
    BadInput("data-blend-zero-weight",
             lambda d, f: _train_with(f, "--data-path", "0", f.dataset, "1", f.dataset),
             message=r"--data-path: " + _WEIGHT.format(w="0"), timeout=60),
    BadInput("data-blend-infinite-weight",
             lambda d, f: _train_with(f, "--data-path", "inf", f.dataset, "1", f.dataset),
             message=r"--data-path: " + _WEIGHT.format(w="inf"), timeout=60),
    BadInput("data-blend-negative-weight-in-data-args-path",
             lambda d, f: _train_with(f, "--data-args-path",
                                      _write(d / "blend.txt", f"1 {f.dataset}\n-0.5 {f.dataset}\n")),
             message=r"--data-args-path .*blend\.txt: " + _WEIGHT.format(w="-0.5"), timeout=60),
    BadInput("data-blend-zero-weight-train-data-path",
             lambda d, f: _train_with(f, "--train-data-path", "1", f.dataset, "0.0", f.dataset),
             message=r"--train-data-path: " + _WEIGHT.format(w="0.0"), timeout=60),
    BadInput("data-blend-zero-weight-per-split-json",
             lambda d, f: _train_with(f, "--per-split-data-args-path", _per_split_json(d, f)),
             message=r"--per-split-data-args-path .*splits\.json 'valid': " + _WEIGHT.format(w="0"), timeout=60),
    BadInput("data-blend-zero-weight-test-data-path",
             lambda d, f: _train_with(f, "--data-path", f.dataset, "--test-data-path", "0", _dataset_copy(d, f), "1",
                                      _dataset_copy(d, f)),
             message=r"--test-data-path: " + _WEIGHT.format(w="0"), timeout=60),
    BadInput("data-blend-zero-weight-evaluate",
             lambda d, f: tool("evaluate.py", "--load", f.checkpoint, "--data-path", "0", f.dataset, "1",
                               f.dataset, "--seq-length", "32", "--max-samples", "4"),
             message=r"--data-path: " + _WEIGHT.format(w="0"), timeout=60),
]
