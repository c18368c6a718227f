"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's parallel_state.

Every process group in this project comes from ``megatron.core.parallel_state``; nothing builds
another world. Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
a plain ``python`` launch is a world of one.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from megatron_patches import apply_cpu_shims


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables (or Open MPI's), else a world of 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "OMPI_COMM_WORLD_RANK" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return 0, 1, 0


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
        if world_size == 1:
            # a plain `python` run: a private store on a fresh port (an inherited MASTER_PORT may be
            # another job's), without touching the environment that child processes inherit
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
            init_method = "env://"
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", init_method=init_method, rank=rank,
            world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
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


def print_rank0(*args, **kwargs) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
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
