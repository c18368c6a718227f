"""Output paths: one check before any work and one message when writing fails, for every entry
point that writes (training's ``--save`` and ``--tensorboard-dir``, the converters, the reshard
tool, evaluation's ``--output``, merge).

``require_writable`` runs first, so a read-only or misplaced output is found in a second, not
after hours of training or converting. A disk that fills up while writing can only be found then:
``write_failure`` turns the error (``OSError``, safetensors' and DCP's wrapped errors, a
``CheckpointError``) into the one message users see for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

from data_prep.durable import replace_durably, sync_folder
from pretrain.errors import OutputError

# errors that say the place cannot take the output, whichever file was being written
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_WRITE_REASONS = tuple(os.strerror(e) for e in _WRITE_ERRNOS)
DISK_FULL = os.strerror(errno.ENOSPC)


def require_writable(path: str, flag: str, folder: bool = True) -> None:
    """Raise OutputError unless ``path`` (a folder, or a file when ``folder`` is False) can be
    created or written: its nearest existing ancestor must be a folder in which a file can be made.
    A real probe file (made and removed at once), not permission bits: root ignores those, and a
    read-only mount or a full quota shows only on writing. Nothing is left behind."""
    target = os.path.abspath(path)
    if os.path.exists(target) and os.path.isdir(target) != folder:
        kind = "a folder" if folder else "a file"
        raise OutputError(f"{flag} {path}: it exists and is not {kind}; choose another path")
    parent = target if folder and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write in {parent} ({err.strerror or err}); choose a writable "
                          "folder") from None


def write_error_reason(err: BaseException, under: str | None = None) -> str | None:
    """Why writing failed, when ``err`` (or anything in its chain, DCP's per-rank failures included)
    says the output's place cannot take it: a full or read-only disk, a quota, or any ``OSError``
    on a file under ``under``. None for other errors (a bug, a corrupt input)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        for reason in _WRITE_REASONS:  # safetensors, shutil.Error and CheckpointError keep only the text
            if reason.lower() in text.lower():
                return reason
        if under and isinstance(e, OSError) and e.strerror and any(
                str(name or "").startswith(os.path.abspath(under)) for name in (e.filename, e.filename2)):
            return e.strerror
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():  # CheckpointException: rank -> error
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def write_failure(err: BaseException, path: str, flag: str, under: str | None = None) -> OutputError | None:
    """The OutputError to raise for a failed write of ``path`` (given by ``flag``), or None when
    ``err`` is not a write failure (see ``write_error_reason``). Call it after removing the
    partial output: the message says nothing was written."""
    reason = write_error_reason(err, under)
    if reason is None:
        return None
    return OutputError(f"{flag} {path}: cannot write it ({reason}); nothing was written. Choose a writable "
                       "folder with free space")


def write_output_file(path: str, text: str, flag: str) -> None:
    """Write a small output file (results, a report) whole or not at all: into a temporary
    name beside it, then renamed; its folder is made if needed. Raises OutputError on failure."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        replace_durably(tmp, path)
        sync_folder(os.path.dirname(path))
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_failure(err, path, flag, under=os.path.dirname(path)) or err from None
