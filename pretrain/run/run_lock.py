"""One run per output folder: a lock file that a second run on the same ``--save`` refuses.

Two runs writing one checkpoint folder overwrite each other's ``iter_*`` folders with no error
(each checkpoint is valid on its own, so nothing downstream can tell). Training therefore holds
``FOLDER/run.lock`` for its whole life:

- the lock is ``flock(2)`` on that file, so the kernel (or the NFS lock manager) drops it when
  the holder dies in any way, ``kill -9`` included: a dead run's lock is taken over, never
  obeyed;
- the file holds the holder's host, pid and start time, so the refusal names the run to look
  at;
- where the filesystem has no ``flock`` (Lustre mounted without ``-o flock``), the recorded
  host/pid is checked instead: a pid that no longer exists on this host is a stale lock; a lock
  from another host is obeyed, and the message says how to remove it.

A process that starts others on its behalf may pass its lock on (``held_descriptors``): with
local ``flock`` the children then hold it after the parent dies. Linux's NFS client emulates
``flock`` with process-owned ``fcntl`` locks, which children do not inherit: there a lock passed
on dies with its taker (a campaign checks each run's own lock before starting it for that
reason).

The file is removed when the run ends cleanly. Rank 0 alone takes the lock; the verdict goes to
every rank (``hold_output_folders``), so all ranks stop with the same message.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from pretrain.errors import FolderInUseError

LOCK_NAME = "run.lock"

_held: dict[str, tuple[int, bool]] = {}  # folder (absolute) -> (descriptor of its lock, whether we made the folder)


def _owner_text(owner: dict) -> str:
    return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}"
            + (f": {owner['command']}" if owner.get("command") else ""))


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        owner = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _write_owner(fd: int, command: str) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command[:500]}
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_dead_here(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
        and not _pid_alive(owner["pid"])


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _without_flock_owner_alive(owner: dict) -> bool:
    """Without flock: whether the recorded holder may still run (another host: assumed so)."""
    if not owner or owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return False
    return owner.get("host") != socket.gethostname() or not _is_dead_here(owner)


def _held_by_another(locked: bool | None, owner: dict) -> bool:
    """Whether a live run holds the lock, from ``_flock``'s answer and the recorded owner."""
    return locked is False or (locked is None and _without_flock_owner_alive(owner))


def _in_use(folder: str, flag: str, locked: bool | None, owner: dict) -> FolderInUseError:
    """The refusal of ``folder`` (absolute), held by ``owner``: what to do, and the holder apart."""
    hint = (f"if that run is gone (another host's crash), delete {os.path.join(folder, LOCK_NAME)}"
            if locked is None else "")
    orphaned = locked is False and _is_dead_here(owner)
    if orphaned:  # its forked children hold the lock still
        hint = f"pid {owner['pid']} has exited but processes it started still hold the lock: stop them"
    err = FolderInUseError(
        f"{flag} {folder} is in use by another run ({_owner_text(owner)}): two runs writing one checkpoint "
        f"folder overwrite each other's checkpoints. Wait for it to end, stop it, or give another {flag}"
        + (f"; {hint}" if hint else ""))
    err.owner, err.orphaned, err.hint = _owner_text(owner), orphaned, hint
    return err


def acquire(folder: str, flag: str = "--save", command: str = "") -> str:
    """Take ``folder``'s lock for this process (creating the folder); returns a note when a dead
    run's lock was taken over, else ''. Idempotent within a process. Raises FolderInUseError when
    a live run holds it, and OSError (e.g. a read-only folder) as the caller reports it."""
    folder = os.path.abspath(folder)
    if folder in _held:
        return ""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd)
            owner = _read_owner(fd)
            if _held_by_another(locked, owner):
                raise _in_use(folder, flag, locked, owner)
            # the holder may have removed the file (a clean end) between our open and our lock:
            # then this descriptor locks a deleted file, and the next run would lock a new one
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:  # removed between the lock and the stat: try again
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        break
    _write_owner(fd, command)
    _held[folder] = (fd, created)
    if owner.get("pid"):
        return (f"note: {flag} {folder}: took over the lock of a run that is no longer running "
                f"({_owner_text(owner)})")
    return ""


def check_free(folder: str, flag: str = "--save") -> None:
    """Raises FolderInUseError (as ``acquire`` would) when a live run holds ``folder``'s lock;
    takes and writes nothing: a caller about to start that run learns now that it would be refused."""
    folder = os.path.abspath(folder)
    if folder in _held:
        return
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR)  # (NFS emulates flock with write locks)
    except (FileNotFoundError, PermissionError):  # no lock, or one the run itself will report it cannot take
        return
    try:
        locked = _flock(fd)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        owner = _read_owner(fd)
    finally:
        os.close(fd)
    if _held_by_another(locked, owner):
        raise _in_use(folder, flag, locked, owner)


def release(folder: str) -> None:
    """Drop this process's lock on ``folder`` and remove the file (a clean end), and the folder
    itself when this run made it and wrote nothing there (a run refused at start leaves nothing)."""
    folder = os.path.abspath(folder)
    fd, created = _held.pop(folder, (None, False))
    if fd is None:
        return
    try:
        os.unlink(os.path.join(folder, LOCK_NAME))
        if created and not os.listdir(folder):
            os.rmdir(folder)
    except OSError:
        pass  # a read-only or vanished folder: the lock dies with the descriptor anyway
    os.close(fd)


def held_descriptors() -> tuple[int, ...]:
    """The descriptors of this process's locks: a process that starts others on its behalf (a
    campaign starting its runs) passes them on, so a child left running after its parent was
    killed still holds the lock and the next one is refused until the child ends (local
    filesystems; not NFS: module docstring)."""
    return tuple(fd for fd, _ in _held.values())


def release_all() -> None:
    for folder in list(_held):
        release(folder)
