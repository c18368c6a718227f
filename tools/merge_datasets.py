"""Merge Megatron indexed datasets into one (Megatron-LM's ``tools/merge_datasets.py`` interface).

``--input`` takes a folder (every ``NAME.bin``/``NAME.idx`` in it, in name order, as Megatron-LM
does) or dataset prefixes (in the order given), or several of them. Streaming (constant memory),
the output written under temporary names and renamed when complete; the inputs' manifests are
checked (dtype, tokenizer) and merged into ``OUT.json``. The output is byte-identical to
preprocessing the inputs' source files in one run (``tools/preprocess_data.py --input a b c``).

Usage::

    python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.merge import MergeError, find_prefixes, merge_datasets  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="a folder holding the datasets to merge (merged in name order), or dataset prefixes "
                        "(merged in the order given)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx/.json")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    g = p.add_argument_group("miscellaneous")
    g.add_argument("--multimodal", action="store_true",
                   help="the datasets are multimodal (a mode byte per sequence)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        prefixes = find_prefixes(args.input, exclude=args.output_prefix)
        summary = merge_datasets(prefixes, args.output_prefix, overwrite=args.overwrite,
                                 multimodal=args.multimodal)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    seconds = max(time.time() - start, 1e-9)
    print(f"merged {summary.inputs} datasets: {summary.documents:,} documents, {summary.tokens:,} tokens, "
          f"{summary.bytes / 1e6:.1f} MB in {seconds:.2f}s ({summary.bytes / seconds / 1e6:.0f} MB/s)")
    if summary.note:
        print(f"manifest: {summary.note}")
    print(f"wrote {args.output_prefix}.bin, {args.output_prefix}.idx"
          + (f" and {args.output_prefix}.json" if summary.manifest else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
