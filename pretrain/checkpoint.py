"""Atomic, resharding checkpoints built on megatron-core ``dist_checkpointing``.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint (written last)
    DIR/iter_0000100/
        model_optim/        dist_checkpointing folder: model + optimizer ("fully_reshardable":
                        loads under any TP/PP/DP)
        trainer_state.pt    iteration, consumed samples, LR scheduler, config, callbacks' states
        rng/rank_00000.pt   each rank's RNG states (restored when the layout is unchanged)
        manifest.json       every file above with its size; written just before the rename

A save writes into ``iter_XXXXXXX.tmp``, writes the manifest, renames the folder into place and
only then updates the ``latest`` file, so a crash at any point leaves the previous checkpoint as
the newest valid one. On load, a folder whose manifest is missing or does not match the files on
disk is refused with a message, and the newest older valid checkpoint is used instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_OPTIM_DIR = "model_optim"
_SHARDING_TYPE = "fully_reshardable"


def _sharding_metadata() -> dict:
    """A fresh dict per call: megatron-core stores the current data-parallel group into the
    metadata dict it is given (``ensure_metadata_has_dp_cp_group``); a shared dict would keep the
    group of the first layout, and a later layout in the same process (an in-run shrink onto
    another TP/PP) would then give every DP rank replica id 0 and fail to load."""
    return {"distrib_optim_sharding_type": _SHARDING_TYPE}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and what to do."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _list_files(folder: str) -> dict[str, int]:
    files = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST:
                files[rel] = os.path.getsize(path)
    return files


def verify_checkpoint(folder: str) -> None:
    """Raise CheckpointError unless ``folder`` is a complete checkpoint (manifest matches disk)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not complete")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError, OSError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for rel, size in expected.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: file {rel} is missing")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"{folder}: file {rel} has {actual} bytes, expected {size} (truncated?)")


def find_checkpoint(root: str) -> str | None:
    """The newest valid checkpoint folder under ``root`` (or ``root`` itself if it is one).

    Prefers the ``latest`` pointer; a broken newest checkpoint is reported and skipped.
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
    return None


def _warn(message: str) -> None:
    if _rank() == 0:
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
    from pretrain.model import unwrap

    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict(metadata=_sharding_metadata())
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=_sharding_metadata())
            for i, c in enumerate(model_chunks)}


def _load_model_state(model_chunks: list, state: dict) -> None:
    from pretrain.model import unwrap

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)


def save_checkpoint(root: str, iteration: int, model_chunks: list, optimizer, trainer_state: dict,
                    keep_last: int | None = None, local_state: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the final folder."""
    from megatron.core import dist_checkpointing

    start = time.time()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, MODEL_OPTIM_DIR))
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()

    model_sd = _model_sharded_state_dict(model_chunks)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                            metadata=_sharding_metadata())
    dist_checkpointing.save(sharded, os.path.join(tmp, MODEL_OPTIM_DIR))
    torch.save({"rng": _rng_state(), "local": local_state or {}},
               os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
    _barrier()

    if _rank() == 0:
        publish_checkpoint(root, iteration, tmp,
                           torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        if keep_last:
            _prune_old(root, keep_last)
        print(f"saved checkpoint {final} in {time.time() - start:.1f}s", flush=True)
    _barrier()
    return final


def publish_checkpoint(root: str, iteration: int, tmp: str, world_size: int = 1) -> str:
    """Make the complete folder ``tmp`` the checkpoint of ``iteration`` under ``root``: write its
    manifest, rename it into place, then point ``latest`` at it (one process calls this)."""
    final = iteration_dir(root, iteration)
    manifest = {"iteration": iteration, "files": _list_files(tmp), "world_size": world_size}
    _atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write_text(os.path.join(root, LATEST_FILE), str(iteration))
    return final


def _prune_old(root: str, keep_last: int) -> None:
    iters = sorted(int(m.group(1)) for m in (re.fullmatch(r"iter_(\d+)", n) for n in os.listdir(root)) if m)
    for it in iters[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    folder: str
    trainer_state: dict
    local_state: dict | None = None  # this rank's callbacks' state (same layout only)


def read_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, TRAINER_STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read trainer state ({err})") from None


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam the state a stepped one has (zero moments, step 0).

    megatron-core's ``DistributedOptimizer.state_dict`` reads ``state["step"]`` when neither apex
    nor Transformer Engine provides Adam; a fresh torch Adam has no state yet, so building the
    state dict to load into fails with a bare assertion. Zero moments at step 0 are exactly what
    the first ``step()`` would create, so training is unchanged.
    """
    from pretrain.pruning.optim_state import torch_optimizers

    for torch_opt in torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if len(state) == 0 and isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def _unalias_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    Without apex/TE, megatron-core's DistributedOptimizer.load_state_dict puts *one* step tensor
    into every parameter's torch-Adam state; torch Adam increments it in place once per parameter,
    so the bias correction after a resume would be wrong (losses drift from the unbroken run).
    """
    from pretrain.pruning.optim_state import torch_optimizers

    for torch_opt in torch_optimizers(optimizer):
        for state in torch_opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def load_checkpoint(load: str, model_chunks: list, optimizer, load_optim: bool = True,
                    load_rng: bool = True) -> LoadedCheckpoint | None:
    """Collective. Loads the newest valid checkpoint under ``load``; None if there is none."""
    from megatron.core import dist_checkpointing

    folder = find_checkpoint(load)
    if folder is None:
        return None
    trainer_state = read_trainer_state(folder)
    model_sd = _model_sharded_state_dict(model_chunks)
    sharded = {"model": model_sd}
    if load_optim and optimizer is not None:
        _ensure_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=_sharding_metadata())
    try:
        state = dist_checkpointing.load(sharded, os.path.join(folder, MODEL_OPTIM_DIR))
    except Exception as err:
        raise CheckpointError(
            f"{folder}: the weights do not fit this model ({type(err).__name__}: {str(err)[:500]}). "
            "Check that the model flags match the checkpoint's config, or pass --use-checkpoint-args "
            "(a shrunk checkpoint has a smaller shape than the flags that started the run)"
        ) from None
    _load_model_state(model_chunks, state["model"])
    if "optimizer" in sharded:
        optimizer.load_state_dict(state["optimizer"])
        _unalias_adam_steps(optimizer)
    rng_path = os.path.join(folder, "rng", f"rank_{_rank():05d}.pt")
    same_layout = _layout_sizes(trainer_state.get("layout") or {}) == _layout_sizes(_current_layout())
    local_state = None
    if same_layout and os.path.isfile(rng_path):
        rank_file = torch.load(rng_path, weights_only=False)
        local_state = rank_file.get("local")
        if load_rng:
            _set_rng_state(rank_file["rng"])
    _barrier()
    return LoadedCheckpoint(folder=folder, trainer_state=trainer_state, local_state=local_state)


def _layout_sizes(layout: dict) -> tuple:
    return tuple(layout.get(k) for k in ("world_size", "tp_size", "pp_size", "dp_size"))


def _current_layout() -> dict:
    from pretrain.distributed import layout

    return layout() if torch.distributed.is_initialized() else {}
