"""The benchmarks' small corpus: the built-in documents, a tokenizer trained on the training part,
and both parts preprocessed (no download; deterministic)."""

from __future__ import annotations

import itertools
import json
import os


def build_tiny_corpus(root: str, train_documents: int, held_out_documents: int, vocab_size: int = 2000) -> dict:
    """The first ``train_documents`` built-in documents for training, the next ``held_out_documents``
    held out; returns the dataset prefixes ``train`` and ``held_out`` and the ``tokenizer`` model."""
    from data_prep.build_corpus import builtin_documents
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    docs = list(itertools.islice(builtin_documents(), train_documents + held_out_documents))
    paths = {}
    for name, part in (("train", docs[:train_documents]), ("held_out", docs[train_documents:])):
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in part)
    tokenizer = train_tokenizer([paths["train"]], os.path.join(root, "tok"), vocab_size=vocab_size, num_threads=1)
    out = {"tokenizer": tokenizer}
    for name in ("train", "held_out"):
        out[name] = preprocess([paths[name]], os.path.join(root, name), "GPTSentencePieceTokenizer", tokenizer,
                               append_eod=True, workers=0, progress=False).outputs[0]
    return out
