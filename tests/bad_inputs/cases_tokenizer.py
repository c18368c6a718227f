"""Another tokenizer of the same vocabulary size (issue 31 item 5): one tokenizer-identity rule (the
data manifest's and the checkpoint's sha256, ``pretrain.data.tokenizer_identity_problem``) and one
message at every entry point: training with --load, evaluation, the distillation teacher, the HF
export and the comparison tool."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bad_inputs.harness import BadInput, Fixtures, python, tool

# the fixture checkpoint was trained with the fixtures' sentencepiece model (1000 tokens)
_CHECKPOINT_OF_ANOTHER = (r"--(load|kd-teacher) .*iter_\d+: the checkpoint was trained with another tokenizer "
                          r"file \(sha256 .*\), not with the tokenizer .*same_size/tokenizer\.json \(1000 tokens\)")


def _same_size_tokenizer(d: Path) -> str:
    """A word-level tokenizer of 1000 tokens: the fixtures' vocabulary size, other tokens."""
    folder = d / "same_size"
    folder.mkdir()
    words = {f"w{i}": i for i in range(999)} | {"</s>": 999}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}}))
    return str(folder)


def _data_of(d: Path, f: Fixtures, tokenizer: str) -> str:
    """The fixture dataset, its manifest saying ``tokenizer`` made it (data the user made with it)."""
    import shutil

    from data_prep.indexed_dataset import file_sha256

    prefix = str(d / "other_data")
    for ext in (".bin", ".idx"):
        shutil.copy(f.dataset + ext, prefix + ext)
    manifest = json.loads(Path(f.dataset + ".json").read_text())
    manifest["tokenizer_model_sha256"] = file_sha256(f"{tokenizer}/tokenizer.json")
    Path(prefix + ".json").write_text(json.dumps(manifest))
    return prefix


def _train(d: Path, f: Fixtures, *extra: str) -> list[str]:
    tokenizer = _same_size_tokenizer(d)
    return python("-m", "pretrain", "--data-path", _data_of(d, f, tokenizer), "--tokenizer-model", tokenizer,
                  "--split", "98,2,0", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
                  "--train-iters", "4", "--save", str(d / "run"), *extra)


def _evaluate(d: Path, f: Fixtures) -> list[str]:
    tokenizer = _same_size_tokenizer(d)
    return tool("evaluate.py", "--load", f.checkpoint, "--data-path", _data_of(d, f, tokenizer),
                "--tokenizer-model", tokenizer, "--seq-length", "32", "--max-samples", "4")


def _compare(d: Path, f: Fixtures) -> list[str]:
    import shutil

    held_out = str(d / "held_out")  # a test set of its own prefix (the bytes are not what is checked first)
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f.dataset + ext, held_out + ext)
    return tool("compare_baselines.py", "--recipe", "cpu-tiny", "--data-path", f.dataset, "--test-data-path",
                held_out, "--tokenizer-model", _same_size_tokenizer(d), "--out", str(d / "cmp"), "--dry-run")


CASES = [
    BadInput("tokenizer-train-load-same-size-other", lambda d, f: _train(d, f, "--load", f.checkpoint),
             message=_CHECKPOINT_OF_ANOTHER, leftovers=("run",)),
    BadInput("tokenizer-evaluate-same-size-other", _evaluate, message=_CHECKPOINT_OF_ANOTHER),
    BadInput("tokenizer-kd-teacher-same-size-other",
             lambda d, f: _train(d, f, "--model", "debug", "--kd-teacher", f.checkpoint),
             message=_CHECKPOINT_OF_ANOTHER, leftovers=("run",)),
    BadInput("tokenizer-export-same-size-other",
             lambda d, f: tool("convert_to_hf.py", "--load", f.checkpoint, "--save", str(d / "hf"),
                               "--tokenizer-model", _same_size_tokenizer(d)),
             message=r"--load .*iter_\d+: the checkpoint was trained with another tokenizer file \(sha256",
             leftovers=("hf", "hf.tmp")),
    BadInput("tokenizer-compare-data-of-another",
             _compare, message=r"--data-path .*: the data was made with another tokenizer file \(sha256 .*not with "
                               r"the tokenizer .*same_size/tokenizer\.json \(1000 tokens\)", leftovers=("cmp",)),
]
