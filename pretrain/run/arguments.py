"""Command line -> typed configs. The parser is built from the flags declared on the config
fields (``pretrain.config.flag``): one declaration per flag, Megatron-LM's names where one exists.

Besides those, four flags belong to the command line itself: ``--model`` (a preset shape),
``--group-query-attention`` (Megatron-LM's switch: GQA with ``--num-query-groups``, default 1),
``--data-args-path`` (a file standing for ``--data-path``) and ``--launcher``. ``tests/pretrain/config/test_flags.py`` freezes the whole set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Literal

from data_prep.tokenizers import infer_tokenizer_type
from pretrain.config import (
    MODEL_PRESETS,
    ConfigError,
    DataConfig,
    Flag,
    ModelConfig,
    PretrainConfig,
    parse_blend,
    read_data_args,
)
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.distributed import LAUNCHERS
from pretrain.resume import keep_checkpoint_settings, peek_checkpoint


class _RecordingParser(argparse.ArgumentParser):
    """Records in ``args.given_flags`` the config fields the command line set, so that on resume a
    flag not given keeps the checkpoint's value rather than its default (``resume.keep_checkpoint_settings``)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        defaults = [(action, action.default) for action in self._actions]
        try:  # parsed again with no defaults: what remains was given
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            given, _ = super().parse_known_args(args, None)
        finally:
            for action, default in defaults:
                action.default = default
        names = set(vars(given))
        for _, cls in _sections():  # a flag that sets several fields sets each of them
            for f, spec in flagged_fields(cls):
                if spec.expand and f.name in names:
                    names |= set(spec.expand(getattr(parsed, f.name)))
        parsed.given_flags = frozenset(names)
        return parsed, rest


def _sections() -> list[tuple[str, type]]:
    """(PretrainConfig field, its config class), in the order the help lists them."""
    hints = typing.get_type_hints(PretrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(PretrainConfig)]


def flagged_fields(cls) -> list[tuple[dataclasses.Field, Flag]]:
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def flag_name(f: dataclasses.Field, spec: Flag) -> str:
    return spec.name or "--" + f.name.replace("_", "-")


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _argument(f: dataclasses.Field, spec: Flag, hint) -> dict:
    """add_argument keywords of one flagged field, from its type, default and Flag."""
    default = _field_default(f)
    shown = None if spec.resolved_later or spec.action or default in (None, False, (), []) else default
    kwargs = {"dest": f.name, "help": (spec.help + (f" (default: {_shown(shown)})" if shown is not None else ""))
              or None}
    base = _without_none(hint)
    if spec.action or base is bool:
        return {**kwargs, "action": spec.action or "store_true"}
    if typing.get_origin(base) is Literal:
        kwargs["choices"] = list(typing.get_args(base))
    elif typing.get_origin(base) is list:
        kwargs["nargs"] = "+"
    kwargs["type"] = spec.parse or (base if base in (int, float) else str)
    kwargs["metavar"] = spec.metavar or flag_name(f, spec)[2:].replace("-", "_").upper()
    # a value left to a preset, the checkpoint or the tokenizer file stays None here
    kwargs["default"] = None if spec.resolved_later or spec.expand else default
    return kwargs


