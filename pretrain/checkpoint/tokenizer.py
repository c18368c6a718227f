"""The tokenizer a checkpoint was trained with, and the vocabulary its softmax covers.

What a checkpoint records of its tokenizer (``trainer_state["tokenizer"]``, the
``pretrain.data.TokenizerIdentity`` rule), where its files are (its config's
``--tokenizer-model``, or a copy that moved with the checkpoint), and the check that a tokenizer
is that one. Resuming (``pretrain.resume``), evaluation, distillation and HF export and import all
read a checkpoint's tokenizer here: none of them asks another for it.
"""

from __future__ import annotations

import dataclasses
import os

from data_prep.tokenizers import TokenizerError, build_tokenizer
from pretrain.config import ConfigError, PretrainConfig
from pretrain.data import TokenizerIdentity, tokenizer_identity, tokenizer_identity_problem


def tokenizer_record(tokenizer, also: tuple = ()) -> dict:
    """What a checkpoint records of the tokenizer it was trained with (``trainer_state["tokenizer"]``);
    ``also``: files of the same tokenizer in another format (``pretrain.data.TokenizerIdentity``)."""
    return {} if tokenizer is None else {"tokenizer": dataclasses.asdict(tokenizer_identity(tokenizer, also))}


def checkpoint_tokenizer(folder: str, state: dict) -> tuple[str, str] | None:
    """(--tokenizer-type, --tokenizer-model) recorded in a checkpoint; a recorded copy that moved
    with its checkpoint folder (``ROOT/tokenizer``) is found beside it."""
    data = PretrainConfig.from_dict(state["config"]).data
    if not data.tokenizer_model or data.tokenizer_type == "NullTokenizer":
        return None
    if not os.path.exists(data.tokenizer_model) and os.path.basename(data.tokenizer_model.rstrip("/")) == "tokenizer":
        moved = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")
        if os.path.isdir(moved):
            return data.tokenizer_type, moved
    return data.tokenizer_type, data.tokenizer_model


def checkpoint_tokenizer_identity(folder: str, trainer_state: dict) -> tuple | None:
    """(identity, where it is recorded) of the tokenizer a checkpoint was trained with
    (``pretrain.data.TokenizerIdentity``): recorded in it, or (a checkpoint from before that) read
    from the tokenizer file its config names; None when nothing tells."""
    if trainer_state.get("tokenizer"):
        record = trainer_state["tokenizer"]
        return (TokenizerIdentity(record["vocab_size"], record.get("sha256"), tuple(record.get("also", ()))),
                "recorded in its trainer state")
    recorded = checkpoint_tokenizer(folder, trainer_state)
    if recorded is None:
        return None
    try:
        return tokenizer_identity(build_tokenizer(*recorded)), f"its config names {recorded[1]}"
    except (TokenizerError, OSError):
        return None  # moved or deleted: nothing to compare with

def check_checkpoint_tokenizer(flag: str, folder: str, trainer_state: dict, tokenizer) -> None:
    """The tokenizer identity rule (``pretrain.data.tokenizer_identity_problem``) for a checkpoint
    given as ``flag`` (--load, --kd-teacher): its embeddings mean the tokens of the tokenizer it
    was trained with, and no other."""
    recorded = checkpoint_tokenizer_identity(folder, trainer_state) if tokenizer is not None else None
    problem = recorded and tokenizer_identity_problem(f"{flag} {folder}", "the checkpoint was trained",
                                                      *recorded, tokenizer)
    if problem:
        raise ConfigError(problem)


def unpadded_vocab(model_cfg, trainer_state: dict | None, tokenizer_vocab: int) -> int:
    """The vocabulary the model's softmax covers (``ModelConfig.unpadded_vocab_size``): the
    checkpoint's recorded one, an imported model's own (a checkpoint from before it was
    recorded), else the tokenizer's (the one the checkpoint was trained with: the tokenizer
    identity rule, ``check_checkpoint_tokenizer``, holds it to that)."""
    if model_cfg.unpadded_vocab_size is not None:
        return int(model_cfg.unpadded_vocab_size)
    imported = (trainer_state or {}).get("imported_from") or {}
    return int(imported.get("vocab_size") or tokenizer_vocab)
