"""JSONL -> Megatron indexed dataset (``{prefix}_{key}_document.bin/.idx``): the encoder library.

``tools/preprocess_data.py`` is its command line (Megatron-LM's flags); tests, benchmarks and the
fault campaign call ``preprocess`` directly. The output is byte-identical to what megatron-core's
``IndexedDatasetBuilder`` writes (one sequence per document), and the same whatever ``workers`` is.
Beside it goes a manifest ``{prefix}_{key}_document.json`` (``data_prep.indexed_dataset.DatasetManifest``:
largest token id, tokenizer and its sha256, counts, the source files with their sizes and sha256
(hashed as they are read), lines skipped, tool version), which training and evaluation read to
check the data against the model's tokenizer without scanning the ``.bin``. ``partitions=N``
encodes N contiguous shares of the input in N processes and merges them (``data_prep.merge``): the
same files as one process.

Faster than Megatron-LM's script, which encodes one document per pool task: the input is streamed
in chunks of about ``chunk_bytes``; each worker parses and batch-encodes a whole chunk (with
sentencepiece's C++ thread pool, ``threads_per_worker``, default cores // workers, since the main
process only reads and writes) and sends back one flat token array; the main process writes
chunks in input order. At most ``2 x workers`` chunks are in flight, so memory stays constant on
corpora larger than RAM.

Bad input (malformed JSON, a missing key, a non-string value, invalid UTF-8, an empty document)
stops the run with ``file:line`` and the reason; ``skip_bad_lines`` counts and reports them
instead; an input without any document is an error. Outputs are written under temporary names
(``.tmp-PID``) and renamed only when complete; a later run with the same prefix removes the
temporaries of a run that was killed (its process is gone), never those of a live one.
"""
from __future__ import annotations

import bisect
import collections
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import IO, Iterator

import numpy as np

from data_prep.indexed_dataset import (
    DTYPE_CODES, INDEX_HEADER, DatasetManifest, SourceFile, file_sha256, manifest_path, remove_stale_temporaries,
    tool_version, write_manifest,
)
from data_prep.durable import replace_durably, sync_folder
from data_prep.merge import MergeError, merge_datasets
from data_prep.processes import die_with_parent
from data_prep.tokenizers import TokenizerError, build_tokenizer, infer_tokenizer_type


class PreprocessError(Exception):
    """Bad input or environment; the message names the file/line/flag and what to do."""


@dataclass(frozen=True)
class Segment:
    """A run of whole lines of one input file: bytes ``[start, end)`` (``end`` None: to its end)."""

    path: str
    start: int = 0
    end: int | None = None


@dataclass
class Chunk:
    file: str
    first_line: int  # 1-based number of lines[0], counted from segment_start
    lines: list[bytes]
    segment_start: int = 0  # byte offset the line numbers count from (a --partitions share)


@dataclass
class ChunkResult:
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    n_docs: int = 0
    n_bytes: int = 0
    blank_lines: int = 0
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)
    segment_start: int = 0


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


def _init_pool_worker(parent_pid: int, *init_args) -> None:
    """A pool worker: dies with the process that owns the pool (a SIGKILLed preprocess or
    --partitions share leaves no encoder behind), then the encoder's state."""
    die_with_parent(parent_pid)
    _init_worker(*init_args)


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
    result = ChunkResult(tokens={}, lengths={}, segment_start=chunk.segment_start)
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


class _HashingReader(io.RawIOBase):
    """Passes a file's bytes through, adding them to a sha256 on the way (the input is read once)."""

    def __init__(self, raw: IO[bytes], digest):
        self._raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_segment(segment: Segment, digest=None) -> tuple[IO[bytes], IO[bytes]]:
    """(lines to iterate, the underlying byte stream) for a segment; ``digest`` hashes the file."""
    raw: IO[bytes] = open(segment.path, "rb", buffering=0)
    if digest is not None:
        raw = _HashingReader(raw, digest)
    buffered = io.BufferedReader(raw, 1 << 20)
    if segment.path.endswith(".gz"):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), buffered
    if segment.start:
        buffered.seek(segment.start)
    return buffered, buffered