def _without_none(hint):
    """``X`` of ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = _RecordingParser(prog="python -m pretrain", description="Pruning-aware pretraining on megatron-core.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    model = groups["model"] = p.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODEL_PRESETS), default=None,
                       help="a preset shape; explicit flags below override its values")
    model.add_argument("--group-query-attention", action="store_true",
                       help="grouped-query attention (Megatron-LM): --num-query-groups groups, 1 unless given "
                            "(--num-query-groups alone also sets them)")
    dests: set[str] = set()
    for _, cls in _sections():
        if cls.cli_group not in groups:
            groups[cls.cli_group] = p.add_argument_group(cls.cli_group)
        group = groups[cls.cli_group]
        hints = typing.get_type_hints(cls)
        for f, spec in flagged_fields(cls):
            assert f.name not in dests, f"two config fields named {f.name}: give one a distinct dest"
            dests.add(f.name)
            group.add_argument(flag_name(f, spec), **_argument(f, spec, hints[f.name]))
    groups["data"].add_argument(
        "--data-args-path", help="a file holding the --data-path list (whitespace-separated, e.g. one 'W PREFIX' "
        "a line): for blends of thousands of datasets (Megatron-LM's flag)")
    groups["data"].add_argument(
        "--per-split-data-args-path", help="a JSON file {\"train\": [...], \"valid\": [...], \"test\": [...]} "
        "holding --train-data-path, --valid-data-path and --test-data-path (Megatron-LM's flag)")
    groups["parallelism"].add_argument(
        "--launcher", choices=list(LAUNCHERS), default="auto",
        help="how ranks are found: torchrun's variables, an srun step with one task per device, or MPI "
             "(mpirun; mpi4py gives ranks and the master address). auto tries them in that order")
    return p


# what the weights' shapes depend on: a --load checkpoint's values win, and flags must agree
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "kv_channels", "untie_embeddings_and_output_weights", "add_qkv_bias", "layer_shapes")
_REQUIRED_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def _given_model_values(args: argparse.Namespace) -> tuple[dict, dict]:
    """(values, where each came from: '--model P' or the flag) from the preset and explicit flags."""
    values = dict(MODEL_PRESETS[args.model]) if args.model else {}
    sources = {name: f"--model {args.model}" for name in values}
    for f, spec in flagged_fields(ModelConfig):
        value = getattr(args, f.name)
        if value is not None and value is not False:  # a store_true flag counts when given
            values[f.name], sources[f.name] = value, flag_name(f, spec)
    if args.group_query_attention and "num_query_groups" not in values:
        # Megatron-LM's default --num-query-groups under --group-query-attention
        values["num_query_groups"], sources["num_query_groups"] = 1, "--group-query-attention"
    return values, sources


def _effective(model: ModelConfig, name: str):
    return {"num_query_groups": model.query_groups, "kv_channels": model.head_dim}.get(name, getattr(model, name))


def checkpoint_model_values(saved: ModelConfig, given: dict, sources: dict, folder: str,
                            check_agreement: bool) -> dict:
    """The model of a --load checkpoint, with the given non-shape values (sequence length, RoPE
    base, ...) on top. A given shape value that differs from the checkpoint's is refused: the
    weights could not load into it (a preset's non-shape values are the checkpoint's business)."""
    import dataclasses

    values = dataclasses.asdict(saved)
    for name, value in given.items():
        if name in _SHAPE_FIELDS:
            if check_agreement and value != _effective(saved, name):
                label = name.replace("_", "-")
                raise ConfigError(
                    f"{sources[name]} says {label} {value}, but the checkpoint {folder} (--load) has {label} "
                    f"{_effective(saved, name)}: drop the shape flags to take the checkpoint's shape, or "
                    "--load another checkpoint")
        elif not sources[name].startswith("--model "):
            values[name] = value
    return values


def _model_values(args: argparse.Namespace, stored: StoredCheckpoint | None) -> dict:
    given, sources = _given_model_values(args)
    if stored is not None:
        folder, state = stored.folder, stored.trainer_state
        # a shrunk checkpoint is smaller than the flags of the run that made it, which describe its parent;
        # --use-checkpoint-args takes the checkpoint's shape whatever the flags say
        check = not (args.use_checkpoint_args or state.get("shrink_history"))
        return checkpoint_model_values(stored.config.model, given, sources, folder, check)
    missing = [n for n in _REQUIRED_SHAPE if n not in given]
    if missing:
        raise ConfigError(
            "the model shape is incomplete: give --model PRESET or "
            + ", ".join("--" + n.replace("_", "-") for n in missing)
            + (f" (--load {args.load} holds no checkpoint to take it from)" if args.load else ""))
    return given


def _tokenizer_values(args: argparse.Namespace, stored: StoredCheckpoint | None) -> tuple[str, str | None]:
    """(--tokenizer-type, --tokenizer-model): the flags, else the --load checkpoint's recorded tokenizer."""
    model = args.tokenizer_model
    if model is None and stored is not None and not args.mock_data and args.tokenizer_type != "NullTokenizer":
        recorded = stored.tokenizer_files
        if recorded is not None:
            return args.tokenizer_type or recorded[0], recorded[1]
    return args.tokenizer_type or infer_tokenizer_type(model), model


