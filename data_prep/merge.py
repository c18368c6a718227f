"""Concatenate Megatron indexed datasets (``.bin``/``.idx``) into one, streaming.

What megatron-core's ``IndexedDatasetBuilder.add_index`` + ``finalize`` write, byte for byte, but
in constant memory: the ``.idx`` sections (lengths, pointers, document indices[, modes]) are
written one after the other, each from every input in turn, a block of ``BLOCK`` entries at a
time (megatron-core holds every input's index in Python lists); the ``.bin`` files are appended
with ``copy_file_range`` (in-kernel, no user-space copy). Merging the outputs of preprocessing
input files one by one gives the files that preprocessing them in one run gives.

The inputs' manifests (``PREFIX.json``) are checked against each other (dtype, tokenizer,
``--append-eod``) and merged: counts added, source lists concatenated. Outputs are written under
temporary names and renamed when complete, the ``.idx`` last.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from data_prep.durable import replace_durably, sync_folder
from data_prep.indexed_dataset import (
    _HEADER_BYTES, INDEX_HEADER, INDEX_VERSION, DTYPE_CODES, DatasetError, DatasetManifest, IndexHeader,
    manifest_path, read_index_header, read_manifest, remove_stale_temporaries, tool_version, write_manifest,
)

BLOCK = 1 << 22  # index entries per read/write: 16-32 MB of int32/int64


class MergeError(DatasetError):
    """Inputs that cannot be merged, or an output that cannot be written; the message says why."""


@dataclass
class MergeSummary:
    inputs: int
    documents: int
    tokens: int
    bytes: int
    manifest: DatasetManifest | None
    note: str | None = None  # why no manifest was written


def _is_prefix(item: str) -> bool:
    return os.path.isfile(item + ".bin") and os.path.isfile(item + ".idx")


def find_prefixes(inputs: list[str], exclude: str | None = None) -> list[str]:
    """Dataset prefixes from ``--input``: a folder stands for every ``NAME.bin``/``NAME.idx`` pair
    in it, sorted by name (Megatron-LM's ``merge_datasets.py``); anything else is a prefix, and so
    is a folder without datasets beside ``ITEM.bin``/``ITEM.idx`` (megatron-core's index cache)."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted({os.path.splitext(n)[0] for n in os.listdir(item)
                            if n.endswith((".bin", ".idx")) and ".tmp-" not in n})
            if not found and _is_prefix(item):
                # a prefix that has been trained on: megatron-core's index cache is the folder
                # PREFIX/cache/ beside PREFIX.bin/.idx, and holds no dataset of its own
                prefixes.append(item)
                continue
            if found and _is_prefix(item):
                raise MergeError(f"--input {item}: both a dataset prefix ({item}.bin/.idx) and a folder of "
                                 f"datasets ({', '.join(found[:3])}): give the folder's datasets as prefixes "
                                 "or move them, so that the input means one thing")
            for name in found:
                prefix = os.path.join(item, name)
                if exclude and os.path.abspath(prefix) == os.path.abspath(exclude):
                    continue
                for ext in (".bin", ".idx"):
                    if not os.path.isfile(prefix + ext):
                        raise MergeError(f"--input {item}: {name}{ext} is missing beside "
                                         f"{name}{'.idx' if ext == '.bin' else '.bin'}")
                prefixes.append(prefix)
            if not found:
                raise MergeError(f"--input {item}: the folder holds no .bin/.idx dataset")
        else:
            prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise MergeError(f"--input {item}: {prefix + ext} does not exist (give folders or "
                                     "dataset prefixes, without .bin/.idx)")
            prefixes.append(prefix)
    if not prefixes:
        raise MergeError("--input: no dataset to merge")
    return prefixes


def _has_modes(prefix: str, header: IndexHeader) -> bool:
    plain = _HEADER_BYTES + header.sequences * 12 + header.documents * 8
    return os.path.getsize(prefix + ".idx") == plain + header.sequences


