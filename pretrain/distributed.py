"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's parallel_state.

Every process group in this project comes from ``megatron.core.parallel_state``; nothing builds
another world. Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
``srun`` with one task per device, or ``mpirun``; a plain ``python`` launch is a world of one.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from megatron_patches import apply_cpu_shims


LAUNCHERS = ("auto", "torchrun", "slurm", "mpi")


def launch_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process, else a world of 1.

    torchrun's variables come first (under ``srun ... torchrun`` every task sees SLURM_PROCID=0);
    then an ``srun`` step with one task per device (SLURM_PROCID / SLURM_STEP_NUM_TASKS); then
    ``mpirun`` (Open MPI's variables, or any MPI through mpi4py with ``--launcher mpi``). For the
    last two MASTER_ADDR/MASTER_PORT are filled in when the launcher did not set them.
    ``PRETRAIN_LAUNCHER`` (``--launcher``) restricts the detection to one of them.
    """
    env = os.environ
    launcher = env.get("PRETRAIN_LAUNCHER", "auto")
    if "RANK" in env and "WORLD_SIZE" in env and launcher in ("auto", "torchrun"):
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if launcher in ("auto", "slurm") and "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world > 1:
            env.setdefault("MASTER_ADDR", _first_slurm_host())
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0))
    if launcher == "mpi" or (launcher == "auto" and "OMPI_COMM_WORLD_RANK" in env):
        return _mpi_environment()
    if launcher != "auto":
        raise RuntimeError(f"--launcher {launcher}: this process was not started by {launcher}")
    return 0, 1, 0


def _first_slurm_host() -> str:
    """The first node of the step (rank 0 runs there with srun's default block distribution)."""
    import subprocess

    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot expand SLURM node list {nodes!r} with scontrol ({err}); "
                           "set MASTER_ADDR") from None
    return out[0]


_mpi_cache: tuple[int, int, int] | None = None


def _mpi_environment() -> tuple[int, int, int]:
    """Rank, size and local rank from MPI (mpi4py); rank 0 publishes its address and a free port.
    Computed once: it involves collectives that ranks must not repeat unevenly."""
    global _mpi_cache
    if _mpi_cache is not None:
        return _mpi_cache
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(f"--launcher mpi needs mpi4py ({err})") from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    rank, size, local_rank = world.Get_rank(), world.Get_size(), local.Get_rank()
    local.Free()
    if size > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        address = None
        if rank == 0:
            host = socket.gethostname()
            with socket.socket() as s:
                s.bind(("", 0))
                address = (socket.gethostbyname(host), s.getsockname()[1])
        address = world.bcast(address, root=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address[0], str(address[1])
    _mpi_cache = (rank, size, local_rank)
    return _mpi_cache


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     timeout_minutes: int = 30) -> dict:
    """Initialise torch.distributed and megatron-core's model-parallel groups; returns the layout."""
    from megatron.core import parallel_state

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_shims()
    rank, world_size, local_rank = launch_environment()
    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        rendezvous: dict
        if world_size == 1:
            # a world of one needs no rendezvous: an in-process store. Not a tcp:// store on a
            # port: an inherited MASTER_PORT may be another job's, and under `torchrun
            # --nproc-per-node 1` (TORCHELASTIC_USE_AGENT_STORE) a tcp:// store would be a client
            # of a server that does not exist, and wait until the timeout.
            rendezvous = {"store": torch.distributed.HashStore()}
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
            rendezvous = {"init_method": "env://"}
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes), **rendezvous,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    return layout()


def layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "rank": torch.distributed.get_rank(),
        "world_size": torch.distributed.get_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(), "tp_size": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(), "pp_size": ps.get_pipeline_model_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
    }


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_rank0() -> bool:
    """Whether this process speaks for the world (global rank 0, or no world at all)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: a per-pipeline-stage seed for python/numpy/torch and the
    model-parallel RNG tracker (TP-rank specific streams for dropout)."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
