"""Writing checkpoints and output folders whole or not at all, and reading back that they are whole.

Every output folder is written under a staging name (``staged``) and renamed into place only when
complete; a failure removes the staging folder, so nothing half-written is ever taken as valid and
nothing valid is replaced by it. A checkpoint folder gets a manifest (every file's size and CRC-32)
just before its rename, and the ``latest`` file is updated last (``publish_checkpoint``). On load,
a folder whose manifest is missing or does not match the files on disk (missing, truncated, or
corrupted at the same size: the CRC-32 differs) is refused (``verify_checkpoint``). Retention
(``prune_old_checkpoints``) only ever deletes checkpoints older than the one just written, and
counts only valid ones towards the number kept.

A rename is only as durable as what it renames: every file and folder is synced to the disk
before the rename that publishes it (``sync_file`` as each file is described for the manifest,
``_sync_folders`` just before the rename), so a power cut after the ``latest`` pointer moved (and
retention deleted the older checkpoint) cannot leave a published checkpoint with empty files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future

import torch

from data_prep.durable import sync_file, sync_folder
from pretrain.checkpoint.files import (LATEST_FILE, MANIFEST, CheckpointError, is_iteration_name, iteration_dir,
                                       iterations)
from pretrain.distributed import is_rank0
from pretrain.outputs import DISK_FULL, OutputError, require_writable, write_error_reason, write_failure

_HASH_CHUNK_BYTES = 8 * 2**20


def this_rank() -> int:
    """This process's rank in the world (0 without one)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def warn(message: str) -> None:
    if is_rank0():
        print(f"WARNING: {message}", flush=True)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- staging -------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged(tmp: str, temporary: bool = False) -> Iterator[str]:
    """``with staged(tmp) as tmp:`` a fresh, empty folder to write into (a leftover of an earlier,
    interrupted attempt is removed first). Publishing it (a rename into place) is the block's last
    statement; on any failure the folder is removed and the error goes on. ``temporary``: the
    folder is a step on the way (never published) and is removed whatever happens."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if temporary:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_folder(save: str) -> str:
    """Where a whole output folder ``save`` is written before ``publish_folder`` renames it into
    place: ``SAVE.tmp`` beside it."""
    return os.path.abspath(save).rstrip("/") + ".tmp"


def publish_folder(tmp: str, save: str) -> None:
    """Rename the finished staging folder to ``save`` (which may be an empty folder the user made),
    its files and folders synced to the disk first."""
    for rel in _files_of(tmp, every=True):
        sync_file(os.path.join(tmp, rel))
    _sync_folders(tmp)
    if os.path.isdir(save):
        os.rmdir(save)
    os.replace(tmp, save)
    sync_folder(os.path.dirname(os.path.abspath(save)))


@contextlib.contextmanager
def staged_output(save: str, flag: str = "--save") -> Iterator[str]:
    """``with staged_output(save) as tmp:`` write a whole new output folder into ``tmp``; on a
    clean exit it is published as ``save``, on any failure removed. A write failure (a read-only
    or full disk) becomes one OutputError naming ``flag``; ``save`` was checked writable already
    (``require_writable``), so this is for what shows only while writing."""
    require_writable(save, flag)
    tmp = staging_folder(save)
    try:
        with staged(tmp):
            yield tmp
            publish_folder(tmp, save)
    except BaseException as err:
        failure = write_failure(err, save, flag, under=tmp)
        if failure is None:
            raise
        raise failure from None


def require_new_folder(path: str, flag: str, overwrite: bool | None = None) -> None:
    """``require_writable`` for an output folder that must not exist yet (or be empty): a
    conversion never mixes its files with what is there. ``overwrite``: None for a command that
    cannot replace anything; False/True for one with ``--overwrite`` (the reshard tool, which
    writes one ``iter_N`` beside what is there: its interrupted ``iter_N.tmp`` leftovers do not
    count, and with True a non-empty folder is accepted)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} already exists and is not a folder; choose a new folder or remove it")
    entries = sorted(n for n in os.listdir(path) if overwrite is None or not n.endswith(".tmp")) \
        if os.path.isdir(path) else []
    if entries and not overwrite:
        shown = f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
        raise OutputError(f"{flag} {path} already exists and is not empty ({shown}): choose a new folder or remove it"
                          + ("" if overwrite is None else ", or pass --overwrite to replace the checkpoint of the "
                             "same iteration there and point its latest file at the new one"))
    require_writable(path, flag)


