"""The Engine interface holds: both engines implement all of it, and nothing outside
``pretrain/engines/`` recognises an engine by its attributes or reads ZeRO-3's."""
from __future__ import annotations

import inspect
import os
import re

from pretrain.engines.base import Engine
from pretrain.engines.deepspeed import DeepSpeedEngine
from pretrain.engines.megatron import MegatronEngine, as_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# ZeRO-3's partition attributes; hasattr on an optimizer, engine or parameter (a model chunk's
# ``module`` is not an engine question)
_ZERO3 = re.compile(r"\bds_(shape|numel|tensor|id)\b")
_SNIFF = re.compile(r"hasattr\(\s*(\w*optim\w*|\w*engine\w*|\w*param\w*|[\w.]*\.(optimizer|engine))\s*,")


def test_both_engines_implement_the_whole_interface():
    for engine in (MegatronEngine, DeepSpeedEngine):
        assert not engine.__abstractmethods__, f"{engine.__name__} lacks {sorted(engine.__abstractmethods__)}"
        # the checkpoint methods its own_checkpoint_files says the checkpoint calls
        wanted = ("save_files", "load_files", "checkpoint_pickle_globals") if engine.own_checkpoint_files \
            else ("sharded_state_dict", "load_state_dict")
        missing = [m for m in wanted if getattr(engine, m) is getattr(Engine, m)]
        assert not missing, f"{engine.__name__} (own_checkpoint_files={engine.own_checkpoint_files}) lacks {missing}"
        assert engine.name in ("megatron", "deepspeed")
    # an engine's methods take what the base's take (a caller written against Engine works on both)
    for name, method in inspect.getmembers(Engine, inspect.isfunction):
        base = list(inspect.signature(method).parameters)
        for engine in (MegatronEngine, DeepSpeedEngine):
            own = list(inspect.signature(getattr(engine, name)).parameters)
            assert own[:len(base)] == base, f"{engine.__name__}.{name}{own} does not take Engine.{name}{base}"


def test_a_megatron_optimizer_is_seen_as_the_megatron_engine():
    optimizer = object()
    engine = as_engine(optimizer, ["chunk"])
    assert isinstance(engine, MegatronEngine) and engine.optimizer is optimizer and engine.model_chunks == ["chunk"]
    assert as_engine(engine) is engine


def test_only_the_engines_know_an_engine_by_its_attributes():
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, "pretrain")):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "engines")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for number, line in enumerate(open(path), 1):
                if _ZERO3.search(line) or _SNIFF.search(line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "engine questions asked outside pretrain/engines/ (ask the Engine):\n" + "\n".join(found)
