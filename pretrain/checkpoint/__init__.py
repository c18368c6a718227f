"""Atomic, resharding checkpoints built on megatron-core ``dist_checkpointing``.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint (written last)
    DIR/iter_0000100/
        model_optim/        dist_checkpointing folder: model + optimizer ("fully_reshardable":
                        loads under any TP/PP/DP)
        trainer_state.pt    iteration, consumed samples, LR scheduler, config, callbacks' states
        rng/rank_00000.pt   each rank's RNG states (restored when the layout is unchanged)
        manifest.json       every file above with its size and CRC-32; written just before the rename

A save writes into ``iter_XXXXXXX.tmp``, writes the manifest, renames the folder into place and
only then updates the ``latest`` file, so a crash at any point leaves the previous checkpoint as
the newest valid one; a save that fails (e.g. a full disk) removes its ``.tmp`` folder. On load, a
folder whose manifest is missing or does not match the files on disk (missing, truncated, or
corrupted at the same size: the CRC-32 differs) is refused with a message, and the newest older
valid checkpoint is used instead. Retention (``keep_last``) only ever deletes checkpoints older
than the one just written, and counts only valid ones towards the number kept.

Every pickle a checkpoint holds is read without running code: our own files with
``torch.load(weights_only=True)``, DCP's ``.metadata`` through an allowlist
(``pretrain.checkpoint.stream.read_dcp_metadata``), DCP's byte objects and ``common.pt`` checked with
``weights_only=True`` before megatron-core (which unpickles them freely) reads them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.distributed import is_rank0
from pretrain.errors import CheckpointError
from pretrain.engines.base import Engine
from pretrain.engines.megatron import as_engine
from pretrain.outputs import DISK_FULL, require_writable, write_error_reason, write_failure

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_OPTIM_DIR = "model_optim"
# --engine deepspeed: DeepSpeed's own checkpoint (engine.save_checkpoint, tag ENGINE_TAG) in place of
# model_optim/; the rest of the folder (trainer state, RNG, manifest, latest pointer) is the same
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"
_SHARDING_TYPE = "fully_reshardable"
_HASH_CHUNK_BYTES = 8 * 2**20


def _sharding_metadata() -> dict:
    """A fresh dict per call: megatron-core stores the current data-parallel group into the
    metadata dict it is given (``ensure_metadata_has_dp_cp_group``); a shared dict would keep the
    group of the first layout, and a later layout in the same process (an in-run shrink onto
    another TP/PP) would then give every DP rank replica id 0 and fail to load."""
    return {"distrib_optim_sharding_type": _SHARDING_TYPE}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_folder(save: str) -> str:
    """A fresh, empty ``SAVE.tmp`` beside ``save``: a whole output folder (a conversion, an export) is
    written there and renamed into place by ``publish_folder``, so a failure never leaves a
    half-written ``save``."""
    tmp = os.path.abspath(save).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_folder(tmp: str, save: str) -> None:
    """Rename the finished ``staging_folder`` to ``save`` (which may be an empty folder the user made)."""
    if os.path.isdir(save):
        os.rmdir(save)
    os.replace(tmp, save)


@contextlib.contextmanager
def staged_output(save: str, flag: str = "--save"):
    """``with staged_output(save) as tmp:`` write a whole new output folder into ``tmp``; on a
    clean exit it is published as ``save``, on any failure removed. A write failure (a read-only
    or full disk) becomes one OutputError naming ``flag``; ``save`` was checked writable already
    (``require_writable``), so this is for what shows only while writing."""
    require_writable(save, flag)
    tmp = None
    try:
        tmp = staging_folder(save)
        yield tmp
        publish_folder(tmp, save)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(err, save, flag, under=tmp)
        if failure is None:
            raise
        raise failure from None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _files_of(folder: str) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative paths."""
    files = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel != MANIFEST:
                files.append(rel)
    return sorted(files)


