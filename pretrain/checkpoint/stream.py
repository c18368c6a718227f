"""Tensor-by-tensor access to a ``torch_dist`` checkpoint folder, without building a model.

megatron-core's ``torch_dist`` format is a PyTorch Distributed Checkpoint (DCP): every key is a
*global* tensor (the full TP=1 parameter; decoder layers of a homogeneous model stacked on a
leading layer dimension) stored as the chunks the saving ranks held, plus byte objects
(``..._extra_state/shard_i_n``), ``common.pt`` and ``metadata.json``. ``CheckpointReader`` reads
any region of a key (only the chunks it overlaps are touched); ``write_lazily`` writes a new DCP
folder whose tensors are produced one chunk at a time by a callback, so rewriting a checkpoint
never holds more than one chunk (plus one output file's buffer) in memory.

Each stored chunk is a ``torch.save`` zip archive. DCP's reader ``torch.load``s a whole chunk for
every region asked of it (one layer of a key stored as one chunk of all layers costs all layers, at
every layer); ``CheckpointReader`` instead takes the archive apart once (its central directory, the
``data.pkl`` record read through an allowlist that builds no object: storage dtype, offset, size,
strides) and ``pread``\ s only the bytes between the region's first and last element. An archive
in any other form (compressed, big-endian, another record) is read through DCP as before, which
refuses one that would run code.

``.metadata`` is a plain pickle that DCP reads with ``pickle.load``: ``read_dcp_metadata`` reads it
through an allowlist (DCP's own metadata dataclasses and enums, ``torch.Size``, dtypes, layouts, paths),
so a folder whose metadata would run code, or is corrupt, is refused with ``DCPFormatError``
instead of executing or failing deep inside torch.

Only public DCP planner/storage interfaces are used, except that ``_LazyWriter`` groups the
write items into files itself (torch's ``FileSystemWriter`` keeps every tensor of a file alive
until the file is closed, so one file per rank would hold the whole checkpoint) and syncs them
itself, each while another thread takes its CRC-32 for the manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import math
import os
import pickle
import queue
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pretrain.checkpoint.atomic import file_crc32
from pretrain.errors import DCPFormatError


class _NotAllowed(pickle.UnpicklingError):
    """The metadata pickle names a global outside the allowlist."""


# modules whose dataclasses and enums a DCP ``.metadata`` pickle is made of
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only data: DCP metadata dataclasses/enums and torch sizes, dtypes and layouts."""

    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                                ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                                ("pathlib", "PurePosixPath")):  # a path: StorageMeta.checkpoint_id
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise _NotAllowed(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(path: str) -> Metadata:
    """The ``.metadata`` of the DCP folder ``path``, read without running code from it."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise DCPFormatError(f"{file}: missing; the checkpoint is incomplete") from None
    except _NotAllowed as err:
        raise DCPFormatError(f"{file}: refused, not plain checkpoint metadata ({err}); the file is corrupt, "
                             "or was made to run code when loaded: use only checkpoints you trust") from None
    except Exception as err:  # a corrupt pickle fails in many ways (EOFError, ValueError, ...)
        raise DCPFormatError(f"{file}: corrupt checkpoint metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata) or metadata.storage_data is None:
        raise DCPFormatError(f"{file}: corrupt checkpoint metadata (not a DCP Metadata object)")
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class _RegionLoadPlanner(LoadPlanner):
    """Loads one region of one tensor key (or one byte object) into a given destination."""

    def __init__(self, key: str, offsets: tuple = (), out: torch.Tensor | None = None) -> None:
        self.key, self.offsets, self.out = key, tuple(offsets), out
        self.raw: bytes | None = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        if isinstance(md, BytesStorageMetadata):
            index = MetadataIndex(self.key)
            zero = torch.Size([0])
            return LoadPlan([ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=zero,
                                      storage_index=index, storage_offsets=zero, lengths=zero)])
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.raw = value.read()

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of ``out``: the data is already in place


class _NotRaw(Exception):
    """A region the raw reader does not serve (a chunk in another form): DCP reads it."""


class _NotATensorRecord(Exception):
    """``data.pkl`` holds something other than one plain tensor."""


# the storage classes ``torch.save`` names in a tensor's record, for the dtypes read raw
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def _tensor_record(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """What ``torch._utils._rebuild_tensor_v2`` would rebuild, as data (no tensor is made)."""
    if metadata or backward_hooks:
        raise _NotATensorRecord("tensor metadata or hooks")
    return storage, storage_offset, tuple(size), tuple(stride)


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads the ``data.pkl`` of ``torch.save(tensor)`` into (storage (dtype, key, numel), storage
    offset, size, stride); any other global or record is refused, so nothing in it can run code."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_record
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _NotATensorRecord(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _NotATensorRecord("storage record")
        return pid[1], pid[2], pid[4]


# A stored chunk is a ``torch.save`` zip archive: records stored uncompressed (``data.pkl``, then
# small ones, then the storage), each after a local header whose sizes are zero (a data
# descriptor follows the data), so sizes and offsets come from the central directory at the end.
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, name length, extra field length
_CENTRAL_ENTRY = struct.Struct("<4s4xHH4xIIIHHH8xI")  # signature, flags, method, CRC, sizes, lengths, offset
_END = struct.Struct("<4s4xHHII2x")  # signature, entries (this disk, all), directory size and offset
_ZIP64_LOCATOR = struct.Struct("<4s4xQ4x")  # signature, offset of the zip64 end record
_ZIP64_END = struct.Struct("<4s20xQQQQ")  # signature, entries (this disk, all), directory size and offset
_SATURATED = (0xFFFF, 0xFFFFFFFF)
_ARCHIVE_EDGE_BYTES = 4096  # the head (records before the storage) and tail (directory) of one archive


class _ArchiveBytes:
    """Reads of one archive ``[offset, offset + length)`` of an open file: its first and last
    few KB are read once (everything a chunk's record needs, in one archive from ``torch.save``)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length = fd, offset, length
        self.head = os.pread(fd, min(length, _ARCHIVE_EDGE_BYTES), offset)
        self.tail_start = max(0, length - _ARCHIVE_EDGE_BYTES)
        self.tail = os.pread(fd, length - self.tail_start, offset + self.tail_start)

    def read(self, start: int, size: int) -> bytes:
        if start < 0 or size < 0 or start + size > self.length:
            raise ValueError("outside the archive")
        if start + size <= len(self.head):
            return self.head[start:start + size]
        if start >= self.tail_start:
            return self.tail[start - self.tail_start:start - self.tail_start + size]
        data = os.pread(self.fd, size, self.offset + start)
        if len(data) != size:
            raise EOFError("archive cut short")
        return data

    def data_start(self, header: int) -> int:
        """Where the data of the record whose local header is at ``header`` starts."""
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(self.read(header, _LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise ValueError("no local header")
        return header + _LOCAL_HEADER.size + name_length + extra_length

    def record(self, entry: tuple[int, int, int]) -> bytes:
        """The bytes of one (small) record, checked against its CRC-32."""
        header, size, crc = entry
        data = self.read(self.data_start(header), size)
        if zlib.crc32(data) != crc:
            raise ValueError("record CRC-32 differs")
        return data


def _central_directory(archive: _ArchiveBytes) -> dict[str, tuple[int, int, int]]:
    """{record name: (local header offset, size, CRC-32)} of an archive of stored records."""
    end_at = archive.length - _END.size
    signature, entries, total, directory_size, directory_at = _END.unpack(archive.read(end_at, _END.size))
    if signature != b"PK\x05\x06":
        raise ValueError("no end of central directory (a comment, or not a zip archive)")
    if entries in _SATURATED or total in _SATURATED or directory_size in _SATURATED or directory_at in _SATURATED:
        signature, zip64_end = _ZIP64_LOCATOR.unpack(archive.read(end_at - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size))
        if signature != b"PK\x06\x07":
            raise ValueError("no zip64 locator")
        signature, entries, total, directory_size, directory_at = _ZIP64_END.unpack(
            archive.read(zip64_end, _ZIP64_END.size))
        if signature != b"PK\x06\x06":
            raise ValueError("no zip64 end record")
    directory, pos, records = archive.read(directory_at, directory_size), 0, {}
    for _ in range(total):
        signature, flags, method, crc, packed, size, name_length, extra_length, comment_length, header = \
            _CENTRAL_ENTRY.unpack_from(directory, pos)
        if signature != b"PK\x01\x02" or flags & 0x1 or method != 0:
            raise ValueError("not a plain stored record")
        name_at = pos + _CENTRAL_ENTRY.size
        extra = directory[name_at + name_length:name_at + name_length + extra_length]
        size, packed, header = _zip64_fields(extra, size, packed, header)
        if packed != size:
            raise ValueError("record sizes differ")
        records[directory[name_at:name_at + name_length].decode("utf-8")] = (header, size, crc)
        pos = name_at + name_length + extra_length + comment_length
    return records


def _zip64_fields(extra: bytes, size: int, packed: int, header: int) -> tuple[int, int, int]:
    """A central entry's size, packed size and header offset, the saturated ones taken from its
    zip64 extra field (id 1: 8 bytes each, in that order, only those saturated)."""
    values = [size, packed, header]
    if 0xFFFFFFFF not in values:
        return size, packed, header
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            at = pos + 4
            for i, value in enumerate(values):
                if value == 0xFFFFFFFF:
                    values[i] = struct.unpack_from("<Q", extra, at)[0]
                    at += 8
            return values[0], values[1], values[2]
        pos += 4 + length
    raise ValueError("no zip64 extra field")


@dataclass(frozen=True)
class _StoredChunk:
    """Where the elements of one stored chunk lie: in ``file``, the storage's element 0 at byte
    ``data_start``; the chunk is the view (``storage_offset``, ``size``, ``stride``) of it."""

    file: str
    data_start: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple
    stride: tuple

    @staticmethod
    def locate(path: str, info) -> _StoredChunk | None:
        """The chunk DCP stored at ``info`` (a ``torch.save`` zip archive inside a ``.distcp``
        file), or None unless it is one plain little-endian tensor stored uncompressed (then DCP
        reads it, and refuses it if it is corrupt or would run code)."""
        if getattr(info, "transform_descriptors", None) or sys.byteorder != "little":
            return None
        file = os.path.join(path, info.relative_path)
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                return _StoredChunk._in_archive(_ArchiveBytes(fd, info.offset, info.length), file)
            finally:
                os.close(fd)
        except Exception:  # noqa: BLE001 - any archive the raw reader cannot take apart is DCP's to read
            return None

    @staticmethod
    def _in_archive(archive: _ArchiveBytes, file: str) -> _StoredChunk | None:
        records = _central_directory(archive)
        pickles = [name for name in records if name.rsplit("/", 1)[-1] == "data.pkl"]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][:-len("data.pkl")]
        if f"{prefix}byteorder" in records and archive.record(records[f"{prefix}byteorder"]) != b"little":
            return None
        (dtype, key, numel), storage_offset, shape, stride = _TensorRecordUnpickler(
            io.BytesIO(archive.record(records[pickles[0]]))).load()
        start, size, _ = records[f"{prefix}data/{key}"]
        start = archive.data_start(start)
        if size != numel * dtype.itemsize or start + size > archive.length or len(shape) != len(stride) \
                or storage_offset < 0 or min(stride, default=0) < 0 or \
                (math.prod(shape) and storage_offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= numel):
            return None
        return _StoredChunk(file, archive.offset + start, dtype, storage_offset, tuple(shape), tuple(stride))

    def copy_region(self, start: list[int], dest: torch.Tensor) -> None:
        """Copy the region ``[start, start + dest.shape)`` of the chunk into ``dest``, reading only
        the bytes between its first and last element."""
        if dest.numel() == 0:
            return
        first = self.storage_offset + sum(a * s for a, s in zip(start, self.stride))
        count = 1 + sum((n - 1) * s for n, s in zip(dest.shape, self.stride))
        dense = count == dest.numel() and dest.is_contiguous() and \
            all(n == 1 or s == c for n, s, c in zip(dest.shape, self.stride, _contiguous_strides(dest.shape)))
        buffer = dest if dense else torch.empty(count, dtype=self.dtype)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            _pread_into(fd, memoryview(buffer.reshape(-1).view(torch.uint8).numpy()),
                        self.data_start + first * self.dtype.itemsize, self.file)
        finally:
            os.close(fd)
        if not dense:
            dest.copy_(buffer.as_strided(dest.shape, self.stride))


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _pread_into(fd: int, buffer: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(buffer):  # one pread returns at most ~2 GB
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise EOFError(f"{file} ends before the data its metadata points to (truncated)")
        done += n


class CheckpointReader:
    """Random access to the tensors and objects of one DCP folder (``model_optim``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._storage = FileSystemReader(path)
        self.metadata = read_dcp_metadata(path)  # once, safely: ``_load`` does not ask again
        self._storage.set_up_storage_reader(self.metadata, True)
        self._chunks: dict[MetadataIndex, _StoredChunk | None] = {}

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tensor_meta(self, key: str) -> TensorStorageMetadata | None:
        md = self.metadata.state_dict_metadata[key]
        return md if isinstance(md, TensorStorageMetadata) else None

    def read(self, key: str, offsets: tuple | None = None, sizes: tuple | None = None) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (the whole tensor by default):
        only the bytes of the region are read from each stored chunk it overlaps; a chunk stored in
        a form the raw reader does not take apart is read through DCP (the whole chunk)."""
        md = self.tensor_meta(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(md.size)
        sizes = tuple(sizes) if sizes is not None else tuple(md.size)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        try:
            self._read_raw(key, md, offsets, out)
        except _NotRaw:
            self._load(_RegionLoadPlanner(key, offsets, out))
        return out

    def _read_raw(self, key: str, md: TensorStorageMetadata, offsets: tuple, out: torch.Tensor) -> None:
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + n, c + m) for o, n, c, m in zip(offsets, out.shape, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            stored = self._stored_chunk(key, chunk)
            dest = out
            for dim, (a, b, o) in enumerate(zip(lo, hi, offsets)):
                dest = dest.narrow(dim, a - o, b - a)
            try:
                stored.copy_region([a - c for a, c in zip(lo, chunk.offsets)], dest)
            except (OSError, EOFError) as err:
                raise DCPFormatError(f"{self.path}: cannot read {key!r} ({type(err).__name__}: {str(err)[:300]}); "
                                     "the checkpoint is corrupt") from None

    def _stored_chunk(self, key: str, chunk: ChunkStorageMetadata) -> _StoredChunk:
        index = MetadataIndex(key, chunk.offsets)
        if index not in self._chunks:
            self._chunks[index] = None  # until it is known to be readable raw
            info = self.metadata.storage_data.get(index)
            if info is not None:  # (else DCP's read names the missing chunk)
                stored = _StoredChunk.locate(self.path, info)
                if stored is not None and stored.dtype == self.tensor_meta(key).properties.dtype \
                        and stored.size == tuple(chunk.sizes):
                    self._chunks[index] = stored
        if self._chunks[index] is None:
            raise _NotRaw(key)
        return self._chunks[index]

    def read_bytes(self, key: str) -> bytes:
        planner = _RegionLoadPlanner(key)
        self._load(planner)
        return planner.raw

    def _load(self, planner: _RegionLoadPlanner) -> None:
        # what ``dcp.load`` does for one process, minus its per-call metadata read, planning
        # round and logging (a shrink issues one load per layer and tensor)
        try:
            planner.set_up_planner({}, self.metadata, True)
            plan = planner.create_local_plan()
            self._storage.read_data(self._storage.prepare_local_plan(plan), planner).wait()
        except pickle.UnpicklingError as err:  # DCP's weights-only torch.load found more than tensor data
            found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line] or [str(err)]
            raise DCPFormatError(f"{self.path}: refused {planner.key!r}: its stored chunk is not plain tensor data "
                                 f"and would run code when loaded ({found[0].split(' Please use')[0].rstrip('.')[:300]}); the file is corrupt or was "
                                 "made to: use only checkpoints you trust") from None
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
            raise DCPFormatError(f"{self.path}: cannot read {planner.key!r} ({type(err).__name__}: "
                                 f"{str(err)[:300]}); the checkpoint is corrupt") from None


@dataclass
class OutTensor:
    """One tensor key of the checkpoint to write: global size, dtype, and its chunks' offsets and
    sizes; ``produce(chunk_index)`` returns the data of one chunk when the writer needs it."""

    key: str
    size: tuple
    dtype: torch.dtype
    chunks: list  # [(offsets, sizes)]
    produce: Callable[[int], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, tensors: list[OutTensor], objects: dict[str, bytes],
                 on_chunk: Callable[[OutTensor, torch.Tensor], None] | None) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = {t.key: t for t in tensors}
        self._objects = objects
        self._on_chunk = on_chunk

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        for t in self._tensors.values():
            properties = TensorProperties(dtype=t.dtype)
            for i, (offsets, sizes) in enumerate(t.chunks):
                items.append(WriteItem(
                    index=MetadataIndex(t.key, torch.Size(offsets), i), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                        properties=properties, size=torch.Size(t.size))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[key])
        t = self._tensors[key]
        data = t.produce(write_item.index.index).contiguous()
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(data.shape) != expected or data.dtype != t.dtype:
            raise AssertionError(f"{key} chunk {write_item.index.index}: produced {tuple(data.shape)} "
                                 f"{data.dtype}, planned {expected} {t.dtype}")
        if self._on_chunk is not None:
            self._on_chunk(t, data)
        return data


class _LazyWriter(FileSystemWriter):
    """One output file per ``max_file_bytes`` of data, filled and closed in order (through
    ``FileSystemWriter._write_data``, torch 2.13's per-file writer loop); then each is synced to
    disk while another thread takes its CRC-32 from the page cache (``checksums``, by file name):
    the disk's wait and the hashing overlap instead of following each other."""

    def __init__(self, path: str, max_file_bytes: int) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.max_file_bytes = max_file_bytes
        self.checksums: dict[str, str] = {}

    def write_data(self, plan: SavePlan, planner):
        buckets, current, size = [], [], 0
        for item in plan.items:
            n = 0
            if item.type != WriteItemType.BYTE_IO:
                n = math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
            if current and size + n > self.max_file_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(item)
            size += n
        if current:
            buckets.append(current)
        file_queue: queue.Queue = queue.Queue()
        files = {}
        for i, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            files[name] = self.fs.concat_path(self.path, name)
            file_queue.put((files[name], name, bucket))
        self.sync_files = False  # read by the loop for each data file: synced below instead
        try:
            written = self._write_data(planner, file_queue)
        finally:
            self.sync_files = True  # read by ``finish`` for ``.metadata``
        with ThreadPoolExecutor(1) as hasher:
            checksums = hasher.map(file_crc32, files.values())
            for file in files.values():
                fd = os.open(file, os.O_RDONLY)  # fsync syncs the file, whichever descriptor names it
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.checksums = dict(zip(files, checksums))
        return written


def write_lazily(path: str, tensors: list[OutTensor], objects: dict[str, bytes],
                 on_chunk: Callable[[OutTensor, torch.Tensor], None] | None = None,
                 max_file_bytes: int = 512 * 2**20) -> dict[str, str]:
    """Write a DCP folder at ``path`` (created) from lazily produced tensor chunks and raw objects
    (``objects`` hold bytes exactly as stored in another DCP folder, e.g. torch-saved objects).
    Returns the CRC-32 of each data file (``file_crc32``), by name, taken once it was complete."""
    os.makedirs(path, exist_ok=True)
    writer = _LazyWriter(path, max_file_bytes)
    dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(tensors, objects, on_chunk), no_dist=True)
    return writer.checksums
