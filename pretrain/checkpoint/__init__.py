"""Saving and loading a run's model, optimizer and trainer state, built on megatron-core
``dist_checkpointing`` ("fully_reshardable": loads under any TP/PP/DP) or, under --engine
deepspeed, DeepSpeed's own checkpoint.

The folder's names are in ``pretrain.checkpoint.files``; writing it whole or not at all (staging,
manifest + CRC-32, the ``latest`` file, retention) in ``pretrain.checkpoint.atomic``; reading its
pickles without running code in ``pretrain.checkpoint.trust``; finding one and what its trainer
state says in ``pretrain.checkpoint.stored``. Those names are re-exported here.

A save writes into ``iter_XXXXXXX.tmp``, writes the manifest, renames the folder into place and
only then updates the ``latest`` file, so a crash at any point leaves the previous checkpoint as
the newest valid one; a save that fails (e.g. a full disk) removes its ``.tmp`` folder. On load, a
folder that does not match its manifest is refused with a message, and the newest older valid
checkpoint is used instead.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.processes import die_with_parent, forked_children_die_with_us
# the names of files/atomic/stored/trust, re-exported: their callers import them from here
from pretrain.checkpoint.atomic import (atomic_write_text, describe_files_collectively, file_crc32, find_checkpoint,
                                        is_disk_full, prune_old_checkpoints, publish_checkpoint, publish_folder,
                                        require_new_folder, save_failure_message, staged, staged_checkpoint,
                                        staged_output, staging_folder, verify_checkpoint)
from pretrain.checkpoint.atomic import this_rank as _rank
from pretrain.checkpoint.files import (ENGINE_DIR, ENGINE_TAG, LATEST_FILE, MANIFEST, MODEL_OPTIM_DIR, TRAINER_STATE,
                                       RNG_DIR, engine_of, iteration_dir, rng_file)
from pretrain.checkpoint.stored import StoredCheckpoint, deepspeed_only, read_trainer_state
from pretrain.checkpoint.trust import check_dcp_pickles, load_without_code
from pretrain.distributed import is_rank0
from pretrain.distributed import layout as process_layout
from pretrain.errors import CheckpointError
from pretrain.model.params import unwrap
from pretrain.engines.base import Engine
from pretrain.engines.megatron import as_engine
from pretrain.outputs import DISK_FULL, require_writable, write_error_reason, write_failure

_SHARDING_TYPE = "fully_reshardable"


def _sharding_metadata() -> dict:
    """A fresh dict per call: megatron-core stores the current data-parallel group into the
    metadata dict it is given (``ensure_metadata_has_dp_cp_group``); a shared dict would keep the
    group of the first layout, and a later layout in the same process (an in-run shrink onto
    another TP/PP) would then give every DP rank replica id 0 and fail to load."""
    return {"distrib_optim_sharding_type": _SHARDING_TYPE}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict(metadata=_sharding_metadata())
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=_sharding_metadata())
            for i, c in enumerate(model_chunks)}


def _load_model_state(model_chunks: list, state: dict) -> None:
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)


def save_checkpoint(root: str, iteration: int, model_chunks: list, optimizer, trainer_state: dict,
                    keep_last: int | None = None, local_state: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the final folder. A failure on any rank (a full
    disk, say) raises CheckpointError on every rank, with the ``.tmp`` folder removed."""
    start = time.time()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    _on_all_ranks_or_clean_up(lambda: _make_tmp_folder(root, tmp), tmp)
    # DCP's save is collective and raises on every rank when any fails; the rest is rank-local
    _on_all_ranks_or_clean_up(
        lambda: _write_checkpoint_files(tmp, model_chunks, optimizer, trainer_state, local_state), tmp)
    try:
        files = describe_files_collectively(tmp)
    except CheckpointError as err:  # a file could not be read back or synced (a full disk, an I/O error)
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{err}. The incomplete {tmp} was removed; the previous checkpoint is kept") from None
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def publish() -> None:
        if is_rank0():
            publish_checkpoint(root, iteration, tmp, world_size, files, remember_verified=True)
            if keep_last:
                prune_old_checkpoints(root, keep_last, iteration)
            print(f"saved checkpoint {final} in {time.time() - start:.1f}s", flush=True)

    _on_all_ranks_or_clean_up(publish, tmp)
    return final