def save_failure_message(err: BaseException, tmp: str) -> str:
    if is_disk_full(err, tmp):
        return (f"no space left on device while saving {tmp} (free space on that disk, or --save to "
                "another one, then resume with --load)")
    return f"cannot save {tmp}: {type(err).__name__}: {str(err)[:500]}"


def is_disk_full(err: BaseException, tmp: str) -> bool:
    """ENOSPC anywhere in the error's chain (DCP wraps the writer's error per rank; torch.save
    reports only 'file write failed'), or a disk left with (almost) no free space."""
    if write_error_reason(err) == DISK_FULL:
        return True
    try:
        return shutil.disk_usage(os.path.dirname(tmp) or ".").free < _HASH_CHUNK_BYTES
    except OSError:
        return False


# --- manifest and checksums ----------------------------------------------------------------------

def _files_of(folder: str, every: bool = False) -> list[str]:
    """Every file under ``folder`` but the manifest (``every``: the manifest too), as sorted
    relative paths."""
    files = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if every or rel != MANIFEST:
                files.append(rel)
    return sorted(files)


def _sync_folders(folder: str) -> None:
    """Sync ``folder`` and every folder under it, deepest first: their entries (the names of the
    files just written) reach the disk before ``folder`` is renamed into place."""
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):
        sync_folder(dirpath)


