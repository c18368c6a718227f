"""A checkpoint on disk, opened once: ``StoredCheckpoint``.

Every reader of a checkpoint (a resumed run, evaluation, the shrink, a distillation teacher, the
engine converter, the benchmarks, the comparison campaign) finds it here (``find``/``open``: the
newest valid ``iter_N`` under a ``--save`` folder, invalid ones skipped with their reasons), and
asks it what it holds: its trainer state (read once, on first use, without running code), config,
padded vocabulary, the engine that wrote it, the tokenizer it was trained with and its lineage. No
weights are read here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from pretrain.checkpoint.atomic import find_checkpoint
from pretrain.checkpoint.files import TRAINER_STATE, CheckpointError, engine_of
from pretrain.checkpoint.tokenizer import checkpoint_tokenizer, checkpoint_tokenizer_identity
from pretrain.checkpoint.trust import load_without_code
from pretrain.config import PretrainConfig
from pretrain.pruning.state import PruningState

# trainer-state keys that say where the model came from; carried into every later checkpoint
LINEAGE_KEYS = ("shrink_history", "imported_from")


def read_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, TRAINER_STATE)
    state = load_without_code(path, path)
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(f"{path}: not a trainer state (no iteration); the checkpoint is corrupt")
    return state


def lineage(trainer_state: dict) -> dict:
    """The keys saying a model was shrunk or imported, to carry into every later checkpoint."""
    return {k: trainer_state[k] for k in LINEAGE_KEYS if trainer_state.get(k)}


def deepspeed_only(folder: str) -> str | None:
    """The advice for a reader of weights in the layout-free (megatron) format (evaluation, HF
    export, the reshard tool, a distillation teacher) given a DeepSpeed checkpoint; None for
    any other checkpoint."""
    if engine_of(folder) != "deepspeed":
        return None
    return (f"{folder} is a DeepSpeed checkpoint: its weights are in ZeRO partitions that only an --engine "
            "deepspeed run on the layout that wrote them reads. Convert it once: python "
            f"tools/convert_checkpoint.py --load {folder} --save NEW --to megatron, and give NEW instead "
            "(under either engine)")


@dataclass(frozen=True)
class StoredCheckpoint:
    """One valid checkpoint folder and what its trainer state says (read on first use, once)."""

    folder: str
    # the trainer state when the caller has it already (a run's own snapshot, a test); else read
    given_state: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def find(cls, path: str | None, skipped: list[str] | None = None,
             checksums: bool = True) -> StoredCheckpoint | None:
        """The newest valid checkpoint under ``path`` (a ``--save`` folder or one ``iter_N``);
        None when there is none (yet). Invalid ones are skipped, each reason appended to ``skipped``.
        ``checksums``: as ``find_checkpoint``'s."""
        folder = find_checkpoint(path, skipped, checksums) if path else None
        return None if folder is None else cls(folder)

    @classmethod
    def open(cls, path: str, flag: str, error: type[Exception] = CheckpointError,
             checksums: bool = True) -> StoredCheckpoint:
        """``find``, or ``error`` saying that ``flag path`` holds no valid checkpoint (and why each
        candidate there was skipped)."""
        skipped: list[str] = []
        found = cls.find(path, skipped, checksums) if os.path.exists(path) else None
        if found is None:
            reasons = f" ({'; '.join(skipped)})" if skipped else ""
            raise error(f"{flag} {path}: no valid checkpoint there{reasons}")
        return found

    @classmethod
    def of(cls, value: StoredCheckpoint | tuple[str, dict] | None) -> StoredCheckpoint | None:
        """A ``(folder, trainer state)`` pair, the form older callers and tests give, as a StoredCheckpoint."""
        if value is None or isinstance(value, StoredCheckpoint):
            return value
        folder, state = value
        return cls(folder, state)

    @cached_property
    def trainer_state(self) -> dict:
        return self.given_state if self.given_state is not None else read_trainer_state(self.folder)

    @property
    def iteration(self) -> int:
        return int(self.trainer_state["iteration"])

    @cached_property
    def config(self) -> PretrainConfig:
        return PretrainConfig.from_dict(self.trainer_state["config"])

    @property
    def vocab_size(self) -> int | None:
        """The padded vocabulary its weights have (None in a checkpoint from before it was recorded)."""
        vocab = self.trainer_state.get("vocab_size")
        return None if vocab is None else int(vocab)

    @property
    def engine(self) -> str:
        return engine_of(self.folder)

    @property
    def deepspeed_only(self) -> str | None:
        """``deepspeed_only``: the advice for a reader of layout-free weights, or None."""
        return deepspeed_only(self.folder)

    @property
    def weights_only(self) -> bool:
        """Weights alone (an imported model): no optimizer, trainer or RNG state to continue."""
        return bool(self.trainer_state.get("weights_only"))

    @property
    def has_megatron_optimizer(self) -> bool:
        """False for a checkpoint whose AdamW state, if any, is in model space (converted between
        engines, the DeepSpeed in-run shrink's): not megatron-core's optimizer format."""
        return bool(self.trainer_state.get("optimizer_state", True))

    @property
    def lineage(self) -> dict:
        return lineage(self.trainer_state)

    @property
    def pruning(self) -> dict | None:
        """Its stored pruning state (``PruningState.stored_dict``), None when it has none."""
        return PruningState.stored_dict(self.trainer_state)

    @property
    def tokenizer_files(self) -> tuple[str, str] | None:
        """``checkpoint_tokenizer``: (--tokenizer-type, --tokenizer-model) it was trained with."""
        return checkpoint_tokenizer(self.folder, self.trainer_state)

    def tokenizer_identity(self) -> tuple | None:
        """``checkpoint_tokenizer_identity``: (identity, where recorded), or None."""
        return checkpoint_tokenizer_identity(self.folder, self.trainer_state)
