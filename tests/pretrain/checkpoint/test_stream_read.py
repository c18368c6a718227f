"""``CheckpointReader`` reads a region's bytes straight out of each stored chunk's ``torch.save``
archive (issue 32): what it reads equals DCP's own read, it reads no more than the region spans
(one layer of a key stored as one chunk of all layers), what it cannot take apart DCP still reads,
and a chunk that is truncated or would run code is refused with DCPFormatError. A shrink through
the raw reads writes exactly the tensors the DCP reads gave."""

from __future__ import annotations

import io
import os
import pickle
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from pretrain.checkpoint.stream import CheckpointReader, DCPFormatError, OutTensor, _NotRaw, write_lazily

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "old_checkpoints")


def _dcp_full(path: str, key: str, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``key`` read by DCP's public load (the oracle)."""
    out = {key: torch.empty_like(like)}
    dcp.load(out, storage_reader=FileSystemReader(path), no_dist=True)
    return out[key]


def _no_dcp_reads(monkeypatch) -> None:
    def refuse(self, planner):
        raise AssertionError(f"{planner.key} was read through DCP, not raw")
    monkeypatch.setattr(CheckpointReader, "_load", refuse)


def _regions(size: tuple, n: int, rng: random.Random) -> list[tuple[tuple, tuple]]:
    out = [((0,) * len(size), size)]
    for _ in range(n):
        offsets = tuple(rng.randrange(s) for s in size)
        out.append((offsets, tuple(rng.randint(1, s - o) for s, o in zip(size, offsets))))
    return out


def _write_one(path, tensor: torch.Tensor) -> None:
    write_lazily(str(path), [OutTensor("w", tuple(tensor.shape), tensor.dtype,
                                       [((0,) * tensor.dim(), tuple(tensor.shape))], lambda _: tensor)], {})


def _replace_chunk(folder, obj) -> None:
    """Make ``torch.save(obj)`` the stored chunk of ``w`` (the metadata's key, dtype and size kept)."""
    payload = io.BytesIO()
    torch.save(obj, payload)
    (folder / "__0_0.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, len(payload.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def test_raw_reads_equal_dcp_reads_across_chunks(tmp_path, monkeypatch):
    torch.manual_seed(0)
    full = {"w": torch.randn(6, 10, 8), "b": torch.randn(6, 10).bfloat16(), "i": torch.arange(24).view(4, 6)}
    # "w" in three chunks (layers 0-1 whole, layers 2-5 split in rows), "b" in two, "i" in one
    chunks = {"w": [((0, 0, 0), (2, 10, 8)), ((2, 0, 0), (4, 5, 8)), ((2, 5, 0), (4, 5, 8))],
              "b": [((0, 0), (6, 4)), ((0, 4), (6, 6))], "i": [((0, 0), (4, 6))]}

    def produce(key):
        def chunk(i):
            (offsets, sizes) = chunks[key][i]
            region = full[key]
            for d, (o, s) in enumerate(zip(offsets, sizes)):
                region = region.narrow(d, o, s)
            return region
        return chunk

    tensors = [OutTensor(k, tuple(t.shape), t.dtype, chunks[k], produce(k)) for k, t in full.items()]
    write_lazily(str(tmp_path / "dcp"), tensors, {})
    _no_dcp_reads(monkeypatch)
    reader = CheckpointReader(str(tmp_path / "dcp"))
    rng = random.Random(0)
    for key, t in full.items():
        assert torch.equal(_dcp_full(str(tmp_path / "dcp"), key, t), t)
        for offsets, sizes in _regions(tuple(t.shape), 20, rng):
            expected = t
            for d, (o, s) in enumerate(zip(offsets, sizes)):
                expected = expected.narrow(d, o, s)
            got = reader.read(key, offsets, sizes)
            assert got.dtype == t.dtype and torch.equal(got, expected), (key, offsets, sizes)


def test_a_stored_view_is_read_through_its_strides(tmp_path, monkeypatch):
    """``torch.save`` of a view stores the whole storage, with the view's offset and strides."""
    base = torch.randn(7, 12)
    view = base[1:, 2::3].t()  # (4, 6), storage offset 14, strides (3, 12)
    _write_one(tmp_path / "dcp", view.contiguous())
    _replace_chunk(tmp_path / "dcp", view)
    reader = CheckpointReader(str(tmp_path / "dcp"))
    stored = reader._stored_chunk("w", reader.tensor_meta("w").chunks[0])
    assert (stored.storage_offset, stored.stride) == (14, (3, 12))  # the case this test is about
    _no_dcp_reads(monkeypatch)
    for offsets, sizes in _regions((4, 6), 20, random.Random(1)):
        assert torch.equal(reader.read("w", offsets, sizes),
                           view[offsets[0]:offsets[0] + sizes[0], offsets[1]:offsets[1] + sizes[1]])


def test_one_layer_of_a_one_chunk_key_reads_only_that_layer(tmp_path, monkeypatch):
    stacked = torch.randn(4, 16, 8)
    dcp.save({"w": stacked}, storage_writer=FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    reader = CheckpointReader(str(tmp_path / "dcp"))
    assert len(reader.tensor_meta("w").chunks) == 1
    reader.read("w", (0, 0, 0), (1, 16, 8))  # the archive is taken apart once
    read_bytes = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: read_bytes.append(real(fd, buffers, offset))
                        or read_bytes[-1])
    assert torch.equal(reader.read("w", (2, 0, 0), (1, 16, 8))[0], stacked[2])
    assert sum(read_bytes) == 16 * 8 * 4  # one layer, not the chunk's four


class _WritesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_truncated_or_code_running_chunks_are_refused(tmp_path):
    _write_one(tmp_path / "cut", torch.randn(64, 64))
    data = tmp_path / "cut" / "__0_0.distcp"
    reader = CheckpointReader(str(tmp_path / "cut"))
    reader.read("w", (0, 0), (1, 64))  # its archive taken apart while whole
    data.write_bytes(data.read_bytes()[:-9000])  # then cut inside the tensor's bytes
    for fresh in (False, True):  # the raw read finds the end; a new reader's DCP read the broken archive
        with pytest.raises(DCPFormatError, match=r"cut: cannot read 'w' .*the checkpoint is corrupt"):
            (CheckpointReader(str(tmp_path / "cut")) if fresh else reader).read("w")

    # a chunk whose archive unpickles into a call (same key, dtype and size in the metadata)
    _write_one(tmp_path / "bad", torch.randn(2, 3))
    marker = tmp_path / "code_ran"
    _replace_chunk(tmp_path / "bad", _WritesMarker(str(marker)))
    reader = CheckpointReader(str(tmp_path / "bad"))
    with pytest.raises(DCPFormatError, match=r"bad: refused 'w': .*would run code when loaded \(WeightsUnpickler error: Unsupported global: GLOBAL io.open was not an allowed global by default\); "):
        reader.read("w")
    assert reader._chunks and all(stored is None for stored in reader._chunks.values())  # not read raw
    assert not marker.exists()


def _through_dcp(monkeypatch) -> None:
    """Every region read through DCP, as before the raw reads."""
    def not_raw(self, key, md, offsets, out):
        raise _NotRaw(key)
    monkeypatch.setattr(CheckpointReader, "_read_raw", not_raw)


def _all_of(path: str) -> dict:
    """Every tensor (as its bytes) and byte object of a DCP folder."""
    reader = CheckpointReader(path)
    return {key: reader.read_bytes(key) if reader.tensor_meta(key) is None else
            (reader.tensor_meta(key).properties.dtype, reader.read(key).reshape(-1).view(torch.uint8))
            for key in reader.keys()}


def test_a_shrink_through_raw_reads_writes_what_dcp_reads_gave(tmp_path, monkeypatch):
    """The megatron fixture (TP=2 chunks, masks in progress) shrunk twice, through raw reads and
    through DCP's reads as before: every tensor of the two outputs is the same, bit for bit."""
    from pretrain.checkpoint import atomic
    from pretrain.checkpoint.files import MODEL_OPTIM_DIR
    from pretrain.shrink import reshard_checkpoint

    source = os.path.join(FIXTURES, "megatron", "iter_0000004")
    raw = reshard_checkpoint(source, str(tmp_path / "raw"), shrink=True, progress=False)["folder"]
    with monkeypatch.context() as m:
        _through_dcp(m)
        old = reshard_checkpoint(source, str(tmp_path / "dcp"), shrink=True, progress=False)["folder"]
        expected = _all_of(os.path.join(old, MODEL_OPTIM_DIR))
    got = _all_of(os.path.join(raw, MODEL_OPTIM_DIR))
    atomic._verified.clear()
    atomic.verify_checkpoint(raw)  # the manifest's CRC-32s (the data file's taken by its writer) match the files
    assert sorted(got) == sorted(expected) and any(k.startswith("optimizer.state.exp_avg_sq.") for k in got)
    for key, value in got.items():
        if isinstance(value, bytes):
            assert value == expected[key], key
        else:
            assert value[0] == expected[key][0] and torch.equal(value[1], expected[key][1]), key


def test_written_data_files_are_synced_and_their_checksums_returned(tmp_path, monkeypatch):
    from pretrain.checkpoint.atomic import file_crc32

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    t = torch.randn(4, 64, 64)
    checksums = write_lazily(str(tmp_path / "dcp"), [OutTensor("w", (4, 64, 64), t.dtype, [
        ((i, 0, 0), (1, 64, 64)) for i in range(4)], lambda i: t[i:i + 1])], {}, max_file_bytes=2 * 64 * 64 * 4)
    files = sorted(n for n in os.listdir(tmp_path / "dcp") if n.endswith(".distcp"))
    assert len(files) == 2 and checksums == {n: file_crc32(str(tmp_path / "dcp" / n)) for n in files}
    assert {str(tmp_path / "dcp" / n) for n in files} | {str(tmp_path / "dcp" / ".metadata.tmp")} <= set(synced)


def test_a_shrink_runs_without_collector_on_one_thread_and_restores_both():
    import gc

    from pretrain.shrink import _streaming

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with pytest.raises(KeyError):
                with _streaming():
                    assert not gc.isenabled() and torch.get_num_threads() == 1
                    raise KeyError("a failed shrink")
            assert gc.isenabled() == enabled and torch.get_num_threads() == 2
    finally:
        gc.enable()
        torch.set_num_threads(threads)
