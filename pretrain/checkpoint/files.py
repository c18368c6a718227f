"""Every name inside a checkpoint folder, and the one test of which engine wrote one.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint (written last)
    DIR/iter_0000100/
        model_optim/        dist_checkpointing folder: model + optimizer (megatron engine)
        deepspeed/state/    DeepSpeed's own checkpoint in place of model_optim/ (--engine deepspeed)
        trainer_state.pt    iteration, consumed samples, LR scheduler, config, callbacks' states
        rng/rank_00000.pt   each rank's RNG states (restored when the layout is unchanged)
        manifest.json       every file above with its size and CRC-32; written just before the rename
"""

from __future__ import annotations

import os
import re

from pretrain.errors import CheckpointError  # noqa: F401  (re-exported: its callers import it from here)

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_OPTIM_DIR = "model_optim"
RNG_DIR = "rng"
# --engine deepspeed: DeepSpeed's own checkpoint (engine.save_checkpoint, tag ENGINE_TAG) in place of
# model_optim/; the rest of the folder (trainer state, RNG, manifest, latest pointer) is the same
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"
_ITERATION = re.compile(r"iter_(\d+)")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, RNG_DIR, f"rank_{rank:05d}.pt")


def is_iteration_name(path: str) -> bool:
    """Whether ``path`` is named like one checkpoint (``iter_N``), not a ``--save`` root."""
    return _ITERATION.fullmatch(os.path.basename(path.rstrip("/"))) is not None


def iterations(root: str) -> list[int]:
    """The iterations of the ``iter_N`` folders under ``root``, newest first (valid or not)."""
    return sorted((int(m.group(1)) for m in map(_ITERATION.fullmatch, os.listdir(root)) if m), reverse=True)


def engine_of(folder: str) -> str:
    """Which engine wrote the checkpoint ``folder``: "deepspeed" (its ZeRO partitions, which only a
    DeepSpeed run on the same layout reads) or "megatron" (the layout-free DCP format)."""
    return "deepspeed" if os.path.isdir(os.path.join(folder, ENGINE_DIR)) else "megatron"