def _make_tmp_folder(root: str, tmp: str) -> None:
    _make_save_helpers_die_with_us()  # rank-local, so before the collective DCP save
    if is_rank0():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, MODEL_OPTIM_DIR))
        os.makedirs(os.path.join(tmp, RNG_DIR))


def _write_checkpoint_files(tmp: str, model_chunks: list, optimizer, trainer_state: dict,
                            local_state: dict | None) -> None:
    from megatron.core import dist_checkpointing

    if isinstance(optimizer, Engine) and optimizer.own_checkpoint_files:  # DeepSpeed
        optimizer.save_files(os.path.join(tmp, ENGINE_DIR), ENGINE_TAG)
    else:
        model_sd = model_sharded_state_dict(model_chunks)
        sharded = {"model": model_sd}
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                                metadata=_sharding_metadata())
        dist_checkpointing.save(sharded, os.path.join(tmp, MODEL_OPTIM_DIR))
    torch.save({"rng": _rng_state(), "local": local_state or {}},
               rng_file(tmp, _rank()))
    if is_rank0():
        torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))


def _on_all_ranks_or_clean_up(step, tmp: str) -> None:
    """Run ``step`` on every rank; if it fails on any, every rank raises the same CheckpointError
    (no rank is left waiting in a barrier) and rank 0 removes ``tmp``. Collective."""
    from torch.distributed.checkpoint.api import CheckpointException

    error = None
    try:
        step()
    except (Exception, CheckpointException) as err:
        error = f"rank {_rank()}: {save_failure_message(err, tmp)}"
    errors = [error]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if not failed:
        return
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"{failed[0]}. The incomplete {tmp} was removed; the previous checkpoint is kept")


def _make_save_helpers_die_with_us() -> None:
    """megatron-core's torch_dist writer starts a ``multiprocessing.Manager`` server (for its
    results queue) on the first save and keeps it for the life of the process; a rank killed with
    SIGKILL would leave that server running forever (outside Slurm's cgroups). Start the server
    ourselves, with the parent-death signal set, so it dies with this process; and give the
    writer processes it forks at every save the same signal."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forked_children_die_with_us()  # its writers are forked per save, and must not outlive a killed rank
    if filesystem_async._results_queue is not None:
        return
    from multiprocessing.managers import SyncManager

    from torch import multiprocessing as mp

    manager = SyncManager(ctx=mp.get_context("spawn"))

    manager.start(initializer=_save_server_start, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def _save_server_start(parent_pid: int) -> None:
    """The save server ignores the stop signals and dies with its rank alone. A stop signal sent
    to the whole process group (Slurm's SIGTERM to every process of a step, ``kill -TERM -PGID``,
    Ctrl-C) reached the server too, and killed it: the save the rank then makes on that signal
    failed (BrokenPipeError), and the steps since the last checkpoint were lost."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


@dataclass
class LoadedCheckpoint:
    folder: str
    trainer_state: dict
    local_state: dict | None = None  # this rank's callbacks' state (same layout only)


def load_checkpoint(load: str | StoredCheckpoint, model_chunks: list, optimizer, load_optim: bool = True,
                    load_rng: bool = True) -> LoadedCheckpoint | None:
    """Collective. Loads the newest valid checkpoint under ``load`` (or the one already found);
    None if there is none. ``optimizer``: the engine (or megatron-core's optimizer) whose state is
    loaded too; None for the weights alone."""
    stored = load if isinstance(load, StoredCheckpoint) else StoredCheckpoint.find(load)
    if stored is None:
        return None
    folder, trainer_state = stored.folder, stored.trainer_state
    engine = as_engine(optimizer, model_chunks) if optimizer is not None else None
    if (engine is not None and engine.own_checkpoint_files) or engine_of(folder) == "deepspeed":
        _load_engine_state(folder, engine, load_optim, trainer_state.get("layout") or {})
    else:
        _load_dcp_state(folder, model_chunks, engine, load_optim)
    rng_path = rng_file(folder, _rank())
    same_layout = _layout_sizes(trainer_state.get("layout") or {}) == _layout_sizes(_current_layout())
    local_state = None
    if same_layout and os.path.isfile(rng_path):
        rank_file = load_without_code(rng_path, rng_path)
        local_state = rank_file.get("local")
        if load_rng:
            _set_rng_state(rank_file["rng"])
    _barrier()
    return LoadedCheckpoint(folder=folder, trainer_state=trainer_state, local_state=local_state)