def iter_chunks(segments: list[Segment], chunk_bytes: int, digests: list | None = None) -> Iterator[Chunk]:
    """Stream the segments as chunks of whole lines, about ``chunk_bytes`` each. With ``digests``,
    each whole-file segment's bytes go through a sha256 appended to it as ``(path, digest)``."""
    for segment in segments:
        digest = None
        if digests is not None and segment.start == 0 and segment.end is None:
            digest = hashlib.sha256()
            digests.append((segment.path, digest))
        try:
            lines_io, stream = _open_segment(segment, digest)
        except OSError as err:
            raise PreprocessError(f"--input {segment.path}: cannot read it ({err.strerror or err})") from None
        with lines_io, stream:
            lines: list[bytes] = []
            size = 0
            first = 1
            line_no = 0
            position = segment.start
            try:
                for line_no, raw in enumerate(lines_io, 1):
                    if segment.end is not None and position >= segment.end:
                        break
                    position += len(raw)
                    lines.append(raw)
                    size += len(raw)
                    if size >= chunk_bytes:
                        yield Chunk(segment.path, first, lines, segment.start)
                        lines, size, first = [], 0, line_no + 1
                if digest is not None:
                    while stream.read(1 << 20):  # whatever the line reader left: the hash covers the file
                        pass
            except (OSError, EOFError) as err:  # e.g. a truncated .gz
                where = _absolute_line(segment.path, segment.start, line_no + 1)
                raise PreprocessError(f"{segment.path}:{where}: cannot read input ({err})") from None
            if lines:
                yield Chunk(segment.path, first, lines, segment.start)


_LINES_BEFORE: dict[tuple[str, int], int] = {}


def _absolute_line(path: str, segment_start: int, line: int) -> int:
    """A line number counted from a segment's start, counted from the file's start instead (the
    newlines before the segment are counted once, when an error needs them)."""
    if segment_start == 0:
        return line
    key = (os.path.abspath(path), segment_start)
    if key not in _LINES_BEFORE:
        count, left = 0, segment_start
        with open(path, "rb") as f:
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    break
                count += block.count(b"\n")
                left -= len(block)
        _LINES_BEFORE[key] = count
    return _LINES_BEFORE[key] + line