def file_crc32(path: str) -> str:
    """CRC-32 of a file, read in 8 MB chunks into one buffer (about 5 GB/s on one core)."""
    crc = 0
    buffer = memoryview(bytearray(_HASH_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(buffer[:n], crc)
    return f"{crc:08x}"


def _describe_files(folder: str, names: list[str], checksums: dict[str, str] | None = None) -> dict[str, dict]:
    """Size and CRC-32 of each file (from ``checksums`` where given), each synced to the disk: the
    manifest that vouches for a file is written only once the file is durable."""
    checksums = checksums or {}
    files = {}
    for rel in names:
        path = os.path.join(folder, rel)
        # read first, then sync: on a shared filesystem another node's rank may have written the
        # file, and reading it makes that node hand its cached pages to the server the sync commits
        crc = checksums.get(rel) or file_crc32(path)
        sync_file(path)
        files[rel] = {"size": os.path.getsize(path), "crc32": crc}
    return files


def describe_files_collectively(folder: str) -> dict[str, dict]:
    """Sizes and checksums of every file in ``folder``: each rank reads its share of the files
    (they are still in the page cache), rank 0 gets the whole table. Collective; a read error on
    any rank raises CheckpointError on every rank."""
    names = _files_of(folder)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    try:
        mine: dict | str = _describe_files(folder, names[this_rank()::world])
    except OSError as err:  # reading back or syncing (a full disk, an I/O error): the save failed
        mine = f"rank {this_rank()}: {save_failure_message(err, folder)}"
    shares = [mine]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    failed = [share for share in shares if isinstance(share, str)]
    if failed:
        raise CheckpointError(failed[0])
    return {rel: entry for share in shares for rel, entry in share.items()}


# checkpoints whose checksums were verified (or computed, by ``publish_checkpoint``) in this process,
# by the identity of the manifest and of every file (size, mtime): a run reads its checkpoint once
# to choose it and once to load it, and hashes it only the first time; a file rewritten since then
# is hashed again
_verified: set[tuple] = set()


def _identity(folder: str, names: list[str]) -> tuple:
    stats = [os.stat(os.path.join(folder, rel)) for rel in [MANIFEST, *names]]
    return (os.path.realpath(folder),) + tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def verify_checkpoint(folder: str, checksums: bool = True) -> None:
    """Raise CheckpointError unless ``folder`` is a complete checkpoint: every file the manifest
    names exists with its size and (when ``checksums`` and the manifest has them) its CRC-32."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not complete")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        expected = {rel: entry if isinstance(entry, dict) else {"size": entry}
                    for rel, entry in manifest["files"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError, OSError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for rel, entry in expected.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: file {rel} is missing")
        actual = os.path.getsize(path)
        if actual != entry.get("size"):
            raise CheckpointError(f"{folder}: file {rel} has {actual} bytes, expected {entry.get('size')} "
                                  "(truncated?)")
    identity = _identity(folder, sorted(expected))
    if not checksums or identity in _verified:
        return
    for rel, entry in expected.items():
        if "crc32" in entry and file_crc32(os.path.join(folder, rel)) != entry["crc32"]:
            raise CheckpointError(f"{folder}: file {rel} is corrupt (its CRC-32 differs from the one "
                                  "saved with it; same size, different bytes)")
    _verified.add(identity)


def verify_in_background(folder: str) -> Future:
    """``verify_checkpoint(folder)`` on a thread of its own; ``result()`` raises its CheckpointError.
    zlib and file reads release the GIL, so a caller that reads the folder meanwhile (the shrink)
    hides the checksums behind its own work on another core; it must not take the folder as valid
    before ``result()`` returns."""
    future: Future = Future()

    def verify() -> None:
        try:
            verify_checkpoint(folder)
            future.set_result(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, whatever it is
            future.set_exception(err)

    threading.Thread(target=verify, name=f"verify {folder}", daemon=True).start()
    return future


def find_checkpoint(root: str, skipped: list[str] | None = None, checksums: bool = True) -> str | None:
    """The newest valid checkpoint folder under ``root`` (or ``root`` itself if it is one).

    Prefers the ``latest`` pointer; a broken newest checkpoint is reported and skipped (and its
    reason appended to ``skipped``, for a caller that finds no valid one to explain why).
    ``checksums=False``: complete by the manifest's sizes only, for a caller that verifies the
    checksums itself (``verify_in_background``) and looks again with them if they differ.
    """
    if os.path.isfile(os.path.join(root, MANIFEST)) or is_iteration_name(root):
        verify_checkpoint(root, checksums)
        return root
    if not os.path.isdir(root):
        return None
    candidates = iterations(root)
    latest_path = os.path.join(root, LATEST_FILE)
    if os.path.isfile(latest_path):
        try:
            latest = int(open(latest_path).read().strip())
            candidates = [latest] + [c for c in candidates if c != latest]
        except ValueError:
            warn(f"{latest_path} is unreadable; looking for the newest valid checkpoint")
    for iteration in candidates:
        folder = iteration_dir(root, iteration)
        try:
            verify_checkpoint(folder, checksums)
            return folder
        except CheckpointError as err:
            warn(f"skipping invalid checkpoint: {err}")
            if skipped is not None:
                skipped.append(str(err))
    return None


# --- publication and retention -------------------------------------------------------------------

def publish_checkpoint(root: str, iteration: int, tmp: str, world_size: int = 1,
                       files: dict[str, dict] | None = None, remember_verified: bool = False,
                       checksums: dict[str, str] | None = None) -> str:
    """Make the complete folder ``tmp`` the checkpoint of ``iteration`` under ``root``: write its
    manifest (``files``: size and CRC-32 of each file, read back from them, computed here if not
    given; ``checksums``: the CRC-32s of some, by relative path, read back by their writer once
    complete), rename it into place, then point ``latest`` at it (one process calls this).
    ``remember_verified``: this process will not hash it again when it loads it (the in-run shrink
    reads the save it follows, the next segment the shrink's output): those CRCs were just read
    from these very files, still in the page cache, so a second pass would find what the first did."""
    final = iteration_dir(root, iteration)
    if files is None:
        files = _describe_files(tmp, _files_of(tmp), checksums)
    manifest = {"iteration": iteration, "files": files, "world_size": world_size, "checksum": "crc32"}
    atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    _sync_folders(tmp)
    replaced = None
    if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): replace it
        replaced = f"{final}.replaced-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    sync_folder(root)
    if remember_verified:
        _verified.add(_identity(final, sorted(files)))
    atomic_write_text(os.path.join(root, LATEST_FILE), str(iteration))
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


@contextlib.contextmanager
def staged_checkpoint(root: str, iteration: int) -> Iterator[str]:
    """``with staged_checkpoint(root, iteration) as tmp:`` write one checkpoint's files into
    ``tmp`` (``iter_N.tmp``); on a clean exit it is published (``publish_checkpoint``) as
    ``iteration_dir(root, iteration)``, on any failure removed."""
    with staged(iteration_dir(root, iteration) + ".tmp") as tmp:
        yield tmp
        publish_checkpoint(root, iteration, tmp)


def prune_old_checkpoints(root: str, keep_last: int, current: int) -> list[str]:
    """Retention after saving iteration ``current``: keep it and the ``keep_last - 1`` newest
    *valid* checkpoints older than it; delete the other older ones. Checkpoints newer than
    ``current`` (left from a run resumed from an older checkpoint) are not touched, and an invalid
    checkpoint never counts towards ``keep_last``. Returns the deleted folders."""
    kept, deleted = 1, []
    for it in (i for i in iterations(root) if i < current):
        folder = iteration_dir(root, it)
        if kept < keep_last and _is_valid(folder):
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def _is_valid(folder: str) -> bool:
    try:
        verify_checkpoint(folder)
        return True
    except CheckpointError as err:
        warn(f"retention: {err}; not counted among the checkpoints kept")
        return False
