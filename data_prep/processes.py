"""Helper processes that must not outlive the process that started them (issue 31 item 8).

Here, not in ``pretrain/``, because the data tools use it without importing torch; training's
checkpoint save server uses the same function.
"""

from __future__ import annotations

import os


def die_with_parent(parent_pid: int) -> None:
    """In a helper process (a preprocessing partition or pool worker, the checkpoint save server):
    ask Linux for SIGKILL when the parent dies, so a parent killed with SIGKILL leaves nothing
    running; exit if it already died."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the helper outlives a killed parent, as before
        return
    if os.getppid() != parent_pid:
        os._exit(0)


_fork_hook_installed = False


def forked_children_die_with_us() -> None:
    """From now on every process this one forks without exec gets the parent-death signal too.
    ``PR_SET_PDEATHSIG`` does not survive fork, and megatron-core's checkpoint writer forks one
    process per write bucket: a writer whose rank is killed mid-save blocks forever flushing its
    results queue to a reader that is gone (and keeps multiprocessing's resource tracker alive).
    libc's ``prctl`` is looked up here, in the parent: the child only calls it. Idempotent."""
    global _fork_hook_installed
    import ctypes
    import signal

    if _fork_hook_installed:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: as before
        return
    forking = {"pid": os.getpid()}

    def before() -> None:
        forking["pid"] = os.getpid()

    def in_child() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != forking["pid"]:  # the parent died before the signal was armed
            os._exit(0)

    os.register_at_fork(before=before, after_in_child=in_child)
    _fork_hook_installed = True
