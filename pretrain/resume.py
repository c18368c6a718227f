"""What a ``--load`` checkpoint decides about the run that loads it.

The checkpoint is found once (``pretrain.checkpoint.stored.StoredCheckpoint``: its folder and
trainer state, no weights); from it come the model shape (``--use-checkpoint-args``, a shrunk or an
imported checkpoint), the padded vocabulary and the pruning settings that continue (DESIGN
invariant 9). Used by the run (``pretrain.run.build``), the command line
(``pretrain.run.arguments``) and evaluation (``pretrain.evaluate``). Each function taking a
checkpoint accepts a StoredCheckpoint or a ``(folder, trainer state)`` pair.
"""

from __future__ import annotations

import dataclasses
import math

from pretrain.checkpoint.tokenizer import (  # noqa: F401  (re-exported: their old home)
    check_checkpoint_tokenizer, checkpoint_tokenizer_identity, tokenizer_record, unpadded_vocab)
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import ConfigError, PretrainConfig, flag_of
from pretrain.engines.optim import SCHEDULE_KEYS, learning_rate_at, schedule_settings
from pretrain.pruning.state import PruningState

Stored = StoredCheckpoint | tuple[str, dict] | None


def peek_checkpoint(load: str | None) -> StoredCheckpoint | None:
    """The checkpoint under ``load`` (its trainer state read on first use), or None when there is none yet."""
    return StoredCheckpoint.find(load)


def checkpoint_vocab(stored: Stored, tokenizer_vocab: int, tp: int) -> int | None:
    """The padded vocabulary of the checkpoint to load, when it fits this TP size.

    Padding depends on TP (a multiple of make_vocab_size_divisible_by x TP); a checkpoint padded
    for another TP keeps its own size when that divides the new TP, so it loads unchanged.
    """
    stored = StoredCheckpoint.of(stored)
    if stored is None or stored.vocab_size is None:
        return None
    folder, vocab = stored.folder, stored.vocab_size
    if vocab < tokenizer_vocab:
        raise ConfigError(f"--load {folder}: its vocabulary ({vocab}) is smaller than the tokenizer's "
                          f"({tokenizer_vocab}); use the tokenizer the checkpoint was trained with")
    if vocab % tp:
        raise ConfigError(f"--load {folder}: its padded vocabulary ({vocab}) is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    return vocab


def with_unpadded_vocab(cfg: PretrainConfig, stored: Stored, tokenizer_vocab: int) -> PretrainConfig:
    """``cfg`` with the model's unpadded vocabulary set (see ``unpadded_vocab``)."""
    stored = StoredCheckpoint.of(stored)
    vocab = unpadded_vocab(cfg.model, stored.trainer_state if stored else None, tokenizer_vocab)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unpadded_vocab_size=vocab))


def with_checkpoint_model(cfg: PretrainConfig, stored: Stored) -> PretrainConfig:
    """The model shape saved in the checkpoint: with --use-checkpoint-args, or always for a shrunk
    checkpoint (it carries its smaller shape; the run's flags describe the original model) and an
    imported one (its shape is the HF model's)."""
    stored = StoredCheckpoint.of(stored)
    use = cfg.checkpoint.use_checkpoint_args or (stored is not None and bool(stored.lineage))
    if not use:
        return cfg
    if stored is None:
        raise ConfigError("--use-checkpoint-args needs a valid checkpoint under --load")
    saved = stored.config
    if cfg.checkpoint.use_checkpoint_args:
        return dataclasses.replace(cfg, model=saved.model)
    # the shape is the checkpoint's; the sequence length (no weights depend on it) stays the run's
    return dataclasses.replace(cfg, model=dataclasses.replace(saved.model, seq_length=cfg.model.seq_length))


def with_checkpoint_pruning(cfg: PretrainConfig, checkpoint: Stored) -> tuple[PretrainConfig, str]:
    """A checkpoint's pruning state is never dropped silently (DESIGN invariant 9).

    Resumed without --prune-* flags, the checkpoint's own pruning settings continue; with them,
    the flags' settings continue from the checkpoint's masks (a different target is applied from
    the resume on: ``PruningCallback.load_state_dict``). --end-pruning keeps the masks but removes
    nothing more; --drop-pruning-state discards them. Returns the config and a note for the log
    saying which of these happened.
    """
    checkpoint = StoredCheckpoint.of(checkpoint)
    prune = cfg.prune
    stored = checkpoint.pruning if checkpoint else None
    if prune.end_pruning and prune.drop_state:
        raise ConfigError("--end-pruning and --drop-pruning-state exclude each other: pick one")
    if stored is None:
        if prune.end_pruning or prune.drop_state:
            flag = "--end-pruning" if prune.end_pruning else "--drop-pruning-state"
            where = f"the checkpoint {checkpoint.folder}" if checkpoint else "no checkpoint (--load)"
            raise ConfigError(f"{flag} applies to a checkpoint with pruning state, and {where} has none")
        return cfg, ""
    folder = checkpoint.folder
    if prune.drop_state:
        off = dataclasses.replace(prune, target_params=None, target_ratio=None, drop_state=True)
        return dataclasses.replace(cfg, prune=off), (
            f"--drop-pruning-state: the pruning state of {folder} is discarded; its pruned groups "
            "(zero weights) train again")
    saved = checkpoint.config.prune
    if not prune.enabled:
        cfg = dataclasses.replace(cfg, prune=_adopted_pruning(cfg, checkpoint.config))
        source = "its own pruning settings (no --prune-* flags given)"
    else:
        changes = changed_settings(saved, cfg.prune, skip=_PER_RESUME)
        source = ("its own pruning settings" if not changes else
                  f"its pruning settings, changed by this command: {'; '.join(changes)}")
    if cfg.prune.end_pruning:
        return cfg, (f"--end-pruning: the masks of {folder} stay applied; no further groups are removed"
                     + ("" if cfg.prune.shrink_at or cfg.prune.shrink_auto else
                        " (shrink them with --shrink-at or tools/reshard_checkpoint.py --shrink)"))
    return cfg, (f"resuming the pruning state of {folder} with {source}; --end-pruning stops removing "
                 "groups, --drop-pruning-state discards the masks")


