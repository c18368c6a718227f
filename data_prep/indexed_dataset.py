"""Our side of megatron-core's indexed dataset files (``PREFIX.bin``/``PREFIX.idx``): the format's
constants, a check of the ``.idx`` header against the ``.bin`` size (so that an empty or truncated
file is reported by name instead of failing deep inside megatron-core), the dataset's manifest
(``PREFIX.json``) and its largest token id.

The manifest is written by ``tools/preprocess_data.py`` with the dataset; datasets made elsewhere
(Megatron-LM's own script) have none, and their largest id comes from a chunked scan of the
``.bin``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: code -> numpy dtype
DTYPE_BY_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                 7: np.float32, 8: np.uint16}
DTYPE_CODES = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
_HEADER_BYTES = 34
SCAN_CHUNK_TOKENS = 64 * 1024 * 1024


class DatasetError(ValueError):
    """An indexed dataset that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class IndexHeader:
    dtype: type
    sequences: int
    documents: int  # megatron's document count: the number of documents + 1

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


def read_index_header(prefix: str) -> IndexHeader:
    """The ``.idx`` header, after checking the ``.idx`` and ``.bin`` sizes against it."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DatasetError(f"{path} does not exist (give the prefix without .bin/.idx)")
    remake = "re-run tools/preprocess_data.py for this dataset"
    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER_BYTES:
        raise DatasetError(f"{idx_path} is {'empty' if idx_size == 0 else 'truncated'} "
                           f"({idx_size} bytes, shorter than the header); {remake}")
    with open(idx_path, "rb") as f:
        magic, version, code, sequences, documents = (
            f.read(9), int.from_bytes(f.read(8), "little"), f.read(1)[0],
            int.from_bytes(f.read(8), "little"), int.from_bytes(f.read(8), "little"))
    if magic != INDEX_HEADER:
        raise DatasetError(f"{idx_path} is not a Megatron indexed dataset index (bad magic bytes)")
    if version != INDEX_VERSION or code not in DTYPE_BY_CODE:
        raise DatasetError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
    header = IndexHeader(DTYPE_BY_CODE[code], sequences, documents)
    _check_sizes(prefix, header, idx_size, remake)
    return header


def _check_sizes(prefix: str, header: IndexHeader, idx_size: int, remake: str) -> None:
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    expected_idx = _HEADER_BYTES + header.sequences * (4 + 8) + header.documents * 8
    # multimodal indices (not ours, but valid) add one mode byte per sequence
    if idx_size not in (expected_idx, expected_idx + header.sequences):
        raise DatasetError(f"{idx_path} is truncated or damaged: {idx_size} bytes where its header "
                           f"({header.sequences} sequences) needs {expected_idx}; {remake}")
    if header.sequences == 0:
        raise DatasetError(f"{idx_path} holds no documents; {remake} with a non-empty input")
    lengths_end = _HEADER_BYTES + header.sequences * 4
    last_length = int(np.fromfile(idx_path, np.int32, 1, offset=lengths_end - 4)[0])
    last_pointer = int(np.fromfile(idx_path, np.int64, 1, offset=lengths_end + (header.sequences - 1) * 8)[0])
    expected_bin = last_pointer + last_length * header.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        state = "truncated" if bin_size < expected_bin else "longer than its index says"
        raise DatasetError(f"{bin_path} is {state}: {bin_size} bytes where {idx_path} needs "
                           f"{expected_bin}; {remake}")


MANIFEST_FORMAT_VERSION = 2


@dataclass
class SourceFile:
    """One input file of a dataset: where it was, how big, and its sha256 (``sha256sum``'s)."""

    path: str
    bytes: int
    sha256: str


@dataclass
class DatasetManifest:
    """``PREFIX.json``, written with the dataset: what made it and what it holds.

    Format 1 (before the source list) had only the fields up to ``dtype``; reading it gives the
    defaults for the rest. ``sources`` is in the order the documents are in the ``.bin``, so a
    merge concatenates its inputs' lists."""

    max_token_id: int
    vocab_size: int
    tokenizer_type: str
    tokenizer_model_sha256: str | None
    documents: int
    tokens: int
    dtype: str
    format_version: int = MANIFEST_FORMAT_VERSION
    json_key: str | None = None
    append_eod: bool | None = None
    bad_lines_skipped: int = 0
    blank_lines: int = 0
    sources: list[SourceFile] = dataclasses.field(default_factory=list)
    tool_version: str | None = None

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceFile) else SourceFile(**s) for s in self.sources]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DatasetManifest:
        """Fields this version knows; a newer writer's extra fields are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def manifest_path(prefix: str) -> str:
    return prefix + ".json"


def tool_version() -> str:
    """What wrote a manifest: this package and its version."""
    from importlib import metadata

    try:
        return f"efficientllm-pretrain {metadata.version('efficientllm-pretrain')}"
    except metadata.PackageNotFoundError:  # a checkout used without installing it
        return "efficientllm-pretrain (not installed)"


def write_manifest(path: str, manifest: DatasetManifest) -> None:
    """Write ``manifest`` to ``path`` (the caller renames it into place with the dataset)."""
    with open(path, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2)
        f.write("\n")


def read_manifest(prefix: str) -> DatasetManifest | None:
    """The dataset's manifest, or None when it has none."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return DatasetManifest.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DatasetError(f"{path}: not a readable dataset manifest ({err}); delete it to have "
                           "the dataset scanned instead, or re-run tools/preprocess_data.py") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_max_token_id(prefix: str, header: IndexHeader, chunk_tokens: int = SCAN_CHUNK_TOKENS) -> int:
    """The largest id in the ``.bin``, read in chunks (memory stays constant on any size)."""
    tokens = np.memmap(prefix + ".bin", dtype=header.dtype, mode="r")
    largest = -1
    for start in range(0, len(tokens), chunk_tokens):
        largest = max(largest, int(tokens[start:start + chunk_tokens].max()))
    return largest


def max_token_id(prefix: str) -> tuple[int, str]:
    """(largest token id, where it came from): the manifest when it describes this ``.bin``,
    else a scan of the ``.bin``. Checks the files first (``read_index_header``)."""
    header = read_index_header(prefix)
    manifest = read_manifest(prefix)
    bin_tokens = os.path.getsize(prefix + ".bin") // header.itemsize
    if manifest is not None and manifest.tokens == bin_tokens and manifest.dtype == np.dtype(header.dtype).name:
        return manifest.max_token_id, manifest_path(prefix)
    source = "a scan of the .bin" + (" (its manifest describes another .bin)" if manifest else "")
    return scan_max_token_id(prefix, header), source


def remove_stale_temporaries(final_path: str) -> list[str]:
    """Remove ``final_path.tmp-PID`` files whose writing process is gone (a killed run); those of
    a live process (or of a PID we cannot check) are kept. Returns the removed paths."""
    removed = []
    for path in glob.glob(glob.escape(final_path) + ".tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            if os.path.isdir(path):  # a folder of partial outputs (preprocess_data --partitions)
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own PID on a leftover: a previous boot's process, not us (we start clean)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
