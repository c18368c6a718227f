"""Preprocessing throughput: ours vs a Megatron-LM-style one-document-per-task pool encoder.

Megatron-LM's tools/preprocess_data.py does ``pool.imap(encoder.encode, fin, 32)``: each task
parses and encodes one JSON line, the main process adds documents to an IndexedDatasetBuilder one
by one. The reference below does the same with the same tokenizer and writer, so the ratio
measures the pipeline, not the tokenizer. Both run in this process's interpreter, same workers.

    python bench/preprocess.py [--repeat 4] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_sp = None


def _ref_init(model_path):
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _ref_encode(line):
    text = json.loads(line)["text"]
    ids = _sp.encode(text) + [_sp.eos_id()]
    return ids, len(line)


def megatron_style(corpus: str, model: str, out_prefix: str, workers: int) -> dict:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=np.uint16)
    docs = tokens = nbytes = 0
    with open(corpus, encoding="utf-8") as fin, multiprocessing.get_context("fork").Pool(
            workers, initializer=_ref_init, initargs=(model,)) as pool:
        for ids, n in pool.imap(_ref_encode, fin, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
            docs += 1
            tokens += len(ids)
            nbytes += n
    builder.finalize(out_prefix + ".idx")
    return {"seconds": time.time() - start, "docs": docs, "tokens": tokens, "bytes": nbytes}


def ours(corpus: str, model: str, out_prefix: str, workers: int) -> dict:
    from tools.preprocess_data import preprocess

    start = time.time()
    s = preprocess([corpus], out_prefix, "GPTSentencePieceTokenizer", model, append_eod=True,
                   workers=workers, progress=False)
    return {"seconds": time.time() - start, "docs": s.documents, "tokens": s.tokens, "bytes": s.bytes}


def _fmt(r: dict) -> str:
    t = r["seconds"]
    return (f"{r['docs'] / t:10,.0f} docs/s {r['bytes'] / t / 1e6:7.2f} MB/s "
            f"{r['tokens'] / t:12,.0f} tokens/s ({t:.2f}s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=4, help="copies of the built-in corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        subprocess.run([sys.executable, "-m", "data_prep.build_corpus", "--output", corpus,
                        "--repeat", str(args.repeat)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        from data_prep.train_tokenizer import train_tokenizer

        model = train_tokenizer([corpus], os.path.join(tmp, "tok"), vocab_size=args.vocab_size)
        print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB (built-in x{args.repeat}), vocab {args.vocab_size}")
        for workers in args.workers:
            ref = megatron_style(corpus, model, os.path.join(tmp, f"ref{workers}"), workers)
            mine = ours(corpus, model, os.path.join(tmp, f"ours{workers}"), workers)
            same = all(open(os.path.join(tmp, f"ref{workers}{e}"), "rb").read()
                       == open(os.path.join(tmp, f"ours{workers}_text_document{e}"), "rb").read()
                       for e in (".bin", ".idx"))
            print(f"workers={workers}  megatron-style: {_fmt(ref)}")
            print(f"workers={workers}  ours:           {_fmt(mine)}")
            print(f"workers={workers}  speed-up: {ref['seconds'] / mine['seconds']:.2f}x; "
                  f"identical output: {same}")


if __name__ == "__main__":
    main()
