"""JSONL -> Megatron indexed dataset (``{prefix}_{key}_document.bin/.idx``).

The command-line interface is Megatron-LM's ``tools/preprocess_data.py``; the output is
byte-identical to what megatron-core's ``IndexedDatasetBuilder`` writes (one sequence per
document), and the same whatever ``--workers`` is. Beside it goes a manifest
``{prefix}_{key}_document.json`` (``data_prep.indexed_dataset.DatasetManifest``: largest token
id, tokenizer and its sha256, counts), which training and evaluation read to check the data
against the model's vocabulary without scanning the ``.bin``.

Faster than Megatron-LM's script, which encodes one document per pool task: the input is streamed
in chunks of about ``--chunk-bytes``; each worker parses and batch-encodes a whole chunk (with
sentencepiece's C++ thread pool, ``--threads-per-worker``, default cores // workers, since the main
process only reads and writes) and sends back one flat token array; the main process writes
chunks in input order. At most
``2 x --workers`` chunks are in flight, so memory stays constant on corpora larger than RAM.

Bad input (malformed JSON, a missing key, a non-string value, invalid UTF-8, an empty document)
stops the run with ``file:line`` and the reason; ``--skip-bad-lines`` counts and reports them
instead; an input without any document is an error. Outputs are written under temporary names
(``.tmp-PID``) and renamed only when complete; a later run with the same prefix removes the
temporaries of a run that was killed (its process is gone), never those of a live one.

Usage::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Iterator

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.indexed_dataset import (  # noqa: E402
    DTYPE_CODES, INDEX_HEADER, DatasetManifest, file_sha256, manifest_path, remove_stale_temporaries,
    write_manifest,
)
from data_prep.tokenizers import TOKENIZER_TYPES, TokenizerError, build_tokenizer  # noqa: E402


class PreprocessError(Exception):
    """Bad input or environment; the message names the file/line/flag and what to do."""


@dataclass
class Chunk:
    file: str
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]


@dataclass
class ChunkResult:
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    n_docs: int = 0
    n_bytes: int = 0
    blank_lines: int = 0
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
_worker_state: dict = {}


def _init_worker(tokenizer_args: dict, json_keys: list[str], append_eod: bool,
                 skip_bad_lines: bool, dtype: type, threads: int = 1) -> None:
    _worker_state.update(
        tokenizer=build_tokenizer(**tokenizer_args), json_keys=json_keys, append_eod=append_eod,
        skip_bad_lines=skip_bad_lines, dtype=dtype, threads=threads,
    )


def _tokenize_batch(tokenizer, texts: list[str], threads: int) -> list[list[int]]:
    if threads > 1 and hasattr(tokenizer, "_sp"):
        return tokenizer.tokenize_batch(texts, num_threads=threads)
    return tokenizer.tokenize_batch(texts)


def _parse_line(raw: bytes, json_keys: list[str]) -> dict[str, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    texts = {}
    for key in json_keys:
        if key not in row:
            raise ValueError(f"missing key {key!r} (keys present: {sorted(row)[:8]})")
        value = row[key]
        if not isinstance(value, str):
            raise ValueError(f"key {key!r} is a {type(value).__name__}, not a string")
        if not value.strip():
            raise ValueError(f"empty document in key {key!r}")
        texts[key] = value
    return texts


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, validate and batch-encode one chunk (runs in a worker process)."""
    state = _worker_state
    tokenizer, keys, dtype = state["tokenizer"], state["json_keys"], state["dtype"]
    result = ChunkResult(tokens={}, lengths={})
    rows: list[dict[str, str]] = []
    line_numbers: list[int] = []
    for offset, raw in enumerate(chunk.lines):
        line_no = chunk.first_line + offset
        result.n_bytes += len(raw)
        if not raw.strip():
            result.blank_lines += 1
            continue
        try:
            rows.append(_parse_line(raw, keys))
            line_numbers.append(line_no)
        except ValueError as err:
            result.bad_lines.append((chunk.file, line_no, str(err)))
            if not state["skip_bad_lines"]:
                return result
    keep = [True] * len(rows)
    encoded: dict[str, list[list[int]]] = {}
    for key in keys:
        try:
            encoded[key] = _tokenize_batch(tokenizer, [r[key] for r in rows], state.get("threads", 1))
        except ValueError as err:  # NullTokenizer: non-integer text; find the line
            encoded[key] = []
            for i, r in enumerate(rows):
                try:
                    encoded[key].append(tokenizer.tokenize(r[key]))
                except ValueError as line_err:
                    encoded[key].append([])
                    keep[i] = False
                    result.bad_lines.append((chunk.file, line_numbers[i], str(line_err)))
                    if not state["skip_bad_lines"]:
                        return result
            del err
        for i, ids in enumerate(encoded[key]):
            if keep[i] and not ids:
                keep[i] = False
                result.bad_lines.append((chunk.file, line_numbers[i], f"key {key!r} encodes to no tokens"))
                if not state["skip_bad_lines"]:
                    return result
    for key in keys:
        docs = [ids for ids, k in zip(encoded[key], keep) if k]
        if state["append_eod"]:
            docs = [ids + [tokenizer.eod] for ids in docs]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
        result.tokens[key], result.lengths[key] = flat, lengths
    result.n_docs = sum(keep)
    return result