def merged_manifest(prefixes: list[str], manifests: list[DatasetManifest | None], dtype: str
                    ) -> tuple[DatasetManifest | None, str | None]:
    """(the merged manifest, None), or (None, why there is none). Raises MergeError when the
    manifests say the datasets were made with different tokenizers or ``--append-eod``."""
    present = [(p, m) for p, m in zip(prefixes, manifests) if m is not None]
    if not present:
        return None, "no input has a manifest (made by another tool?): none written"
    first_prefix, first = present[0]
    for prefix, m in present[1:]:
        same_tokenizer = (m.vocab_size == first.vocab_size
                          and m.tokenizer_model_sha256 == first.tokenizer_model_sha256
                          and (m.tokenizer_model_sha256 is not None or m.tokenizer_type == first.tokenizer_type))
        if not same_tokenizer:
            raise MergeError(
                f"--input: {prefix} was made with another tokenizer than {first_prefix} ("
                f"{m.tokenizer_type}, {m.vocab_size} tokens, sha256 {str(m.tokenizer_model_sha256)[:12]} vs "
                f"{first.tokenizer_type}, {first.vocab_size} tokens, sha256 {str(first.tokenizer_model_sha256)[:12]}; "
                f"see {manifest_path(prefix)}): their token ids mean different tokens. Preprocess them with one tokenizer")
        if m.append_eod != first.append_eod:
            raise MergeError(f"--input: {prefix} and {first_prefix} differ in --append-eod (their manifests): "
                             "preprocess them alike")
    if len(present) < len(prefixes):
        missing = [p for p, m in zip(prefixes, manifests) if m is None]
        return None, (f"{len(missing)} input(s) have no manifest (e.g. {missing[0]}), so the tokenizer of the "
                      "whole cannot be vouched for: none written")
    keys = {m.json_key for _, m in present}
    return dataclasses.replace(
        first,
        max_token_id=max(m.max_token_id for m in manifests),
        documents=sum(m.documents for m in manifests),
        tokens=sum(m.tokens for m in manifests),
        dtype=dtype,
        json_key=first.json_key if len(keys) == 1 else None,
        bad_lines_skipped=sum(m.bad_lines_skipped for m in manifests),
        blank_lines=sum(m.blank_lines for m in manifests),
        sources=[s for m in manifests for s in m.sources],
        tool_version=tool_version(),
    ), None


