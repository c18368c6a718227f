"""Preprocessing throughput: ours vs a Megatron-LM-style one-document-per-task pool encoder.

Megatron-LM's tools/preprocess_data.py does ``pool.imap(encoder.encode, fin, 32)``: each task
parses and encodes one JSON line, the main process adds documents to an IndexedDatasetBuilder one
by one. The reference below does the same with the same tokenizer and writer, so the ratio
measures the pipeline, not the tokenizer. Both run in this process's interpreter, same workers.

    python bench/preprocess.py [--repeat 4] [--workers 1 2] [--megatron-lm CHECKOUT]

``--megatron-lm`` also runs Megatron-LM's own script from a checkout at the installed
megatron-core's tag (core_v0.16.1; its megatron.training imports triton: give a folder holding it
with ``--megatron-lm-pythonpath``, e.g. ``pip install --no-deps --target /tmp/tritonlib triton``).
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
    from data_prep.preprocess import preprocess

    start = time.time()
    s = preprocess([corpus], out_prefix, "GPTSentencePieceTokenizer", model, append_eod=True,
                   workers=workers, progress=False)
    return {"seconds": time.time() - start, "docs": s.documents, "tokens": s.tokens, "bytes": s.bytes}


def megatron_lm(checkout: str, pythonpath: list[str], corpus: str, model: str, out_prefix: str, workers: int,
                counts: dict) -> dict:
    """Megatron-LM's own tools/preprocess_data.py from a checkout, as a subprocess; its import
    time (torch, megatron.training: measured apart) is taken off, so that the rates compare the
    pipelines and not the start-up."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, *pythonpath]), "OMP_NUM_THREADS": "1"}
    script = os.path.join(checkout, "tools", "preprocess_data.py")
    start = time.time()  # --help: its imports and argument parser, no work
    subprocess.run([sys.executable, script, "--help"], env=env, check=True, capture_output=True)
    startup = time.time() - start
    start = time.time()
    run = subprocess.run([sys.executable, script, "--input", corpus,
                          "--output-prefix", out_prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
                          "--tokenizer-model", model, "--workers", str(workers), "--append-eod",
                          "--log-interval", "100000000"], env=env, capture_output=True, text=True)
    wall = time.time() - start
    if not os.path.exists(out_prefix + "_text_document.idx"):
        raise SystemExit(f"Megatron-LM's preprocess_data.py failed:\n{run.stderr[-3000:]}")
    return {**counts, "seconds": max(wall - startup, 1e-3), "startup": startup}


def _fmt(r: dict) -> str:
    t = r["seconds"]
    return (f"{r['docs'] / t:10,.0f} docs/s {r['bytes'] / t / 1e6:7.2f} MB/s "
            f"{r['tokens'] / t:12,.0f} tokens/s ({t:.2f}s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=4, help="copies of the built-in corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--megatron-lm", help="a Megatron-LM checkout (of the installed megatron-core's version): "
                   "also time its own tools/preprocess_data.py")
    p.add_argument("--megatron-lm-pythonpath", nargs="*", default=[],
                   help="folders it needs on PYTHONPATH besides the checkout (e.g. a pip --target with triton)")
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
            if args.megatron_lm:
                real = megatron_lm(args.megatron_lm, args.megatron_lm_pythonpath, corpus, model,
                                   os.path.join(tmp, f"mlm{workers}"), workers, mine)
                same = all(open(os.path.join(tmp, f"mlm{workers}_text_document{e}"), "rb").read()
                           == open(os.path.join(tmp, f"ours{workers}_text_document{e}"), "rb").read()
                           for e in (".bin", ".idx"))
                print(f"workers={workers}  Megatron-LM:    {_fmt(real)} (+{real['startup']:.1f}s imports, not counted)")
                print(f"workers={workers}  speed-up vs Megatron-LM: {real['seconds'] / mine['seconds']:.2f}x; "
                      f"identical output: {same}")


if __name__ == "__main__":
    main()
