"""What a model described by a file or a flag needs in memory, against what this process has
(issue 31 item 9): checked before anything is allocated, so a shape far bigger than the machine
stops with a message naming the size, instead of the kernel's out-of-memory killer ending the
process without a word (rc 137) tens of gigabytes later.

One check (``require_memory``) for every entry point that builds a model from a described shape:
training (the flags, a preset, a ``--load`` checkpoint's shape, a ``--kd-teacher``), HF import
(``config.json`` or a GGUF header), HF export, the engine conversion and evaluation. The needs
are lower bounds (the weights and the copies the code surely holds), so a refusal is never wrong;
what is available is the host's ``MemAvailable`` and the cgroup's limit (what a container or a
Slurm job may use), or the GPU's memory for what lives there.
"""

from __future__ import annotations

import os

from pretrain.errors import InsufficientMemory

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_memory_available() -> tuple[int, str] | None:
    """(bytes this process may still allocate on the host, where that number comes from): the
    smaller of /proc/meminfo's MemAvailable and the cgroup's limit minus its usage; None when
    neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        found.append((int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, KeyError, ValueError):
        pass
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < 2**60:  # v1 writes a huge number for no limit
            found.append((max(limit - (usage or 0), 0), f"the cgroup's limit, {limit_file}"))
            break
    return min(found) if found else None


def memory_available(local_ranks: int = 1, device: bool = False) -> tuple[int, str] | None:
    """(bytes one of ``local_ranks`` processes sharing this node may use, where from): a GPU's
    memory when ``device`` and there is one, else its share of the host's."""
    if device:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[1]), "the GPU's memory"
    host = host_memory_available()
    if host is None:
        return None
    share = host[0] // max(local_ranks, 1)
    return share, host[1] + (f", shared by {local_ranks} ranks on this node" if local_ranks > 1 else "")


def local_ranks() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def require_memory(need: int, what: str, advice: str, local_ranks: int = 1, device: bool = False) -> None:
    """Raise InsufficientMemory when ``need`` bytes (a lower bound of what ``what`` allocates)
    exceed what is available; ``advice`` says what to do instead."""
    have = memory_available(local_ranks, device)
    if have is None or need <= have[0]:
        return
    raise InsufficientMemory(f"{what} needs at least {need / 2**30:,.1f} GiB, more than the {have[0] / 2**30:,.1f} "
                             f"GiB available ({have[1]}): {advice}")


def describe_parameters(params: int) -> str:
    return f"{params / 1e9:,.2f} B parameters" if params >= 1e8 else f"{params / 1e6:,.2f} M parameters"


def check_training_memory(cfg, vocab_size: int, data_parallel: int, teacher=None) -> None:
    """Training (``cfg``, a PretrainConfig): each rank's share of the weights, their gradients and
    the Adam moments (sharded over data parallel by the distributed optimizer or ZeRO), plus a
    ``--kd-teacher``'s weights (``teacher``: its Teacher), against each rank's memory."""
    model_parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    weight = 2 if cfg.train.bf16 else 4
    optimizer = 8 + (4 if cfg.train.bf16 else 0)  # Adam's moments (+ the fp32 master of bf16 weights)
    if cfg.parallel.engine == "deepspeed":  # ZeRO shards the optimizer, then the gradients, then the weights
        stage, offload = cfg.parallel.deepspeed_zero()
        per_param = (weight / (data_parallel if stage >= 3 else 1) + weight / (data_parallel if stage >= 2 else 1)
                     + (0 if offload != "none" else optimizer / data_parallel))  # offloaded: in host memory
    else:
        sharded = cfg.parallel.use_distributed_optimizer
        per_param = 2 * weight + optimizer / (data_parallel if sharded else 1)
    params = cfg.model.num_parameters(vocab_size)["total"]
    need = params / model_parallel * per_param
    what = f"the model ({describe_parameters(params)}: weights, gradients and Adam state"
    if teacher is not None:
        teacher_params = teacher.model.num_parameters(teacher.vocab_size)["total"]
        need += teacher_params / model_parallel * weight
        what += f", and the --kd-teacher's {describe_parameters(teacher_params)}"
    require_memory(int(need), what + f", per rank at TP x PP = {model_parallel})",
                   "a smaller shape (--num-layers, --hidden-size, --ffn-hidden-size or another --model), or more "
                   "ranks to spread it over (--tensor/pipeline-model-parallel-size)",
                   local_ranks=local_ranks(), device=True)


def check_model_fits(params: int, bytes_per_param: float, where: str, held_as: str, advice: str,
                     local_ranks: int = 1, device: bool = False) -> None:
    """The model that ``where`` describes, of ``params`` parameters ``held_as`` ``bytes_per_param``
    bytes each (its copies in memory at once): refused with ``advice`` when it cannot fit."""
    require_memory(int(params * bytes_per_param), f"{where}: {describe_parameters(params)} held as {held_as}",
                   advice, local_ranks=local_ranks, device=device)