def file_crc32(path: str) -> str:
    """CRC-32 of a file, read in 8 MB chunks (about 3.5 GB/s on one core)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _describe_files(folder: str, names: list[str]) -> dict[str, dict]:
    return {rel: {"size": os.path.getsize(os.path.join(folder, rel)),
                  "crc32": file_crc32(os.path.join(folder, rel))} for rel in names}


def _describe_files_collectively(folder: str) -> dict[str, dict]:
    """Sizes and checksums of every file in ``folder``: each rank reads its share of the files
    (they are still in the page cache), rank 0 gets the whole table. Collective; a read error on
    any rank raises CheckpointError on every rank."""
    names = _files_of(folder)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    try:
        mine: dict | str = _describe_files(folder, names[_rank()::world])
    except OSError as err:
        mine = f"rank {_rank()}: cannot read back {folder} to checksum it ({err})"
    shares = [mine]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    failed = [share for share in shares if isinstance(share, str)]
    if failed:
        raise CheckpointError(failed[0])
    return {rel: entry for share in shares for rel, entry in share.items()}


# checkpoints whose checksums were verified in this process, by the identity of the manifest and
# of every file (size, mtime): a run reads its checkpoint once to choose it and once to load it,
# and hashes it only the first time; a file rewritten since then is hashed again
_verified: set[tuple] = set()


def _identity(folder: str, names: list[str]) -> tuple:
    stats = [os.stat(os.path.join(folder, rel)) for rel in [MANIFEST, *names]]
    return (os.path.realpath(folder),) + tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def verify_checkpoint(folder: str, checksums: bool = True) -> None:
    """Raise CheckpointError unless ``folder`` is a complete checkpoint: every file the manifest
    names exists with its size and (when ``checksums`` and the manifest has them) its CRC-32."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not complete")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        expected = {rel: entry if isinstance(entry, dict) else {"size": entry}
                    for rel, entry in manifest["files"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError, OSError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for rel, entry in expected.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: file {rel} is missing")
        actual = os.path.getsize(path)
        if actual != entry.get("size"):
            raise CheckpointError(f"{folder}: file {rel} has {actual} bytes, expected {entry.get('size')} "
                                  "(truncated?)")
    identity = _identity(folder, sorted(expected))
    if not checksums or identity in _verified:
        return
    for rel, entry in expected.items():
        if "crc32" in entry and file_crc32(os.path.join(folder, rel)) != entry["crc32"]:
            raise CheckpointError(f"{folder}: file {rel} is corrupt (its CRC-32 differs from the one "
                                  "saved with it; same size, different bytes)")
    _verified.add(identity)


def find_checkpoint(root: str, skipped: list[str] | None = None) -> str | None:
    """The newest valid checkpoint folder under ``root`` (or ``root`` itself if it is one).

    Prefers the ``latest`` pointer; a broken newest checkpoint is reported and skipped (and its
    reason appended to ``skipped``, for a caller that finds no valid one to explain why).
    """
    if os.path.isfile(os.path.join(root, MANIFEST)) or re.fullmatch(r"iter_\d+", os.path.basename(root.rstrip("/"))):
        verify_checkpoint(root)
        return root
    if not os.path.isdir(root):
        return None
    candidates = sorted(
        (int(m.group(1)) for m in (re.fullmatch(r"iter_(\d+)", n) for n in os.listdir(root)) if m),
        reverse=True,
    )
    latest_path = os.path.join(root, LATEST_FILE)
    if os.path.isfile(latest_path):
        try:
            latest = int(open(latest_path).read().strip())
            candidates = [latest] + [c for c in candidates if c != latest]
        except ValueError:
            _warn(f"{latest_path} is unreadable; looking for the newest valid checkpoint")
    for iteration in candidates:
        folder = iteration_dir(root, iteration)
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as err:
            _warn(f"skipping invalid checkpoint: {err}")
            if skipped is not None:
                skipped.append(str(err))
    return None


def _warn(message: str) -> None:
    if is_rank0():
        print(f"WARNING: {message}", flush=True)


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


def _model_sharded_state_dict(model_chunks: list) -> dict:
    from pretrain.model.build import unwrap

    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict(metadata=_sharding_metadata())
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=_sharding_metadata())
            for i, c in enumerate(model_chunks)}


def _load_model_state(model_chunks: list, state: dict) -> None:
    from pretrain.model.build import unwrap

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
        files = _describe_files_collectively(tmp)
    except CheckpointError:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def publish() -> None:
        if is_rank0():
            publish_checkpoint(root, iteration, tmp, world_size, files)
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
        os.makedirs(os.path.join(tmp, "rng"))