def plan_partitions(files: list[str], partitions: int) -> list[list[Segment]]:
    """Split the inputs into ``partitions`` contiguous shares of about equal bytes, in input order
    (so the documents keep their order): a plain file may be cut at a line boundary, a ``.gz``
    goes whole to the share its first byte falls in. A share may be empty (few big ``.gz``)."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    bounds = [total * k // partitions for k in range(1, partitions)]
    plan: list[list[Segment]] = [[] for _ in range(partitions)]
    offset = 0
    for path, size in zip(files, sizes):
        cuts = [0]
        if not path.endswith(".gz"):
            with open(path, "rb") as f:
                for bound in bounds:
                    if offset < bound < offset + size:
                        f.seek(bound - offset - 1)
                        f.readline()  # to the end of the line holding the byte before the bound
                        if cuts[-1] < f.tell() < size:
                            cuts.append(f.tell())
        cuts.append(size)
        for start, end in zip(cuts, cuts[1:]):
            share = bisect.bisect_right(bounds, offset + start)
            plan[share].append(Segment(path, start, None if end == size else end))
        offset += size
    return plan


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

    def finalize(self, manifest_fields: dict) -> None:
        """Write the index and the manifest (with ``manifest_fields``: sources, counts of skipped
        lines, ...), then rename all three into place."""
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
            dtype=np.dtype(self.dtype).name, **self._tokenizer_fields, **manifest_fields))
        # .idx last: a reader that finds the .idx finds the complete .bin and manifest beside it;
        # an earlier run's .idx goes first, so that it is never seen beside the new .bin.
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        # each on the disk before its rename, the folder after: a power cut never leaves an .idx
        # beside a .bin that has its name but not its tokens
        replace_durably(self._tmp_bin, self.bin_path)
        replace_durably(self._tmp_json, self.json_path)
        replace_durably(self._tmp_idx, self.idx_path)
        sync_folder(os.path.dirname(os.path.abspath(self.idx_path)))

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_json):
            if os.path.exists(path):
                os.remove(path)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def remove_stale_outputs(prefixes: list[str], folders: tuple[str, ...] = ()) -> list[str]:
    """Remove the temporaries that a killed run left under these prefixes, and its ``FOLDER.tmp-PID``
    working folders (--partitions), those of a process still alive excepted (one-line note)."""
    finals = [final for prefix in prefixes for final in (prefix + ".bin", prefix + ".idx", manifest_path(prefix))]
    removed = [path for final in (*finals, *folders) for path in remove_stale_temporaries(final)]
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
    sources: list[SourceFile] = field(default_factory=list)


@dataclass
class _Settings:
    """What every encoding run (the whole input, or one --partitions share) is given."""

    tokenizer_args: dict
    tokenizer_type: str
    tokenizer_fields: dict
    dtype: type
    json_keys: tuple[str, ...]
    append_eod: bool
    skip_bad_lines: bool
    chunk_bytes: int
    log_interval: int
    threads_per_worker: int | None


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str | None = None,
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
    partitions: int = 1,
) -> Summary:
    """Importable entry point; raises PreprocessError/TokenizerError on bad input.

    ``tokenizer_type`` None: HuggingFaceTokenizer for a HF folder or tokenizer.json, else
    GPTSentencePieceTokenizer (what the trainer infers). ``partitions`` > 1: the input is cut into
    that many contiguous shares (``plan_partitions``), each encoded by its own process with
    ``workers // partitions`` workers, and the shares' outputs merged: the same files as one run."""
    if partitions < 1:
        raise PreprocessError("--partitions must be >= 1")
    if workers < 0:
        raise PreprocessError("--workers must be >= 0 (0 encodes in the main process)")
    if partitions > 1 and 0 < workers < partitions:
        raise PreprocessError(f"--workers {workers} is fewer than --partitions {partitions}: each partition "
                              "gets workers // partitions encoding processes; give at least one each")
    files = expand_inputs(inputs)
    tokenizer_type = tokenizer_type or infer_tokenizer_type(tokenizer_model)
    tokenizer_args = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                          vocab_size=vocab_size, eod_id=eod_id)
    tokenizer = build_tokenizer(**tokenizer_args)  # fail here, clearly, before any worker starts
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise PreprocessError(f"--output-prefix {output_prefix!r}: cannot create {out_dir} ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise PreprocessError(f"--output-prefix {output_prefix!r}: folder {out_dir} is not writable")
    settings = _Settings(
        tokenizer_args=tokenizer_args, tokenizer_type=tokenizer_type,
        tokenizer_fields=tokenizer_manifest_fields(tokenizer, tokenizer_type),
        dtype=np.uint16 if tokenizer.vocab_size < 65500 else np.int32, json_keys=tuple(json_keys),
        append_eod=append_eod, skip_bad_lines=skip_bad_lines, chunk_bytes=chunk_bytes,
        log_interval=log_interval, threads_per_worker=threads_per_worker)
    remove_stale_outputs([output_prefix_for(output_prefix, k) for k in json_keys],
                         folders=(output_prefix + ".partitions",))
    start = time.time()
    if partitions == 1:
        summary = _encode([Segment(f) for f in files], output_prefix, settings, workers, progress,
                          hash_sources=True)
    else:
        summary = _encode_partitioned(files, output_prefix, settings, workers, partitions)
    if summary.documents == 0:
        raise PreprocessError(_no_documents_message(files, json_keys, summary))
    summary.seconds = time.time() - start
    return summary


def _encode(segments: list[Segment], output_prefix: str, settings: _Settings, workers: int,
            progress: bool | None, hash_sources: bool, log_prefix: str = "") -> Summary:
    """Encode ``segments`` into ``output_prefix``'s datasets; no output when they hold no document
    (the caller decides whether that is an error)."""
    json_keys = settings.json_keys
    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    writers: dict[str, IndexedDatasetWriter] = {}
    summary = Summary()
    total_bytes = sum((s.end or os.path.getsize(s.path)) - s.start for s in segments
                      if not s.path.endswith(".gz")) or None
    start = time.time()
    bar = _progress_bar(total_bytes, progress)
    pool = None
    digests: list | None = [] if hash_sources else None
    try:
        for key in json_keys:
            writers[key] = IndexedDatasetWriter(prefixes[key], settings.dtype, settings.tokenizer_fields)
        threads_per_worker = settings.threads_per_worker
        if threads_per_worker is None:
            # The main process only reads and writes; the encoders get the machine's cores.
            threads_per_worker = max(1, (os.cpu_count() or 1) // max(workers, 1))
        init_args = (settings.tokenizer_args, list(json_keys), settings.append_eod, settings.skip_bad_lines,
                     settings.dtype, threads_per_worker)
        chunks = iter_chunks(segments, settings.chunk_bytes, digests)
        if workers == 0:
            _init_worker(*init_args)
            results: Iterator[ChunkResult] = map(encode_chunk, chunks)
        else:
            pool = get_context("fork" if sys.platform == "linux" else "spawn").Pool(
                workers, initializer=_init_pool_worker, initargs=(os.getpid(), *init_args))
            results = _ordered_bounded(pool, chunks, 2 * workers)
        next_log = settings.log_interval
        for result in results:
            for file, line, reason in result.bad_lines:
                line = _absolute_line(file, result.segment_start, line)
                if not settings.skip_bad_lines:
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
                bar.set_postfix_str(rates(summary, elapsed), refresh=False)
            elif settings.log_interval and summary.documents >= next_log:
                print(f"{log_prefix}processed {summary.documents} documents ({rates(summary, elapsed)})",
                      file=sys.stderr, flush=True)
                next_log = summary.documents + settings.log_interval
        if digests is not None:
            summary.sources = [SourceFile(os.path.abspath(path), os.path.getsize(path), digest.hexdigest())
                               for path, digest in digests]
        if summary.documents == 0:
            for writer in writers.values():
                writer.abort()
        else:
            for key in json_keys:
                writers[key].finalize(_manifest_fields(summary, settings, key))
                summary.outputs.append(prefixes[key])
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


def _manifest_fields(summary: Summary, settings: _Settings, key: str) -> dict:
    return {"json_key": key, "append_eod": settings.append_eod,
            "bad_lines_skipped": sum(summary.skipped.values()), "blank_lines": summary.blank_lines,
            "sources": list(summary.sources), "tool_version": tool_version()}


def _partition_main(conn, segments: list[Segment], prefix: str, settings: _Settings, workers: int,
                    index: int, parent_pid: int) -> None:
    """One --partitions share, in its own process: its Summary (or its error) goes to ``conn``."""
    die_with_parent(parent_pid)  # a SIGKILLed preprocess must not leave its shares encoding
    # stopped by the parent (another share failed): unwind, so that the pool and temporaries go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = _encode(segments, prefix, settings, workers, progress=False, hash_sources=False,
                          log_prefix=f"partition {index}: ")
        conn.send(("ok", summary))
    except (PreprocessError, TokenizerError) as err:
        conn.send(("error", str(err)))
    except BaseException as err:  # noqa: BLE001 -- reported by the parent, which stops the others
        conn.send(("error", f"partition {index} failed: {type(err).__name__}: {err}"))
    finally:
        conn.close()


def _encode_partitioned(files: list[str], output_prefix: str, settings: _Settings, workers: int,
                        partitions: int) -> Summary:
    """Megatron-LM's --partitions without its copies of the input: each share is read in place by
    its own process into a temporary folder, and the shares' datasets are merged in order."""
    plan = plan_partitions(files, partitions)
    workdir = f"{output_prefix}.partitions.tmp-{os.getpid()}"
    os.makedirs(workdir)
    context = get_context("fork" if sys.platform == "linux" else "spawn")
    running = []
    summary = Summary()
    try:
        for index, segments in enumerate(plan):
            if not segments:
                continue
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_partition_main, args=(
                sender, segments, os.path.join(workdir, f"part{index:04d}"), settings,
                workers // partitions, index, os.getpid()))
            process.start()
            sender.close()
            running.append((index, process, receiver))
        # while the shares are encoded: the sources' hashes (the shares read only parts of files)
        summary.sources = [SourceFile(os.path.abspath(f), os.path.getsize(f), file_sha256(f)) for f in files]
        parts: list[Summary] = []
        for index, process, receiver in running:
            try:
                status, value = receiver.recv()
            except EOFError:
                process.join()
                raise PreprocessError(f"--partitions: the process of partition {index} died (exit code "
                                      f"{process.exitcode}: out of memory?); nothing was written") from None
            process.join()
            if status == "error":
                raise PreprocessError(value)
            parts.append(value)
        for part in parts:
            summary.documents += part.documents
            summary.tokens += part.tokens
            summary.bytes += part.bytes
            summary.blank_lines += part.blank_lines
            summary.skipped.update(part.skipped)
            summary.first_skipped.extend(part.first_skipped[:5 - len(summary.first_skipped)])
        if summary.documents:
            for key in settings.json_keys:
                part_prefixes = [p for part in parts for p in part.outputs if p.endswith(f"_{key}_document")]
                final = output_prefix_for(output_prefix, key)
                try:
                    merge_datasets(part_prefixes, final, overwrite=True,
                                   manifest_fields=_manifest_fields(summary, settings, key))
                except MergeError as err:
                    raise PreprocessError(f"--partitions: merging the partitions failed: {err}") from None
                summary.outputs.append(final)
    finally:
        for _, process, _ in running:
            if process.is_alive():
                process.terminate()
                process.join()
        shutil.rmtree(workdir, ignore_errors=True)
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


def rates(summary: Summary, elapsed: float) -> str:
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
