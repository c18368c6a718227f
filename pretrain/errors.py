"""Every error the user can act on, under one base: an entry point reports any ``UserError`` as one
line (the message names the flag or file and what to do) instead of a traceback.

``UserError`` is a ``ValueError`` because most of these always were (``except ValueError`` callers
keep working); the ones that were ``RuntimeError``\\ s stay that too. The modules that raise them
re-export them under their old names.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a state the user must resolve; the message says what and what to do."""


class ConfigError(UserError):
    """A bad setting; the message names the flag and what to do."""


class OutputError(ConfigError):
    """An output that cannot be written; the message names the flag, the path and what to do (a
    ConfigError: every entry point already reports those as one line)."""


class InsufficientMemory(ConfigError):
    """A described model cannot fit; the message names the size and what to do."""


class MaskInvariantError(ConfigError):
    """The model cannot be masked correctly for hidden pruning."""


class BenchmarkError(ConfigError):
    """Bad benchmark input: the message names the flag or file and what to do."""


class ConversionError(UserError):
    """The conversion cannot be done as asked; the message says why and what to do."""


class ShrinkError(UserError):
    """The checkpoint cannot be shrunk/resharded as asked; the message says why and what to do."""


class DCPFormatError(UserError):
    """A DCP folder is corrupt or holds a pickle that would run code; the message names the file."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message says which file and what to do."""


class EngineConversionError(UserError, RuntimeError):
    """A checkpoint that cannot be converted as asked; the message says why."""


class NonFiniteError(UserError, RuntimeError):
    """Too many steps with a NaN/inf loss or gradient: training stopped (nothing saved after)."""


class FolderInUseError(UserError, RuntimeError):
    """Another live run holds the folder (its host and pid are in the message)."""

    owner: str = ""  # the holder's host, pid, start and command, as the message names it
    orphaned: bool = False  # the holder has exited; processes it started hold the lock still
    hint: str = ""  # what to do beyond waiting (e.g. delete a lock a crashed host left without flock)
