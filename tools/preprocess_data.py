"""JSONL -> Megatron indexed dataset (``{prefix}_{key}_document.bin/.idx``).

The command-line interface is Megatron-LM's ``tools/preprocess_data.py``; the output is
byte-identical to what megatron-core's ``IndexedDatasetBuilder`` writes (one sequence per
document), and the same whatever ``--workers`` is. Beside it goes a manifest
``{prefix}_{key}_document.json`` (``data_prep.indexed_dataset.DatasetManifest``), which training
and evaluation read to check the data against the model's tokenizer without scanning the ``.bin``. ``--partitions N`` encodes N
contiguous shares of the input in N processes and merges them (``data_prep.merge``): the same
files as one process.

The encoder, its output and its handling of bad input are described in ``data_prep/preprocess.py``
(``preprocess``, which tests and benchmarks call directly); this file is its command line.

Usage::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-model tok.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.preprocess import PreprocessError, preprocess, rates  # noqa: E402
from data_prep.tokenizers import TOKENIZER_TYPES, TokenizerError  # noqa: E402
from pretrain.config import ranged  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="JSONL -> Megatron indexed dataset (.bin/.idx)")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), optionally .gz; glob patterns are expanded")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed/empty/non-UTF-8 lines and report them, instead of stopping")
    g.add_argument("--split-sentences", action="store_true",
                   help="refused: sentence-level datasets are for BERT-style training (see the error)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: HuggingFaceTokenizer for a HF folder or tokenizer.json, else "
                        "GPTSentencePieceTokenizer (as the trainer infers it)")
    g.add_argument("--tokenizer-model", help="sentencepiece .model, or tokenizer.json / its folder")
    g.add_argument("--vocab-size", type=ranged(int, at_least=1), default=None, help="for NullTokenizer")
    g.add_argument("--eod-id", type=ranged(int, at_least=0), default=None, help="override the end-of-document id")
    g.add_argument("--append-eod", action="store_true", help="append the eod token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a dataset that exists under --output-prefix (refused otherwise)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="encoding processes (in all: with --partitions N, each partition gets workers // N)")
    g.add_argument("--partitions", type=int, default=1,
                   help="cut the input into N contiguous shares of about equal bytes (a .gz stays whole), "
                        "each read and written by its own process, then merged: for many cores, where "
                        "one reader/writer process cannot keep up. The output is the same as with 1")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="keep the input's document order with --partitions > 1 (Megatron-LM's flag). "
                        "Partitions here are contiguous shares, so the order is always kept; accepted "
                        "so that Megatron-LM command lines run unchanged")
    g.add_argument("--threads-per-worker", type=ranged(int, at_least=1), default=None,
                   help="sentencepiece encoding threads per worker (default: cores // workers)")
    g.add_argument("--chunk-bytes", type=ranged(int, at_least=1), default=1 << 20, help="input bytes per worker task")
    g.add_argument("--log-interval", type=ranged(int, at_least=0), default=10000,
                   help="documents between progress lines when stderr is not a terminal")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        print("error: --split-sentences is not supported: Megatron-LM splits with NLTK's punkt model, which "
              "it downloads at run time (nothing here downloads at run time), and writes sentence-level "
              "datasets (_sentence.bin/.idx) for BERT-style training; GPT pretraining uses whole documents. "
              "Drop the flag", file=sys.stderr)
        return 1
    existing = [f"{args.output_prefix}_{key}_document{ext}" for key in args.json_keys for ext in (".bin", ".idx")
                if os.path.exists(f"{args.output_prefix}_{key}_document{ext}")]
    if existing and not args.overwrite:
        print(f"error: --output-prefix {args.output_prefix}: {existing[0]} exists; add --overwrite to replace it "
              "(the new dataset replaces it only once complete), or give another prefix", file=sys.stderr)
        return 1
    try:
        summary = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            tuple(args.json_keys), args.append_eod, args.workers, args.vocab_size, args.eod_id,
            args.skip_bad_lines, args.chunk_bytes, args.log_interval,
            progress=False if args.no_progress else None,
            threads_per_worker=args.threads_per_worker, partitions=args.partitions,
        )
    except (PreprocessError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    elapsed = max(summary.seconds, 1e-9)
    print(f"done: {summary.documents} documents, {summary.tokens} tokens, "
          f"{summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f}s ({rates(summary, elapsed)})")
    if summary.blank_lines:
        print(f"blank lines ignored: {summary.blank_lines}")
    if summary.skipped:
        print(f"skipped lines: {sum(summary.skipped.values())}")
        for reason, count in summary.skipped.most_common():
            print(f"  {count:8d}  {reason}")
        for example in summary.first_skipped:
            print(f"  e.g. {example}")
    for prefix in summary.outputs:
        print(f"wrote {prefix}.bin, {prefix}.idx and {prefix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
