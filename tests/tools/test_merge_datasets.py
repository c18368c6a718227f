"""tools/merge_datasets.py and preprocess_data --partitions: the merge of per-file datasets is the
dataset of one run over all the files (byte for byte, manifest included), in constant memory;
bad merges are refused with nothing left under the final names."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import merge as merge_module
from data_prep.indexed_dataset import read_manifest
from data_prep.merge import MergeError, find_prefixes, merge_datasets
from data_prep.preprocess import PreprocessError, plan_partitions, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shards(tiny_dataset, tmp_path_factory):
    """The tiny corpus cut into 3 JSONL shards (one gzipped), each preprocessed on its own, and the
    one-pass dataset of all three."""
    root = tmp_path_factory.mktemp("shards")
    with open(tiny_dataset["corpus"], "rb") as f:
        lines = f.readlines()
    files = []
    for i, part in enumerate((lines[:250], lines[250:251], lines[251:])):
        path = root / (f"in{i}.jsonl.gz" if i == 2 else f"in{i}.jsonl")
        with (gzip.open(path, "wb") if i == 2 else open(path, "wb")) as out:
            out.writelines(part)
        files.append(str(path))
    os.makedirs(root / "out")
    for i, path in enumerate(files):
        preprocess([path], str(root / "out" / f"shard_{i:05d}"), None, tiny_dataset["tokenizer"], append_eod=True,
                   workers=0, progress=False)
    whole = preprocess(files, str(root / "whole"), None, tiny_dataset["tokenizer"], append_eod=True,
                       workers=0, progress=False)
    return {"root": root, "files": files, "whole": whole.outputs[0], "out": str(root / "out")}


def _files(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


def _manifest(prefix, drop=()):
    with open(prefix + ".json") as f:
        values = json.load(f)
    return {k: v for k, v in values.items() if k not in drop}


def test_merge_equals_one_pass_byte_for_byte(shards, tmp_path):
    out = str(tmp_path / "merged")
    summary = merge_datasets(find_prefixes([shards["out"]]), out)
    assert _files(out) == _files(shards["whole"])
    assert _manifest(out) == _manifest(shards["whole"])  # sources, counts, largest id, tokenizer
    assert summary.documents == 600 and summary.manifest.documents == 600
    manifest = read_manifest(out)
    assert [os.path.basename(s.path) for s in manifest.sources] == ["in0.jsonl", "in1.jsonl", "in2.jsonl.gz"]
    for source, path in zip(manifest.sources, shards["files"]):
        assert source.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert source.bytes == os.path.getsize(path)


def test_merge_is_streaming_in_small_blocks(shards, tmp_path, monkeypatch):
    """Blocks smaller than every input's index: the block loop, not one read, makes the output."""
    monkeypatch.setattr(merge_module, "BLOCK", 7)
    out = str(tmp_path / "merged")
    merge_datasets(find_prefixes([shards["out"]]), out)
    assert _files(out) == _files(shards["whole"])


def test_megatron_reads_the_merge_like_megatrons_own_merge(shards, tmp_path):
    import torch  # noqa: F401  (megatron-core's builder needs it)
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefixes = find_prefixes([shards["out"]])
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    merge_datasets(prefixes, str(tmp_path / "ours"))
    assert _files(str(tmp_path / "ours")) == _files(str(tmp_path / "ref"))
    assert len(IndexedDataset(str(tmp_path / "ours"))) == 600


def test_cli_with_prefixes_in_given_order_and_overwrite(shards, tmp_path):
    script = os.path.join(ROOT, "tools", "merge_datasets.py")
    prefixes = find_prefixes([shards["out"]])
    out = str(tmp_path / "rev")
    run = lambda *extra: subprocess.run([sys.executable, script, "--input", *prefixes[::-1], "--output-prefix", out,
                                         *extra], capture_output=True, text=True)
    ok = run()
    assert ok.returncode == 0 and "merged 3 datasets: 600 documents" in ok.stdout, ok.stderr
    first_doc_of_last_shard = np.fromfile(prefixes[2] + ".bin", np.uint16)[:5]
    assert np.array_equal(np.fromfile(out + ".bin", np.uint16)[:5], first_doc_of_last_shard)
    again = run()
    assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    assert run("--overwrite").returncode == 0


def _shard_copy(src_prefix, dst_prefix, **manifest_changes):
    for ext in (".bin", ".idx"):
        with open(src_prefix + ext, "rb") as f, open(dst_prefix + ext, "wb") as g:
            g.write(f.read())
    values = _manifest(src_prefix)
    values.update(manifest_changes)
    with open(dst_prefix + ".json", "w") as f:
        json.dump(values, f)