def _load_engine_state(folder: str, engine: Engine | None, load_optim: bool, layout: dict) -> None:
    """A checkpoint in an engine's own format (DeepSpeed): only that engine reads it, under the
    layout that wrote it (its ZeRO partitions are per TP and DP rank)."""
    written_by = engine_of(folder)
    if engine is None and written_by == "deepspeed":  # weights alone: evaluation, export, a teacher
        raise CheckpointError(deepspeed_only(folder))
    if not engine.own_checkpoint_files or written_by != "deepspeed":
        running = engine.name
        raise CheckpointError(
            f"{folder} was written by --engine {written_by}; this run uses --engine {running}. Resume with "
            f"--engine {written_by}, or convert it: python tools/convert_checkpoint.py --load {folder} "
            f"--save NEW --to {running}")
    saved, now = _layout_sizes(layout), _layout_sizes(_current_layout())
    if saved != now:
        raise CheckpointError(
            f"{folder}: a DeepSpeed checkpoint of world {saved[0]} = TP {saved[1]} x PP {saved[2]} x DP {saved[3]} "
            f"cannot load under world {now[0]} = TP {now[1]} x PP {now[2]} x DP {now[3]} (ZeRO partitions are per "
            "rank). Resume on the same layout, or re-partition it for any layout (through the consolidated "
            f"weights and AdamW state): python tools/convert_checkpoint.py --load {folder} --save NEW --to "
            "deepspeed, then --load NEW")
    engine_dir = os.path.join(folder, ENGINE_DIR)
    # DeepSpeed unpickles its files with weights_only=False: check first that they hold data only
    # (each rank checks its share of the files; a refusal on any stops every rank)
    names = sorted(n for n in os.listdir(os.path.join(engine_dir, ENGINE_TAG)) if n.endswith(".pt"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    failure = None
    try:
        with torch.serialization.safe_globals(engine.checkpoint_pickle_globals()):
            for name in names[_rank()::world]:
                path = os.path.join(engine_dir, ENGINE_TAG, name)
                load_without_code(path, path)
    except CheckpointError as err:
        failure = str(err)
    failures = [failure]
    if world > 1:
        failures = [None] * world
        torch.distributed.all_gather_object(failures, failure)
    if any(failures):
        raise CheckpointError(next(f for f in failures if f))
    if not engine.load_files(engine_dir, ENGINE_TAG, load_optim):
        raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint under {engine_dir} (tag {ENGINE_TAG})")


def _load_dcp_state(folder: str, model_chunks: list, engine: Engine | None, load_optim: bool) -> None:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    model_sd = model_sharded_state_dict(model_chunks)
    sharded = {"model": model_sd}
    if load_optim and engine is not None:
        sharded["optimizer"] = engine.sharded_state_dict(model_sd, is_loading=True, metadata=_sharding_metadata())
    check_dcp_pickles(os.path.join(folder, MODEL_OPTIM_DIR))
    try:
        state = dist_checkpointing.load(sharded, os.path.join(folder, MODEL_OPTIM_DIR))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"{folder}: the weights do not fit this model ({_first_failure(err)}). "
            "Check that the model flags match the checkpoint's config, or pass --use-checkpoint-args "
            "(a shrunk checkpoint has a smaller shape than the flags that started the run)"
        ) from None
    _load_model_state(model_chunks, state["model"])
    if "optimizer" in sharded:
        engine.load_state_dict(state["optimizer"])


def _first_failure(err: BaseException) -> str:
    """One line for a load error: DCP's CheckpointException carries each rank's error (and its
    traceback in its text); show the first rank's error only."""
    failures = getattr(err, "failures", None)
    if failures:
        rank, failure = sorted(failures.items(), key=lambda kv: kv[0])[0]
        err = failure[0] if isinstance(failure, tuple) else failure
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:400] if str(err).strip() else ''}"


def _layout_sizes(layout: dict) -> tuple:
    return tuple(layout.get(k) for k in ("world_size", "tp_size", "pp_size", "dp_size"))


def _current_layout() -> dict:
    return process_layout() if torch.distributed.is_initialized() else {}