def _copy_file(src: str, dst_fd: int) -> int:
    """Append ``src`` to ``dst_fd``: in-kernel when the system allows it."""
    size = os.path.getsize(src)
    with open(src, "rb") as f:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < size:
                    n = os.copy_file_range(f.fileno(), dst_fd, size - done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # another filesystem or an old kernel: fall back below
                pass
        f.seek(done)
        os.lseek(dst_fd, 0, os.SEEK_END)
        while block := f.read(64 << 20):
            done += os.write(dst_fd, block)
    return done


def _blocks(path: str, dtype, offset: int, count: int):
    """``count`` entries of ``dtype`` from ``path`` at byte ``offset``, ``BLOCK`` at a time."""
    for start in range(0, count, BLOCK):
        n = min(BLOCK, count - start)
        yield np.fromfile(path, dtype=dtype, count=n, offset=offset + start * np.dtype(dtype).itemsize)


def merge_datasets(prefixes: list[str], output_prefix: str, overwrite: bool = False,
                   multimodal: bool = False, manifest_fields: dict | None = None) -> MergeSummary:
    """Concatenate ``prefixes`` (in this order) into ``output_prefix``.{bin,idx,json}.
    ``manifest_fields`` replace the merged manifest's (when it has one)."""
    finals = [output_prefix + ".bin", output_prefix + ".idx", manifest_path(output_prefix)]
    if any(os.path.abspath(p) == os.path.abspath(output_prefix) for p in prefixes):
        raise MergeError(f"--output-prefix {output_prefix} is one of the inputs: give another prefix")
    existing = [f for f in finals if os.path.exists(f)]
    if existing and not overwrite:
        raise MergeError(f"--output-prefix {output_prefix}: {existing[0]} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise MergeError(f"--output-prefix {output_prefix}: the folder {out_dir} does not exist")

    headers = []
    for prefix in prefixes:
        try:
            headers.append(read_index_header(prefix))
        except DatasetError as err:
            raise MergeError(f"--input: {err}") from None
    dtypes = {np.dtype(h.dtype).name for h in headers}
    if len(dtypes) > 1:
        odd = next(p for p, h in zip(prefixes, headers) if h.dtype != headers[0].dtype)
        raise MergeError(f"--input: the datasets hold different token dtypes ({', '.join(sorted(dtypes))}; "
                         f"{prefixes[0]} vs {odd}): they were made with tokenizers of different sizes")
    modes = [_has_modes(p, h) for p, h in zip(prefixes, headers)]
    if any(modes) != multimodal or (multimodal and not all(modes)):
        odd = next(p for p, m in zip(prefixes, modes) if m != multimodal)
        raise MergeError(f"--input: {odd} is {'' if not multimodal else 'not '}a multimodal dataset (with a "
                         f"mode per sequence); {'pass' if not multimodal else 'drop'} --multimodal, "
                         "and merge only datasets of one kind")
    try:
        manifests = [read_manifest(p) for p in prefixes]
    except DatasetError as err:
        raise MergeError(f"--input: {err}") from None
    dtype = headers[0].dtype
    manifest, note = merged_manifest(prefixes, manifests, np.dtype(dtype).name)
    if manifest is not None and manifest_fields:
        manifest = dataclasses.replace(manifest, **manifest_fields)

    for final in finals:
        remove_stale_temporaries(final)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx, tmp_json = (f + suffix for f in finals)
    itemsize = np.dtype(dtype).itemsize
    sequences = sum(h.sequences for h in headers)
    documents = sum(h.documents - 1 for h in headers) + 1
    try:
        fd = os.open(tmp_bin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            nbytes = sum(_copy_file(p + ".bin", fd) for p in prefixes)
        finally:
            os.close(fd)
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(np.array([INDEX_VERSION], "<u8").tobytes())
            f.write(np.array([DTYPE_CODES[dtype]], "<u1").tobytes())
            f.write(np.array([sequences], "<u8").tobytes())
            f.write(np.array([documents], "<u8").tobytes())
            for p, h in zip(prefixes, headers):  # sequence lengths (int32): as they are
                for block in _blocks(p + ".idx", np.int32, _HEADER_BYTES, h.sequences):
                    f.write(block.tobytes())
            pointer = 0  # byte offsets: recomputed from the lengths, as megatron-core does
            for p, h in zip(prefixes, headers):
                for block in _blocks(p + ".idx", np.int32, _HEADER_BYTES, h.sequences):
                    sizes = block.astype(np.int64) * itemsize
                    ends = np.cumsum(sizes) + pointer
                    f.write((ends - sizes).tobytes())
                    pointer = int(ends[-1])
            offset = 0  # document boundaries, shifted by the sequences before each input
            f.write(np.zeros(1, np.int64).tobytes())
            for p, h in zip(prefixes, headers):
                start = _HEADER_BYTES + h.sequences * 12 + 8  # skip its leading 0
                for block in _blocks(p + ".idx", np.int64, start, h.documents - 1):
                    f.write((block + offset).tobytes())
                offset += h.sequences
            if multimodal:
                for p, h in zip(prefixes, headers):
                    start = _HEADER_BYTES + h.sequences * 12 + h.documents * 8
                    for block in _blocks(p + ".idx", np.int8, start, h.sequences):
                        f.write(block.tobytes())
        if pointer != nbytes:
            raise MergeError(f"--input: the indices describe {pointer} bytes of tokens but the .bin files hold "
                             f"{nbytes}: an input changed while it was merged; merge again")
        if os.path.exists(finals[1]):
            os.remove(finals[1])  # --overwrite: no moment where the old .idx sits beside the new .bin
        if manifest is not None:
            write_manifest(tmp_json, manifest)
            replace_durably(tmp_bin, finals[0])
            replace_durably(tmp_json, finals[2])
        else:
            replace_durably(tmp_bin, finals[0])
            if os.path.exists(finals[2]):
                os.remove(finals[2])  # an overwritten dataset's manifest would describe other data
        replace_durably(tmp_idx, finals[1])  # last: whoever finds the .idx finds the rest complete (on disk too)
        sync_folder(os.path.dirname(os.path.abspath(finals[1])))
    except BaseException as err:
        for path in (tmp_bin, tmp_idx, tmp_json):
            if os.path.exists(path):
                os.remove(path)
        if isinstance(err, OSError):
            raise MergeError(f"--output-prefix {output_prefix}: cannot write ({err.strerror or err}); "
                             "nothing was written") from None
        raise
    return MergeSummary(inputs=len(prefixes), documents=documents - 1, tokens=nbytes // itemsize,
                        bytes=nbytes, manifest=manifest, note=note)