def test_bad_merges_are_refused_and_write_nothing(shards, tiny_dataset, tmp_path):
    a = find_prefixes([shards["out"]])[0]
    other_tok = str(tmp_path / "other_tok")
    _shard_copy(a, other_tok, tokenizer_model_sha256="0" * 64)
    out = str(tmp_path / "out")
    with pytest.raises(MergeError, match="another tokenizer"):
        merge_datasets([a, other_tok], out)
    # a dataset of another dtype (an int32 vocabulary)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"text": "1 2 3"}\n')
    wide = preprocess([str(ids)], str(tmp_path / "wide"), "NullTokenizer", vocab_size=70000, workers=0,
                      progress=False).outputs[0]
    with pytest.raises(MergeError, match="different token dtypes"):
        merge_datasets([a, wide], out)
    with pytest.raises(MergeError, match="does not exist"):
        find_prefixes([a, str(tmp_path / "missing")])
    no_eod = str(tmp_path / "no_eod")
    _shard_copy(a, no_eod, append_eod=False)
    with pytest.raises(MergeError, match="--append-eod"):
        merge_datasets([a, no_eod], out)
    truncated = str(tmp_path / "trunc")
    _shard_copy(a, truncated)
    with open(truncated + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(MergeError, match="truncated"):
        merge_datasets([a, truncated], out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], "nothing may be written"


def test_a_trained_on_prefix_is_a_prefix_not_a_folder(shards, tmp_path):
    """Training leaves megatron-core's index cache in the folder PREFIX/ beside PREFIX.bin/.idx
    (issue 31 item 11): ``--input PREFIX`` still means the dataset."""
    from pretrain.config import DataConfig
    from pretrain.data import index_cache_folder

    a, b, _ = find_prefixes([shards["out"]])
    for prefix, name in ((a, "a"), (b, "b")):
        _shard_copy(prefix, str(tmp_path / name))
        cache = index_cache_folder(DataConfig(data_path=[str(tmp_path / name)]))  # where training puts it
        os.makedirs(cache)
        open(os.path.join(cache, "x-GPTDataset-train-document_index.npy"), "wb").close()
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert find_prefixes(inputs) == inputs
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_datasets.py"), "--input", *inputs,
                           "--output-prefix", str(tmp_path / "ab")], capture_output=True, text=True)
    assert done.returncode == 0 and os.path.exists(tmp_path / "ab.idx"), done.stderr
    # a folder of datasets that is also a prefix is ambiguous
    _shard_copy(a, str(tmp_path / "a" / "inner"))
    with pytest.raises(MergeError, match="both a dataset prefix .* and a folder of datasets"):
        find_prefixes([str(tmp_path / "a")])


def test_inputs_without_manifest_merge_without_one(shards, tmp_path):
    a, b, _ = find_prefixes([shards["out"]])
    for prefix, name in ((a, "a"), (b, "b")):
        for ext in (".bin", ".idx"):
            os.link(prefix + ext, str(tmp_path / name) + ext)
    os.link(a + ".json", str(tmp_path / "a.json"))
    summary = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert summary.manifest is None and "no manifest" in summary.note
    assert not os.path.exists(tmp_path / "m.json") and os.path.exists(tmp_path / "m.idx")


@pytest.mark.parametrize("partitions", [2, 3])
def test_partitions_give_the_one_pass_output(shards, tiny_dataset, tmp_path, partitions):
    """Contiguous shares of a plain file and a .gz; the manifest (sources hashed) is the same too."""
    out = str(tmp_path / "p")
    summary = preprocess(shards["files"], out, None, tiny_dataset["tokenizer"], append_eod=True,
                         workers=partitions, partitions=partitions, progress=False, chunk_bytes=5000)
    assert summary.documents == 600
    assert _files(summary.outputs[0]) == _files(shards["whole"])
    assert _manifest(summary.outputs[0]) == _manifest(shards["whole"])
    assert not [n for n in os.listdir(tmp_path) if "partitions" in n], "the partitions' folder is removed"


def test_plan_cuts_plain_files_at_line_boundaries(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": "x" * n}).encode() + b"\n" for n in range(1, 40)))
    plan = plan_partitions([str(path)], 4)
    data = path.read_bytes()
    pieces = [data[s.start:s.end] for share in plan for s in share]
    assert len(plan) == 4 and all(plan) and b"".join(pieces) == data
    assert all(p.endswith(b"\n") for p in pieces)


def test_partition_bad_line_names_the_file_line(tiny_dataset, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "A good line of text."}).encode() + b"\n"
    path.write_bytes(good * 30 + b"{oops\n" + good * 5)
    with pytest.raises(PreprocessError, match=f"{path}:31: malformed JSON"):
        preprocess([str(path)], str(tmp_path / "out"), None, tiny_dataset["tokenizer"], workers=2,
                   partitions=2, progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"], "nothing may remain"


def test_split_sentences_refused_and_tokenizer_type_inferred(tiny_dataset, tmp_path):
    script = os.path.join(ROOT, "tools", "preprocess_data.py")
    base = [sys.executable, script, "--input", tiny_dataset["corpus"], "--output-prefix", str(tmp_path / "o"),
            "--tokenizer-model", tiny_dataset["tokenizer"], "--workers", "0"]
    refused = subprocess.run(base + ["--split-sentences"], capture_output=True, text=True)
    assert refused.returncode == 1 and "--split-sentences is not supported" in refused.stderr
    assert "download" in refused.stderr and not os.path.exists(tmp_path / "o_text_document.bin")
    ok = subprocess.run(base + ["--partitions", "1", "--keep-sequential-samples"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert read_manifest(str(tmp_path / "o_text_document")).tokenizer_type == "GPTSentencePieceTokenizer"


def test_inspect_prints_the_manifest(shards, capsys):
    from tools.inspect_dataset import main as inspect_main

    assert inspect_main([shards["whole"], "--num-docs", "0"]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(shards["whole"])
    assert f"tokenizer: GPTSentencePieceTokenizer, vocabulary 1,000, sha256 {manifest.tokenizer_model_sha256}" in out
    assert "sources: 3 file(s)" in out and manifest.sources[2].sha256 in out and "in2.jsonl.gz" in out
    assert "bad lines skipped: 0" in out and "eod appended: yes" in out and "efficientllm-pretrain" in out