def _adopted_pruning(cfg: PretrainConfig, saved: PretrainConfig):
    """The checkpoint's pruning settings, with this command's --end-pruning and, when it says
    anything about the shrink, its shrink settings."""
    prune = cfg.prune
    adopted = dataclasses.replace(saved.prune, end_pruning=prune.end_pruning, drop_state=False)
    if prune.end_pruning or prune.shrink_at or prune.shrink_auto:
        adopted = dataclasses.replace(
            adopted, shrink_at=prune.shrink_at, shrink_auto=prune.shrink_auto,
            shrink_every_fraction=prune.shrink_every_fraction,
            shrink_tensor_parallel_size=prune.shrink_tensor_parallel_size,
            shrink_pipeline_parallel_size=prune.shrink_pipeline_parallel_size)
    return adopted


def with_checkpoint_distill(cfg: PretrainConfig, stored: Stored) -> tuple[PretrainConfig, str]:
    """A checkpoint trained with a teacher keeps it: resumed without --kd-teacher, its --kd-*
    settings continue (the teacher is reloaded from the recorded path). With --kd-teacher, the
    command's settings apply. Returns the config and a note for the log."""
    stored = StoredCheckpoint.of(stored)
    if stored is None:
        return cfg, ""
    saved = stored.config.distill
    if not saved.enabled:
        return cfg, ""
    if cfg.distill.enabled:
        changes = changed_settings(saved, cfg.distill)
        return cfg, (f"distillation settings of {stored.folder} changed by this command: {'; '.join(changes)}"
                     if changes else "")
    return dataclasses.replace(cfg, distill=saved), (
        f"resuming distillation from the teacher {saved.teacher} recorded in {stored.folder} "
        f"(--kd-weight {saved.weight:g}, --kd-temperature {saved.temperature:g}"
        + (f", --kd-until-tokens {saved.until_tokens:,}" if saved.until_tokens is not None else "") + ")")


# what this command does at this resume, never a checkpoint's setting to keep
_PER_RESUME = ("end_pruning", "drop_state")
_SHRINK_FIELDS = ("shrink_at", "shrink_auto", "shrink_every_fraction", "shrink_tensor_parallel_size",
                  "shrink_pipeline_parallel_size")
# fields of which a command gives one: giving one replaces the checkpoint's choice of the pair
_ALTERNATIVES = (("target_params", "target_ratio"),)
# --eval-tasks and its settings: a resumed run goes on scoring the same documents (``--eval-tasks none`` stops)
_EVAL_TASKS = ("eval_tasks", "eval_tasks_limit", "eval_tasks_num_fewshot", "eval_tasks_interval")


def keep_checkpoint_settings(cfg: PretrainConfig, state: dict, given: frozenset[str]) -> PretrainConfig:
    """On resume a flag given changes only itself (issue 31, item 3): the pruning, distillation and
    optimizer settings that the command line (``given``: the config fields its flags set) does not
    give are the --load checkpoint's, not the flags' defaults; so are the --eval-tasks settings.
    Optimizer settings only when the run continues the checkpoint's training (not --finetune, not
    an imported model).

    Exceptions, each the meaning of a flag: --end-pruning and --drop-pruning-state act on this
    resume only; --end-pruning without --shrink-* keeps the masks unshrunk (the shrink is asked
    for explicitly); and --drop-pruning-state discards the checkpoint's pruning settings too."""
    if "config" not in state:
        return cfg
    saved = PretrainConfig.from_dict(state["config"])
    if PruningState.stored_dict(state) is not None and not cfg.prune.drop_state:
        command = set(_PER_RESUME) | (set(_SHRINK_FIELDS) if cfg.prune.end_pruning else set())
        cfg = dataclasses.replace(cfg, prune=_merged(saved.prune, cfg.prune, given | command))
    if saved.distill.enabled:
        cfg = dataclasses.replace(cfg, distill=_merged(saved.distill, cfg.distill, given))
    if not (cfg.checkpoint.finetune or state.get("weights_only")):
        cfg = dataclasses.replace(cfg, optim=_merged(saved.optim, cfg.optim, given))
    kept = {name: getattr(saved.train, name) for name in _EVAL_TASKS if name not in given}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kept))


