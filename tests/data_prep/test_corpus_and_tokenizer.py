import json

import pytest

from data_prep.build_corpus import builtin_documents, main as build_corpus_main, text_dir_documents
from data_prep.tokenizers import TokenizerError, build_tokenizer
from data_prep.train_tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer


def test_builtin_corpus_is_real_deduplicated_english():
    docs = []
    for doc in builtin_documents():
        docs.append(doc)
        if len(docs) == 400:
            break
    assert len(docs) == 400
    assert all(len(d["text"]) >= 200 for d in docs)
    texts = [d["text"] for d in docs]
    assert len(set(texts)) == len(texts)
    joined = " ".join(texts).lower()
    for word in (" the ", " and ", " is ", " of "):
        assert joined.count(word) > 100


def test_build_corpus_cli_and_text_dir(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("First paragraph.\n\nSecond paragraph here.")
    (folder / "b.txt").write_text("Another file.")
    out = tmp_path / "out.jsonl"
    build_corpus_main(["--text-dir", str(folder), "--output", str(out), "--split-paragraphs"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["First paragraph.", "Second paragraph here.", "Another file."]
    (folder / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(SystemExit, match="not valid UTF-8"):
        list(text_dir_documents(str(folder)))


def test_tokenizer_training_is_reproducible_with_documented_ids(tiny_corpus, tmp_path):
    a = train_tokenizer([tiny_corpus], str(tmp_path / "a" / "tok"), vocab_size=600, seed=3, num_threads=1)
    b = train_tokenizer([tiny_corpus], str(tmp_path / "b" / "tok"), vocab_size=600, seed=3, num_threads=1)
    assert open(a, "rb").read() == open(b, "rb").read()
    tok = build_tokenizer("GPTSentencePieceTokenizer", a)
    assert tok.vocab_size == 600 and tok.eod == EOS_ID == 2 and tok.bos == BOS_ID and tok.pad == PAD_ID
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a)
    assert sp.unk_id() == UNK_ID
    text = "Byte fallback handles anything: 日本語 🙂"
    ids = tok.tokenize(text)
    assert UNK_ID not in ids and tok.detokenize(ids) == text


def test_unknown_tokenizer_type():
    with pytest.raises(TokenizerError, match="not supported"):
        build_tokenizer("BertWordPieceLowerCase", "x")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