def _section_values(args: argparse.Namespace, cls) -> dict:
    """The flagged fields of ``cls`` from the parsed flags (a flag left None keeps the field's default)."""
    values = {}
    for f, spec in flagged_fields(cls):
        value = getattr(args, f.name)
        if spec.expand:
            values.update(spec.expand(value))
        elif value is not None:
            values[f.name] = value
    return values


def _data_path(args: argparse.Namespace) -> list[str]:
    if args.data_args_path is None:
        return args.data_path
    if args.data_path:
        raise ConfigError("--data-path and --data-args-path both give the data: give one of them")
    return read_data_args(args.data_args_path)


def _per_split_paths(args: argparse.Namespace) -> dict:
    """Megatron-LM's --per-split-data-args-path: {"train": [...], "valid": [...], "test": [...]}."""
    path = args.per_split_data_args_path
    if path is None:
        return {}
    given = [f for f in ("data_path", "data_args_path", "train_data_path", "valid_data_path", "test_data_path")
             if getattr(args, f)]
    if given:
        raise ConfigError(f"--per-split-data-args-path {path} gives the data of every split: drop "
                          + ", ".join("--" + f.replace("_", "-") for f in given))
    try:
        with open(path) as f:
            splits = json.load(f)
    except OSError as err:
        raise ConfigError(f"--per-split-data-args-path {path}: cannot read it ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--per-split-data-args-path {path} line {err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(splits, dict) or not splits.get("train") or set(splits) - {"train", "valid", "test"} or \
            not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in splits.values()):
        raise ConfigError(f"--per-split-data-args-path {path}: expected an object with a non-empty \"train\" list "
                          "and optional \"valid\" and \"test\" lists of strings (as --data-path takes them)")
    for split, items in splits.items():
        parse_blend(items, f"--per-split-data-args-path {path} {split!r}")  # its own name in the message
    return {"train_data_path": splits["train"], "valid_data_path": splits.get("valid") or [],
            "test_data_path": splits.get("test") or []}


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return config_and_checkpoint_from_args(args)[0]


def config_and_checkpoint_from_args(args: argparse.Namespace) -> tuple[PretrainConfig, StoredCheckpoint | None]:
    """The run's config, and the --load checkpoint it was resolved against (found here, once: the
    run goes on with the same one)."""
    stored = StoredCheckpoint.of(peek_checkpoint(args.load))
    sections = {name: cls(**_section_values(args, cls)) for name, cls in _sections()
                if cls not in (ModelConfig, DataConfig)}
    tokenizer_type, tokenizer_model = _tokenizer_values(args, stored)
    data = DataConfig(**{**_section_values(args, DataConfig), "tokenizer_type": tokenizer_type,
                         "tokenizer_model": tokenizer_model, "data_path": _data_path(args), **_per_split_paths(args)})
    if args.split is not None and data.per_split:
        raise ConfigError(f"--split {args.split} cuts --data-path into training, validation and test data; with "
                          "--train-data-path (or --per-split-data-args-path) each split has data of its own and "
                          "--split would be ignored: drop it")
    cfg = PretrainConfig(model=ModelConfig(**_model_values(args, stored)), data=data, **sections)
    given = getattr(args, "given_flags", None)  # None: a namespace not from build_parser: all its values count
    return (cfg if stored is None or given is None else keep_checkpoint_settings(cfg, stored.trainer_state, given),
            stored)
