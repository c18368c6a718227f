"""Bad input to corpus building and tokenizer training: a message naming the input, and nothing
left under the output's names (issue 12: empty inputs, a read-only or full output folder)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from data_prep.build_corpus import main as build_corpus_main
from data_prep.train_tokenizer import train_tokenizer


@pytest.mark.parametrize("content", ["", '{"text": "   "}\n\n'], ids=["empty", "blank-text"])
def test_tokenizer_training_on_input_without_text(tmp_path, content):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(content)
    with pytest.raises(SystemExit, match=f"--input {corpus}: no text to train on"):
        train_tokenizer([str(corpus)], str(tmp_path / "tok"), vocab_size=300, num_threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def _text_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_build_corpus_from_a_folder_without_text_writes_nothing(tmp_path, capsys):
    folder = _text_dir(tmp_path, {"notes.md": b"not a .txt file", "blank.txt": b"\n  \n"})
    out = tmp_path / "corpus.jsonl"
    out.write_text('{"text": "an earlier corpus"}\n')
    with pytest.raises(SystemExit) as exit_info:
        build_corpus_main(["--text-dir", str(folder), "--output", str(out)])
    assert exit_info.value.code == 1
    assert f"--text-dir {folder}: no document found" in capsys.readouterr().err
    assert out.read_text() == '{"text": "an earlier corpus"}\n', "the earlier output must stay"
    assert not (tmp_path / "corpus.jsonl.tmp").exists()


def test_build_corpus_error_while_writing_leaves_nothing(tmp_path):
    folder = _text_dir(tmp_path, {"a.txt": b"fine text", "b.txt": b"\xff\xfe"})
    out = tmp_path / "corpus.jsonl"
    with pytest.raises(SystemExit, match="not valid UTF-8"):
        build_corpus_main(["--text-dir", str(folder), "--output", str(out)])
    assert not out.exists() and not (tmp_path / "corpus.jsonl.tmp").exists()


@contextlib.contextmanager
def _small_tmpfs(folder: Path, options: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("options,reason", [("size=16k", "No space left on device"),
                                            ("size=16k,ro", "Read-only file system")],
                         ids=["full", "read-only"])
def test_build_corpus_into_a_full_or_read_only_folder(tmp_path, capsys, options, reason):
    folder = _text_dir(tmp_path, {"big.txt": b"Some text that fills the disk.\n" * 4000})
    with _small_tmpfs(tmp_path / "disk", options) as disk:
        with pytest.raises(SystemExit, match=f"--output {disk / 'corpus.jsonl'}: cannot write it \\({reason}\\)"):
            build_corpus_main(["--text-dir", str(folder), "--output", str(disk / "corpus.jsonl")])
        assert list(disk.iterdir()) == [], "nothing may be left on the disk"


def test_preprocessing_into_a_full_folder(tiny_dataset, tmp_path):
    from data_prep.preprocess import PreprocessError, preprocess

    with _small_tmpfs(tmp_path / "disk", "size=64k") as disk:
        with pytest.raises(PreprocessError, match=r"cannot write the dataset \(No space left on device\)"):
            preprocess([tiny_dataset["corpus"]], str(disk / "out"), "GPTSentencePieceTokenizer",
                       tiny_dataset["tokenizer"], workers=0, progress=False)
        assert list(disk.iterdir()) == [], "nothing may be left on the disk"
