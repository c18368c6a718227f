"""Runs on several nodes: which folders the ranks share, found by looking rather than assumed.

A folder is named by one path on every node, but what a rank finds there depends on its node: a
parallel filesystem shows every node the same files, a node-local disk (``/tmp``, a scratch SSD)
shows each node its own. Every node's first rank writes a marker into the folder and every rank
looks for them; a rank's *leader* is the lowest rank whose marker it sees (0 everywhere on a
shared folder, each node's first rank on node-local disks).
"""

from __future__ import annotations

import os
import socket
import time

import torch

from pretrain.config import ConfigError
from pretrain.distributed import launch_environment

_MARKER = ".node-view-"


def _world() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def folder_leaders(folder: str, flag: str) -> tuple[list[int], list[str]]:
    """For every rank, the lowest rank that sees the same contents of ``folder`` (created if
    missing), and every rank's host. Collective; a rank that cannot create or write the folder
    stops every rank with a ConfigError naming ``flag``."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    token = [f"{os.getpid()}-{time.time_ns()}"]  # this check's markers, not an earlier run's
    torch.distributed.broadcast_object_list(token, src=0)

    def marker(r: int) -> str:
        return os.path.join(folder, f"{_MARKER}{token[0]}-{r}")

    writes = launch_environment()[2] == 0  # each node's first rank: its node's view
    error = None
    try:
        os.makedirs(folder, exist_ok=True)
        if writes:
            open(marker(rank), "w").close()
    except OSError as err:
        error = f"rank {rank} on {socket.gethostname()}: {err.strerror or err}"
    states = [None] * world
    torch.distributed.all_gather_object(states, (error, writes, socket.gethostname()))
    failed = [e for e, _, _ in states if e]
    if failed:
        if writes and not error:
            os.remove(marker(rank))
        raise ConfigError(f"{flag} {folder}: cannot create or write it ({failed[0]}); give {flag} a writable folder")
    # looked up by name, lowest first: one lookup per rank on a shared folder, and a name never
    # asked before is not answered from a network filesystem's cache (a directory listing may be)
    writers = [r for r, (_, w, _) in enumerate(states) if w]
    leader = next((w for w in writers if os.path.exists(marker(w))), rank)
    leaders = [None] * world
    torch.distributed.all_gather_object(leaders, leader)  # returns once every rank has looked
    if writes:
        os.remove(marker(rank))
    if any(leaders[leader] != leader for leader in leaders):
        # a rank sees a node whose first rank sees yet another: no filesystem does this
        raise ConfigError(f"{flag} {folder}: the ranks see inconsistent contents of this folder "
                          f"(leaders {leaders[:16]}); give {flag} a folder on one filesystem")
    return leaders, [host for _, _, host in states]


def check_shared(folder: str | None, flag: str, why: str) -> None:
    """Stop every rank with one message when some rank does not see what rank 0 writes in
    ``folder``. Collective (nothing to do for one rank or no folder)."""
    if not folder or _world() == 1:
        return
    leaders, hosts = folder_leaders(folder, flag)
    blind = [r for r, leader in enumerate(leaders) if leader != 0]
    if blind:
        where = ", ".join(f"{r} on {hosts[r]}" for r in blind[:8]) + (" ..." if len(blind) > 8 else "")
        raise ConfigError(f"{flag} {folder} is not shared: rank(s) {where} do not see what rank 0 (on "
                          f"{hosts[0]}) writes there. {why}: give {flag} a folder on a filesystem every node mounts")


def check_same_everywhere(value, what: str) -> None:
    """Stop every rank when ``value`` (what this rank found, e.g. the --load checkpoint) is not the
    same on every rank. Collective."""
    if _world() == 1:
        return
    values = [None] * _world()
    torch.distributed.all_gather_object(values, (value, socket.gethostname()))
    differ = [r for r, (v, _) in enumerate(values) if v != values[0][0]]
    if differ:
        r = differ[0]
        raise ConfigError(f"{what}: rank 0 (on {values[0][1]}) finds {values[0][0]!r}, rank {r} (on {values[r][1]}) "
                          f"finds {values[r][0]!r}; put it on a filesystem every node mounts")


def ranks_on_this_host() -> int:
    """How many ranks share this machine (its memory), whatever the launcher: torchrun says so
    (LOCAL_WORLD_SIZE), srun and mpirun do not. Collective once the world is up."""
    if _world() == 1:
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    hosts = [None] * _world()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def check_run_folders(save: str | None, load: str | None, peeked) -> None:
    """Folders a run on several nodes needs every node to see, checked once the world is up:
    ``--save`` (every rank writes its shard of each checkpoint into one folder that rank 0 then
    publishes, and every rank reads the in-run shrink's model from it) and the ``--load``
    checkpoint each rank found (``peeked``). Collective."""
    if load:
        found = f"{peeked[0]} (iteration {peeked[1].get('iteration')})" if peeked else "no checkpoint"
        check_same_everywhere(found, f"--load {load}")
    check_shared(save, "--save", "Every rank writes its part of each checkpoint there and reads the "
                                 "in-run shrink's model from it")
