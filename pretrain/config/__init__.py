"""Typed configs, one per component; each validates itself with a message that names the flag.

Every command-line flag is declared once, on the field it sets (``flag(...)``: Megatron-LM's name
where one exists, default, help; choices are ``Literal`` types). ``pretrain/run/arguments.py``
builds the parser from these declarations and only fills the configs; nothing reads a global
namespace. One module per section: ``flags`` (the declarations, ranges, parsers), ``model``,
``parallel`` (+ the ``--deepspeed-config`` policy), ``data`` (+ blends), ``training`` (optimizer,
training, checkpointing, logging), ``prune``, ``distill`` and ``pretrain`` (the whole run and the
checks that cross sections). This package imports nothing of the project but ``pretrain.errors``
(and ``pretrain.model.shape`` for the parameter count, which imports nothing of it); every name
is re-exported here.
"""

from pretrain.config.data import DataConfig, parse_blend, read_data_args
from pretrain.config.distill import DistillConfig
from pretrain.config.flags import (Flag, check_ranges, choices, comma_list, flag, flag_of, ranged, require,
                                   require_choice, token_count, whole_number)
from pretrain.config.model import MODEL_PRESETS, ModelConfig, layer_shapes_file
from pretrain.config.parallel import ParallelConfig, read_deepspeed_json
from pretrain.config.pretrain import PretrainConfig
from pretrain.config.prune import PRUNE_TYPES, PruneConfig, PruneType, shrink_points
from pretrain.config.training import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from pretrain.errors import ConfigError

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DistillConfig", "Flag", "LoggingConfig", "MODEL_PRESETS",
           "ModelConfig", "OptimConfig", "PRUNE_TYPES", "ParallelConfig", "PretrainConfig", "PruneConfig", "PruneType",
           "TrainConfig", "check_ranges", "choices", "comma_list", "flag", "flag_of", "layer_shapes_file",
           "parse_blend", "ranged", "read_data_args", "read_deepspeed_json", "require", "require_choice",
           "shrink_points", "token_count", "whole_number"]
