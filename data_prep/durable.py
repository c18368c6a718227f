"""Renames that publish a finished file only once it is on the disk.

A rename is only as durable as what it renames: after a power cut, a file renamed into place
before its data reached the disk can be there with its final name and no content. So a finished
temporary file is synced before the rename that publishes it (``replace_durably``), and the
folder after (``sync_folder``), so that the new name itself survives. Every output of the
system goes through these (checkpoints: ``pretrain.checkpoint.atomic``).
"""

from __future__ import annotations

import errno
import os

# what a filesystem that cannot sync a folder answers (its entries are then as durable as it makes them)
_CANNOT_SYNC_FOLDERS = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM)


def sync_file(path: str) -> None:
    """Flush ``path``'s data to the disk (``fsync``; whichever descriptor names the file, and
    cheap for a file its writer synced already). fsync's own error names no file: this one does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        os.close(fd)


def sync_folder(path: str) -> None:
    """Sync a folder's entries to the disk; an error other than "this filesystem cannot" is
    raised, naming the folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in _CANNOT_SYNC_FOLDERS:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _CANNOT_SYNC_FOLDERS:
            raise OSError(err.errno, err.strerror, path) from None
    finally:
        os.close(fd)


def replace_durably(tmp: str, final: str) -> None:
    """``os.replace(tmp, final)`` once ``tmp`` is on the disk. The caller syncs the folder
    (``sync_folder``) after its last rename."""
    sync_file(tmp)
    os.replace(tmp, final)
