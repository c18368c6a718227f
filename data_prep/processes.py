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