def _merged(saved, command, given: set | frozenset):
    """``command``'s values of the fields in ``given`` (and of their alternatives), ``saved``'s of the rest."""
    names = {f.name for f in dataclasses.fields(command)}
    ours = set(given) & names
    for pair in _ALTERNATIVES:
        if ours & set(pair):
            ours |= set(pair) & names
    return dataclasses.replace(saved, **{name: getattr(command, name) for name in ours})


def changed_settings(saved, now, skip: tuple = ()) -> list[str]:
    """'FLAG OLD -> NEW' for each flagged field of a config section that differs."""
    return [f"{flag_of(type(now), f.name)} {_shown(getattr(saved, f.name))} -> {_shown(getattr(now, f.name))}"
            for f in dataclasses.fields(now)
            if "flag" in f.metadata and f.name not in skip and getattr(saved, f.name) != getattr(now, f.name)]


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def with_checkpoint_schedule(cfg: PretrainConfig, checkpoint: Stored) -> tuple[PretrainConfig, str]:
    """The LR schedule of a resumed run is never changed silently (issue 31, item 2; Megatron-LM's
    convention). The checkpoint stores the schedule it was trained on; when this command's
    (--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, --lr-decay-iters or, without it, the
    training length, --weight-decay) differs: --use-checkpoint-opt_param-scheduler keeps the
    checkpoint's (and the config says so, for the plan line), --override-opt_param-scheduler
    follows this command's from the checkpoint's iteration on, and neither stops the run naming
    each difference and what each choice would do. Returns the config and a note for the log."""
    checkpoint = StoredCheckpoint.of(checkpoint)
    if (checkpoint is None or cfg.checkpoint.finetune or checkpoint.weights_only
            or "scheduler" not in checkpoint.trainer_state):
        return cfg, ""
    folder, stored = checkpoint.folder, checkpoint.trainer_state["scheduler"]
    ours = schedule_settings(cfg.optim, cfg.total_iters())
    differ = [k for k in SCHEDULE_KEYS if k in stored and not _same(stored[k], ours[k])]
    if not differ:
        return cfg, ""
    step = int(stored.get("num_steps", checkpoint.trainer_state.get("iteration", 0)))
    described = "; ".join(_schedule_change(key, stored, ours, cfg) for key in differ
                          if not (key in ("end_wd", "wd_incr_steps") and _implied(key, differ)))
    theirs_lr, ours_lr = learning_rate_at(stored, step), learning_rate_at(ours, step)
    if cfg.checkpoint.use_checkpoint_opt_param_scheduler:
        optim = dataclasses.replace(cfg.optim, lr=stored["max_lr"], min_lr=stored["min_lr"],
                                    lr_warmup_iters=int(stored["lr_warmup_steps"]),
                                    lr_decay_iters=int(stored["lr_decay_steps"]),
                                    lr_decay_style=stored["lr_decay_style"], weight_decay=stored["start_wd"])
        return dataclasses.replace(cfg, optim=optim), (
            f"--use-checkpoint-opt_param-scheduler: the LR schedule of {folder} continues (LR {theirs_lr:.4g} at "
            f"iteration {step}); not applied: {described}")
    if cfg.checkpoint.override_opt_param_scheduler:
        return cfg, (f"--override-opt_param-scheduler: from iteration {step} the LR follows this command's schedule "
                     f"({described}): LR {ours_lr:.4g} there, where the checkpoint's schedule gives {theirs_lr:.4g}")
    raise ConfigError(
        f"--load {folder}: this command's LR schedule differs from the one the checkpoint was trained on: "
        f"{described}. Give --use-checkpoint-opt_param-scheduler to keep the checkpoint's (LR {theirs_lr:.4g} at "
        f"iteration {step}, then as before), or --override-opt_param-scheduler to follow this command's from "
        f"iteration {step} (LR {ours_lr:.4g} there)")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _implied(key: str, differ: list[str]) -> bool:
    """end_wd follows start_wd, wd_incr_steps the decay length: not said twice."""
    return {"end_wd": "start_wd", "wd_incr_steps": "lr_decay_steps"}[key] in differ


_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay", "end_wd": "--weight-decay",
                   "wd_incr_steps": "weight-decay steps"}


def _schedule_change(key: str, stored: dict, ours: dict, cfg: PretrainConfig) -> str:
    if key == "lr_decay_steps":
        source = ("--lr-decay-iters" if cfg.optim.lr_decay_iters else
                  "--train-iters" if cfg.train.train_iters is not None else "--train-tokens")
        return (f"decay over {ours[key]} iterations ({source}), the checkpoint's over {stored[key]}")
    return f"{_SCHEDULE_FLAGS[key]} {_shown(ours[key])}, the checkpoint's {_shown(stored[key])}"
