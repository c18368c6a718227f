"""Shared fixtures: a tiny real-text corpus, its tokenizer and indexed dataset (made once)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    from data_prep.build_corpus import builtin_documents

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for doc in itertools.islice(builtin_documents(), 600):
            f.write(json.dumps(doc) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> str:
    from data_prep.train_tokenizer import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([tiny_corpus], str(prefix), vocab_size=1000, num_threads=1)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> dict:
    from data_prep.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "tiny")
    summary = preprocess([tiny_corpus], prefix, "GPTSentencePieceTokenizer", tiny_tokenizer,
                         append_eod=True, workers=0, progress=False)
    return {"prefix": summary.outputs[0], "tokenizer": tiny_tokenizer, "corpus": tiny_corpus}
