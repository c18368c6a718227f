"""Show what is in a Megatron indexed dataset: counts, token statistics, the first documents.

Usage::

    python tools/inspect_dataset.py data/corpus_text_document \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --num-docs 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.indexed_dataset import (  # noqa: E402
    DatasetError, DatasetManifest, manifest_path, max_token_id, read_index_header, read_manifest,
)
from data_prep.tokenizers import TOKENIZER_TYPES, TokenizerError, build_tokenizer  # noqa: E402
from pretrain.config import ranged  # noqa: E402


def describe_manifest(prefix: str, manifest: DatasetManifest | None, max_sources: int = 10) -> list[str]:
    """The manifest (PREFIX.json) in a few lines: what made the dataset, from which files."""
    if manifest is None:
        return [f"  manifest: none ({manifest_path(prefix)} is missing: made by another tool?)"]
    m = manifest
    eod = {True: "yes", False: "no", None: "not recorded"}[m.append_eod]
    lines = [
        f"  manifest: {manifest_path(prefix)} (format {m.format_version}, {m.tool_version or 'tool not recorded'})",
        f"    tokenizer: {m.tokenizer_type}, vocabulary {m.vocab_size:,}, sha256 {m.tokenizer_model_sha256 or '-'}",
        f"    documents {m.documents:,}, tokens {m.tokens:,}, dtype {m.dtype}, largest id {m.max_token_id}, "
        f"json key {m.json_key or '-'}, eod appended: {eod}",
        f"    bad lines skipped: {m.bad_lines_skipped:,}, blank lines: {m.blank_lines:,}",
    ]
    if m.sources:
        total = sum(s.bytes for s in m.sources)
        lines.append(f"    sources: {len(m.sources):,} file(s), {total:,} bytes")
        for source in m.sources[:max_sources]:
            lines.append(f"      {source.path}  {source.bytes:,} bytes  sha256 {source.sha256}")
        if len(m.sources) > max_sources:
            lines.append(f"      ... and {len(m.sources) - max_sources:,} more")
    else:
        lines.append("    sources: not recorded")
    return lines


def inspect(prefix: str, tokenizer=None, num_docs: int = 3, max_chars: int = 500,
            top_tokens: int = 10) -> str:
    read_index_header(prefix)  # an empty or truncated file is named here, before megatron-core reads it
    largest, largest_source = max_token_id(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # slow import: after the checks
    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths.astype(np.int64)
    total = int(lengths.sum())
    lines = [
        f"dataset: {prefix}",
        f"  sequences: {len(ds):,}   documents: {len(ds.document_indices) - 1:,}   tokens: {total:,}",
        f"  token dtype: {np.dtype(ds.index.dtype).name}   .bin size: {os.path.getsize(prefix + '.bin'):,} bytes",
        f"  largest token id: {largest} (from {largest_source})",
        *describe_manifest(prefix, read_manifest(prefix)),
    ]
    if tokenizer is not None and largest >= tokenizer.vocab_size:
        lines.append(f"  WARNING: ids up to {largest} exceed the tokenizer's vocabulary "
                     f"({tokenizer.vocab_size}): wrong tokenizer? Showing ids, not text.")
        tokenizer = None  # it cannot name or decode ids outside its vocabulary
    if len(lengths):
        q = np.percentile(lengths, [0, 50, 90, 99, 100]).astype(int)
        lines.append(f"  document length: mean {lengths.mean():.1f}; min {q[0]} / median {q[1]} / "
                     f"p90 {q[2]} / p99 {q[3]} / max {q[4]}")
        # token histogram over (up to) the first 5M tokens
        n_sample_docs = max(1, int(np.searchsorted(np.cumsum(lengths), 5_000_000, side="right")))
        sample = np.concatenate([ds[i] for i in range(min(n_sample_docs, len(ds)))])
        ids, counts = np.unique(sample, return_counts=True)
        order = np.argsort(-counts)[:top_tokens]
        desc = []
        for i in order:
            name = repr(tokenizer.id_to_piece(int(ids[i]))) if tokenizer is not None and hasattr(
                tokenizer, "id_to_piece") else ""
            desc.append(f"{int(ids[i])}{'=' + name if name else ''}: {counts[i] / counts.sum():.2%}")
        lines.append(f"  distinct tokens (first {len(sample):,} tokens): {len(ids):,}; max id {int(sample.max())}")
        lines.append("  most frequent: " + ", ".join(desc))
    for i in range(min(num_docs, len(ds))):
        ids = ds[i]
        lines.append(f"--- document {i} ({len(ids)} tokens)")
        if tokenizer is not None:
            text = tokenizer.detokenize(ids.tolist())
            lines.append(text[:max_chars] + (" [...]" if len(text) > max_chars else ""))
        else:
            lines.append(" ".join(map(str, ids[:100].tolist())) + (" ..." if len(ids) > 100 else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-size", type=ranged(int, at_least=1))
    p.add_argument("--num-docs", type=ranged(int, at_least=0), default=3)
    p.add_argument("--max-chars", type=ranged(int, at_least=1), default=500)
    args = p.parse_args(argv)
    tokenizer = None
    try:
        if args.tokenizer_type or args.tokenizer_model:
            tokenizer = build_tokenizer(args.tokenizer_type or "GPTSentencePieceTokenizer",
                                        args.tokenizer_model, vocab_size=args.vocab_size)
        print(inspect(args.prefix, tokenizer, args.num_docs, args.max_chars))
    except (TokenizerError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
