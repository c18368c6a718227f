"""One base for every error the user can act on (issue 30): each class is a ``UserError``, keeps
the builtin base it had (``except ValueError`` / ``except RuntimeError`` callers still catch it),
and is still importable from the module that raises it; the one-process tools report any of them
as one line."""

import importlib

import pytest

from pretrain import errors

# class -> (its old home, the builtin base it had before the one base)
OLD_HOMES = {
    "ConfigError": ("pretrain.config", ValueError),
    "OutputError": ("pretrain.outputs", ValueError),
    "InsufficientMemory": ("pretrain.model.memory", ValueError),
    "MaskInvariantError": ("pretrain.model.invariants", ValueError),
    "BenchmarkError": ("pretrain.benchmarks", ValueError),
    "ConversionError": ("pretrain.interop.hf", ValueError),
    "ShrinkError": ("pretrain.shrink", ValueError),
    "DCPFormatError": ("pretrain.checkpoint.stream", ValueError),
    "CheckpointError": ("pretrain.checkpoint", RuntimeError),
    "EngineConversionError": ("pretrain.engines.convert", RuntimeError),
    "NonFiniteError": ("pretrain.trainer", RuntimeError),
    "FolderInUseError": ("pretrain.run.run_lock", RuntimeError),
}


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_every_error_has_the_one_base_and_its_old_home(name):
    home, builtin = OLD_HOMES[name]
    cls = getattr(errors, name)
    assert issubclass(cls, errors.UserError) and issubclass(cls, builtin)
    assert getattr(importlib.import_module(home), name) is cls


def test_no_error_class_is_defined_outside_errors():
    """A new error class of the project goes in pretrain/errors.py, under UserError."""
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined == set(OLD_HOMES) | {"UserError"}


def test_the_tools_report_any_user_error_as_one_line(capsys):
    from tools._single_process import run_reporting_errors

    def fails():
        raise errors.ShrinkError("--target-tensor-parallel-size 3: does not divide 4 query groups")

    assert run_reporting_errors(fails, ()) == (None, 1)
    assert capsys.readouterr().err == "error: --target-tensor-parallel-size 3: does not divide 4 query groups\n"