def _write_checkpoint_files(tmp: str, model_chunks: list, optimizer, trainer_state: dict,
                            local_state: dict | None) -> None:
    from megatron.core import dist_checkpointing

    if isinstance(optimizer, Engine) and optimizer.own_checkpoint_files:  # DeepSpeed
        optimizer.save_files(os.path.join(tmp, ENGINE_DIR), ENGINE_TAG)
    else:
        model_sd = _model_sharded_state_dict(model_chunks)
        sharded = {"model": model_sd}
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                                metadata=_sharding_metadata())
        dist_checkpointing.save(sharded, os.path.join(tmp, MODEL_OPTIM_DIR))
    torch.save({"rng": _rng_state(), "local": local_state or {}},
               os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
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


def save_failure_message(err: BaseException, tmp: str) -> str:
    if is_disk_full(err, tmp):
        return (f"no space left on device while saving {tmp} (free space on that disk, or --save to "
                "another one, then resume with --load)")
    return f"cannot save {tmp}: {type(err).__name__}: {str(err)[:500]}"


def is_disk_full(err: BaseException, tmp: str) -> bool:
    """ENOSPC anywhere in the error's chain (DCP wraps the writer's error per rank; torch.save
    reports only 'file write failed'), or a disk left with (almost) no free space."""
    if write_error_reason(err) == DISK_FULL:
        return True
    try:
        return shutil.disk_usage(os.path.dirname(tmp) or ".").free < _HASH_CHUNK_BYTES
    except OSError:
        return False


def _make_save_helpers_die_with_us() -> None:
    """megatron-core's torch_dist writer starts a ``multiprocessing.Manager`` server (for its
    results queue) on the first save and keeps it for the life of the process; a rank killed with
    SIGKILL would leave that server running forever (outside Slurm's cgroups). Start the server
    ourselves, with the parent-death signal set, so it dies with this process; and give the
    writer processes it forks at every save the same signal."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from data_prep.processes import die_with_parent, forked_children_die_with_us

    forked_children_die_with_us()  # its writers are forked per save, and must not outlive a killed rank
    if filesystem_async._results_queue is not None:
        return
    from multiprocessing.managers import SyncManager

    from torch import multiprocessing as mp

    manager = SyncManager(ctx=mp.get_context("spawn"))

    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def publish_checkpoint(root: str, iteration: int, tmp: str, world_size: int = 1,
                       files: dict[str, dict] | None = None) -> str:
    """Make the complete folder ``tmp`` the checkpoint of ``iteration`` under ``root``: write its
    manifest (``files``: size and CRC-32 of each file, computed here if not given), rename it into
    place, then point ``latest`` at it (one process calls this)."""
    final = iteration_dir(root, iteration)
    if files is None:
        files = _describe_files(tmp, _files_of(tmp))
    manifest = {"iteration": iteration, "files": files, "world_size": world_size, "checksum": "crc32"}
    atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    replaced = None
    if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): replace it
        replaced = f"{final}.replaced-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, LATEST_FILE), str(iteration))
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def prune_old_checkpoints(root: str, keep_last: int, current: int) -> list[str]:
    """Retention after saving iteration ``current``: keep it and the ``keep_last - 1`` newest
    *valid* checkpoints older than it; delete the other older ones. Checkpoints newer than
    ``current`` (left from a run resumed from an older checkpoint) are not touched, and an invalid
    checkpoint never counts towards ``keep_last``. Returns the deleted folders."""
    iterations = sorted((int(m.group(1)) for m in (re.fullmatch(r"iter_(\d+)", n) for n in os.listdir(root)) if m),
                        reverse=True)
    kept, deleted = 1, []
    for it in (i for i in iterations if i < current):
        folder = iteration_dir(root, it)
        if kept < keep_last and _is_valid(folder):
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def _is_valid(folder: str) -> bool:
    try:
        verify_checkpoint(folder)
        return True
    except CheckpointError as err:
        _warn(f"retention: {err}; not counted among the checkpoints kept")
        return False


@dataclass
class LoadedCheckpoint:
    folder: str
    trainer_state: dict
    local_state: dict | None = None  # this rank's callbacks' state (same layout only)


def _numpy_array_globals() -> list:
    """What a pickled numpy array (the numpy RNG state in ``rng/*.pt``) needs: data only."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_without_code(source, what: str):
    """``torch.load`` that never runs code from the file (``weights_only=True``, numpy arrays
    allowed); a file that would is refused with CheckpointError naming ``what``."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{what}: refused: it holds Python objects other than tensors and plain data "
                              f"(a pickle that could run code: {str(err).splitlines()[-1][:300]}). "
                              "Only load checkpoints from a source you trust") from None
    except Exception as err:
        raise CheckpointError(f"{what}: unreadable ({type(err).__name__}: {str(err)[:300]}); "
                              "the file is corrupt or not a checkpoint file") from None


def read_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, TRAINER_STATE)
    state = load_without_code(path, path)
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(f"{path}: not a trainer state (no iteration); the checkpoint is corrupt")
    return state


def load_checkpoint(load: str, model_chunks: list, optimizer, load_optim: bool = True,
                    load_rng: bool = True) -> LoadedCheckpoint | None:
    """Collective. Loads the newest valid checkpoint under ``load``; None if there is none.
    ``optimizer``: the engine (or megatron-core's optimizer) whose state is loaded too; None for
    the weights alone."""
    folder = find_checkpoint(load)
    if folder is None:
        return None
    trainer_state = read_trainer_state(folder)
    engine = as_engine(optimizer, model_chunks) if optimizer is not None else None
    if (engine is not None and engine.own_checkpoint_files) or os.path.isdir(os.path.join(folder, ENGINE_DIR)):
        _load_engine_state(folder, engine, load_optim, trainer_state.get("layout") or {})
    else:
        _load_dcp_state(folder, model_chunks, engine, load_optim)
    rng_path = os.path.join(folder, "rng", f"rank_{_rank():05d}.pt")
    same_layout = _layout_sizes(trainer_state.get("layout") or {}) == _layout_sizes(_current_layout())
    local_state = None
    if same_layout and os.path.isfile(rng_path):
        rank_file = load_without_code(rng_path, rng_path)
        local_state = rank_file.get("local")
        if load_rng:
            _set_rng_state(rank_file["rng"])
    _barrier()
    return LoadedCheckpoint(folder=folder, trainer_state=trainer_state, local_state=local_state)


def deepspeed_only(folder: str) -> str | None:
    """The advice for a reader of weights in the layout-free (megatron) format (evaluation, HF
    export, the reshard tool, a distillation teacher) given a DeepSpeed checkpoint; None for
    any other checkpoint."""
    if not os.path.isdir(os.path.join(folder, ENGINE_DIR)):
        return None
    return (f"{folder} is a DeepSpeed checkpoint: its weights are in ZeRO partitions that only an --engine "
            "deepspeed run on the layout that wrote them reads. Convert it once: python "
            f"tools/convert_checkpoint.py --load {folder} --save NEW --to megatron, and give NEW instead "
            "(under either engine)")


def _load_engine_state(folder: str, engine: Engine | None, load_optim: bool, layout: dict) -> None:
    """A checkpoint in an engine's own format (DeepSpeed): only that engine reads it, under the
    layout that wrote it (its ZeRO partitions are per TP and DP rank)."""
    written_by = "deepspeed" if os.path.isdir(os.path.join(folder, ENGINE_DIR)) else "megatron"
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

    model_sd = _model_sharded_state_dict(model_chunks)
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


def check_dcp_pickles(dcp_dir: str) -> None:
    """Refuse a DCP folder whose pickles would run code when megatron-core/torch read them:
    ``.metadata`` (read by DCP with plain ``pickle.load``), its byte objects (read by DCP with
    ``weights_only=False``) and ``*.pt`` files (``common.pt``, sharded objects)."""
    from pretrain.checkpoint.stream import CheckpointReader, DCPFormatError

    try:
        reader = CheckpointReader(dcp_dir)  # reads .metadata through an allowlist
        objects = {key: reader.read_bytes(key) for key in reader.keys() if reader.tensor_meta(key) is None}
    except DCPFormatError as err:
        raise CheckpointError(str(err)) from None
    for key, raw in objects.items():
        load_without_code(io.BytesIO(raw), f"{dcp_dir}: object {key}")
    for name in sorted(os.listdir(dcp_dir)):
        if name.endswith(".pt"):
            load_without_code(os.path.join(dcp_dir, name), os.path.join(dcp_dir, name))


def _layout_sizes(layout: dict) -> tuple:
    return tuple(layout.get(k) for k in ("world_size", "tp_size", "pp_size", "dp_size"))


def _current_layout() -> dict:
    from pretrain.distributed import layout

    return layout() if torch.distributed.is_initialized() else {}