# --------------------------------------------------------------------------------------------
# Input and output
# --------------------------------------------------------------------------------------------
def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PreprocessError(f"--input {pattern!r}: the pattern matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise PreprocessError(f"--input {path!r}: no such file")
            if not os.access(path, os.R_OK):
                raise PreprocessError(f"--input {path!r}: not readable (check its permissions)")
            files.append(path)
    return files


def _open_input(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_chunks(files: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Stream the inputs as chunks of whole lines, about ``chunk_bytes`` each."""
    for path in files:
        with _open_input(path) as f:
            lines: list[bytes] = []
            size = 0
            first = 1
            line_no = 0
            try:
                for line_no, raw in enumerate(f, 1):
                    lines.append(raw)
                    size += len(raw)
                    if size >= chunk_bytes:
                        yield Chunk(path, first, lines)
                        lines, size, first = [], 0, line_no + 1
            except (OSError, EOFError) as err:  # e.g. a truncated .gz
                raise PreprocessError(f"{path}:{line_no + 1}: cannot read input ({err})") from None
            if lines:
                yield Chunk(path, first, lines)


class IndexedDatasetWriter:
    """Writes ``.bin``/``.idx`` exactly as megatron-core's ``IndexedDatasetBuilder`` does for
    one-sequence documents, streaming tokens, and the manifest ``.json`` beside them; temporary
    names until ``finalize``."""

    def __init__(self, prefix: str, dtype: type, tokenizer_fields: dict):
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self.json_path = manifest_path(prefix)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin, self._tmp_idx, self._tmp_json = (
            self.bin_path + suffix, self.idx_path + suffix, self.json_path + suffix)
        self.dtype = dtype
        self._tokenizer_fields = tokenizer_fields
        self._max_token_id = -1
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(lengths)
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(np.array([1], "<u8").tobytes())
            f.write(np.array([DTYPE_CODES[self.dtype]], "<u1").tobytes())
            f.write(np.array([len(lengths)], "<u8").tobytes())
            f.write(np.array([len(document_indices)], "<u8").tobytes())
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(document_indices.tobytes(order="C"))
        write_manifest(self._tmp_json, DatasetManifest(
            max_token_id=self._max_token_id, documents=len(lengths), tokens=int(lengths.sum()),
            dtype=np.dtype(self.dtype).name, **self._tokenizer_fields))
        # .idx last: a reader that finds the .idx finds the complete .bin and manifest beside it.
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_json, self.json_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_json):
            if os.path.exists(path):
                os.remove(path)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def remove_stale_outputs(prefixes: list[str]) -> list[str]:
    """Remove the temporaries that a killed run left under these prefixes (one-line note)."""
    removed = [path for prefix in prefixes for final in (prefix + ".bin", prefix + ".idx", manifest_path(prefix))
               for path in remove_stale_temporaries(final)]
    if removed:
        print(f"removed {len(removed)} temporary file(s) of an earlier run that is no longer running: "
              f"{', '.join(removed)}", file=sys.stderr)
    return removed


def tokenizer_manifest_fields(tokenizer, tokenizer_type: str) -> dict:
    """What the manifest records about the tokenizer that made the dataset."""
    path = getattr(tokenizer, "path", None)
    return {"vocab_size": tokenizer.vocab_size, "tokenizer_type": tokenizer_type,
            "tokenizer_model_sha256": file_sha256(path) if path else None}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    blank_lines: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    first_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    json_keys: tuple[str, ...] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    vocab_size: int | None = None,
    eod_id: int | None = None,
    skip_bad_lines: bool = False,
    chunk_bytes: int = 1 << 20,
    log_interval: int = 10000,
    progress: bool | None = None,
    threads_per_worker: int | None = None,
) -> Summary:
    """Importable entry point; raises PreprocessError/TokenizerError on bad input."""
    files = expand_inputs(inputs)
    tokenizer_args = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                          vocab_size=vocab_size, eod_id=eod_id)
    tokenizer = build_tokenizer(**tokenizer_args)  # fail here, clearly, before any worker starts
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise PreprocessError(f"--output-prefix {output_prefix!r}: cannot create {out_dir} ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise PreprocessError(f"--output-prefix {output_prefix!r}: folder {out_dir} is not writable")
    if workers < 0:
        raise PreprocessError("--workers must be >= 0 (0 encodes in the main process)")

    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    remove_stale_outputs(list(prefixes.values()))
    fields = tokenizer_manifest_fields(tokenizer, tokenizer_type)
    writers: dict[str, IndexedDatasetWriter] = {}
    summary = Summary()
    total_bytes = sum(os.path.getsize(f) for f in files if not f.endswith(".gz")) or None
    start = time.time()
    bar = _progress_bar(total_bytes, progress)
    pool = None
    try:
        for key in json_keys:
            writers[key] = IndexedDatasetWriter(prefixes[key], dtype, fields)
        if threads_per_worker is None:
            # The main process only reads and writes; the encoders get the machine's cores.
            threads_per_worker = max(1, (os.cpu_count() or 1) // max(workers, 1))
        init_args = (tokenizer_args, list(json_keys), append_eod, skip_bad_lines, dtype,
                     threads_per_worker)
        if workers == 0:
            _init_worker(*init_args)
            results: Iterator[ChunkResult] = map(encode_chunk, iter_chunks(files, chunk_bytes))
        else:
            pool = get_context("fork" if sys.platform == "linux" else "spawn").Pool(
                workers, initializer=_init_worker, initargs=init_args)
            results = _ordered_bounded(pool, iter_chunks(files, chunk_bytes), 2 * workers)
        next_log = log_interval
        for result in results:
            for file, line, reason in result.bad_lines:
                if not skip_bad_lines:
                    raise PreprocessError(
                        f"{file}:{line}: {reason}. Fix the line, or pass --skip-bad-lines to skip "
                        "such lines and have them counted")
                summary.skipped[reason.split(" (")[0]] += 1
                if len(summary.first_skipped) < 5:
                    summary.first_skipped.append(f"{file}:{line}: {reason}")
            for key in json_keys:
                writers[key].add_documents(result.tokens[key], result.lengths[key])
            summary.documents += result.n_docs
            summary.tokens += sum(int(result.tokens[k].size) for k in json_keys)
            summary.bytes += result.n_bytes
            summary.blank_lines += result.blank_lines
            elapsed = max(time.time() - start, 1e-9)
            if bar is not None:
                bar.update(result.n_bytes)
                bar.set_postfix_str(_rates(summary, elapsed), refresh=False)
            elif log_interval and summary.documents >= next_log:
                print(f"processed {summary.documents} documents ({_rates(summary, elapsed)})",
                      file=sys.stderr, flush=True)
                next_log = summary.documents + log_interval
        if summary.documents == 0:
            raise PreprocessError(_no_documents_message(files, json_keys, summary))
        for key in json_keys:
            writers[key].finalize()
            summary.outputs.append(output_prefix_for(output_prefix, key))
    except BaseException as err:
        for writer in writers.values():
            writer.abort()
        if pool is not None:
            pool.terminate()
        if isinstance(err, OSError):  # input errors are PreprocessErrors already: this is the output
            raise PreprocessError(f"--output-prefix {output_prefix!r}: cannot write the dataset "
                                  f"({err.strerror or err}); nothing was written") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    summary.seconds = time.time() - start
    return summary


def _no_documents_message(files: list[str], json_keys: tuple[str, ...], summary: Summary) -> str:
    what = (f"all {sum(summary.skipped.values())} non-blank lines were skipped as bad"
            if summary.skipped else "it holds no documents" + (
                f" ({summary.blank_lines} blank lines)" if summary.blank_lines else ""))
    return (f"--input {' '.join(files)}: {what}; nothing written. Give JSONL with one object "
            f"per line holding the key(s) {', '.join(map(repr, json_keys))}")


def _ordered_bounded(pool, chunks: Iterator[Chunk], max_in_flight: int) -> Iterator[ChunkResult]:
    """Like ``pool.imap`` but reads ahead at most ``max_in_flight`` chunks (constant memory)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _rates(summary: Summary, elapsed: float) -> str:
    return (f"{summary.documents / elapsed:,.0f} docs/s, {summary.bytes / elapsed / 1e6:.2f} MB/s, "
            f"{summary.tokens / elapsed:,.0f} tokens/s")


def _progress_bar(total_bytes: int | None, progress: bool | None):
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if progress is None and not sys.stderr.isatty():
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="JSONL -> Megatron indexed dataset (.bin/.idx)")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), optionally .gz; glob patterns are expanded")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed/empty/non-UTF-8 lines and report them, instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="sentencepiece .model, or tokenizer.json / its folder")
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    g.add_argument("--eod-id", type=int, default=None, help="override the end-of-document id")
    g.add_argument("--append-eod", action="store_true", help="append the eod token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding processes")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="sentencepiece encoding threads per worker (default: cores // workers)")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20, help="input bytes per worker task")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="documents between progress lines when stderr is not a terminal")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            tuple(args.json_keys), args.append_eod, args.workers, args.vocab_size, args.eod_id,
            args.skip_bad_lines, args.chunk_bytes, args.log_interval,
            progress=False if args.no_progress else None,
            threads_per_worker=args.threads_per_worker,
        )
    except (PreprocessError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    elapsed = max(summary.seconds, 1e-9)
    print(f"done: {summary.documents} documents, {summary.tokens} tokens, "
          f"{summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f}s ({_rates(summary, elapsed)})")
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
