"""The pruning state: the one reader and writer of the pruning part of a checkpoint.

A checkpoint's trainer state holds it under ``callbacks.pruning``; nothing else opens that dict
(the shrink, the HF export, evaluation and the entry point all go through ``PruningState``).

The schedule's two ends are absolute parameter counts of the model the schedule started from
(``initial_params``, ``final_params``): they do not change when the model is shrunk in-run or the
run is resumed, so the plan printed at any point is the original one, and ``current_params`` of
the callback says what is left of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.model.shape import GroupMasks, ModelShape
from pretrain.pruning.masks import GroupScores

# where the pruning callback's state sits in a checkpoint's trainer state
CHECKPOINT_KEY = "pruning"


@dataclass
class PruningState:
    masks: GroupMasks
    initial_params: int  # the model the schedule started from (before any in-run shrink)
    final_params: int  # the target, in parameters of that same model
    # widths of that model (query groups, FFN channels, hidden channels, layers): kept ratios
    # are fractions of these, so they mean the same before and after a shrink
    original: dict
    ema: GroupScores | None = None  # the saliency EMA so far
    ema_steps: int = 0
    history: list = field(default_factory=list)  # one record per pruning event
    shrunk_at_params: int | None = None  # parameter count at the last in-run shrink
    shrink_points_done: list = field(default_factory=list)  # --shrink-at token counts already shrunk at
    # the iteration whose checkpoint was saved for an in-run shrink; the shrink clears it in the
    # shrunk checkpoint, so a run resumed from the unshrunk one knows to shrink first
    shrink_requested_at: int | None = None
    # (event iteration, loss of the step that ended there): the loss jump still to be measured
    loss_before_event: tuple | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def fresh(cls, shape: ModelShape, target_params: int | None, target_ratio: float | None) -> "PruningState":
        """The state of a schedule starting now on the (unpruned) model ``shape``."""
        masks = shape.full_masks()
        initial = shape.parameter_count(masks)
        return cls(masks=masks, initial_params=initial, final_params=_target(initial, target_params, target_ratio),
                   original={"groups": shape.num_groups, "ffn": shape.ffn, "hidden": shape.hidden,
                             "layers": shape.num_layers})

    def target_for(self, target_params: int | None, target_ratio: float | None) -> int:
        """A --prune-target-* setting in parameters of the model the schedule started from."""
        return _target(self.initial_params, target_params, target_ratio)

    # ------------------------------------------------------------------ checkpoint form
    def to_dict(self) -> dict:
        return {"masks": self.masks.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_steps": self.ema_steps, "history": self.history,
                "initial_params": self.initial_params, "final_params": self.final_params,
                "shrunk_at_params": self.shrunk_at_params, "shrink_points_done": list(self.shrink_points_done),
                "shrink_requested_at": self.shrink_requested_at,
                "loss_before_event": list(self.loss_before_event) if self.loss_before_event else None,
                "original": dict(self.original)}

    @classmethod
    def from_dict(cls, d: dict, fallback: "PruningState | None" = None) -> "PruningState":
        """Read the stored form. Keys an older checkpoint lacks come from ``fallback`` (a fresh state
        of the current model) when it is given; ``masks`` is always required."""

        def stored(key: str):
            if key in d and d[key] is not None:
                return d[key]
            if fallback is None:
                raise KeyError(f"the pruning state has no {key!r}")
            return getattr(fallback, key)

        pending = d.get("loss_before_event")
        return cls(masks=GroupMasks.from_state_dict(d["masks"]),
                   initial_params=int(stored("initial_params")), final_params=int(stored("final_params")),
                   original=dict(stored("original")),
                   ema=GroupScores.from_state_dict(d["ema"]) if d.get("ema") is not None else None,
                   ema_steps=int(d.get("ema_steps", 0)), history=list(d.get("history", [])),
                   shrunk_at_params=d.get("shrunk_at_params"),
                   shrink_points_done=list(d.get("shrink_points_done", [])),
                   shrink_requested_at=d.get("shrink_requested_at"),
                   loss_before_event=tuple(pending) if pending is not None else None)

    @staticmethod
    def removes_groups(masks: GroupMasks, shape: ModelShape) -> bool:
        """Whether ``masks`` remove anything from the model ``shape`` describes: the one rule (the
        HF export, a distillation teacher, the pruning callback). Not "any mask False": a per-layer
        shrunk model's masks are False past each narrower layer's width, entries that do not exist."""
        return not masks.equal(shape.full_masks())

    @staticmethod
    def stored_masks(trainer_state: dict) -> GroupMasks | None:
        """Only the masks of a checkpoint's pruning state (None: the checkpoint has none); for
        readers that need nothing else (evaluation, export) and may meet any layout of the state."""
        d = PruningState.stored_dict(trainer_state)
        return GroupMasks.from_state_dict(d["masks"]) if d else None

    @staticmethod
    def stored_dict(trainer_state: dict | None) -> dict | None:
        """The raw stored pruning state of a checkpoint's trainer state, or None."""
        if not trainer_state:
            return None
        return (trainer_state.get("callbacks") or {}).get(CHECKPOINT_KEY) or None

    @classmethod
    def in_checkpoint(cls, trainer_state: dict | None, fallback: "PruningState | None" = None) -> "PruningState | None":
        d = cls.stored_dict(trainer_state)
        return cls.from_dict(d, fallback) if d else None

    def stored_in(self, trainer_state: dict) -> dict:
        """A copy of ``trainer_state`` holding this pruning state."""
        callbacks = dict(trainer_state.get("callbacks") or {})
        callbacks[CHECKPOINT_KEY] = self.to_dict()
        return {**trainer_state, "callbacks": callbacks}

    def replace(self, **changes) -> "PruningState":
        return dataclasses.replace(self, **changes)


def _target(initial_params: int, target_params: int | None, target_ratio: float | None) -> int:
    if target_params is not None:
        return int(target_params)
    if target_ratio is None:  # no target (a state read with pruning switched off): nothing to remove
        return int(initial_params)
    return int(round(initial_params * target_ratio))
