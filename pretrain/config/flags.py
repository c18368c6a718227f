"""How a config field becomes a command-line flag, and the checks every section shares.

``flag(...)`` declares a field's flag (Megatron-LM's name where one exists, default, help, range);
choices are ``Literal`` types (``choices()`` reads them); ``pretrain/run/arguments.py`` builds the
parser from these declarations. The value parsers here turn a flag's text into its value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Callable, Literal

from pretrain.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """A ConfigError with ``message`` (which names the flag and what to do) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Flag:
    """How a config field is set from the command line."""

    name: str | None = None  # default: --field-name
    help: str = ""
    parse: Callable | None = None  # text -> value; a bad value is a usage error naming the flag
    metavar: str | None = None
    action: str | None = None  # "store_false" for a --no-... flag of a field that defaults to True
    # the command line leaves it None: resolved later (a --model preset, the --load checkpoint,
    # the tokenizer file); the field's own default applies when nothing else gives it
    resolved_later: bool = False
    expand: Callable | None = None  # value -> {field: value} for a flag that sets several fields
    # the range of a numeric flag (issue 31): every int/float flag declares one (its test walks them
    # all); ``check_ranges`` refuses a value outside it, and NaN/inf always
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def range_words(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``: the range as a message says it."""
        def text(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        low = (f"[{text(self.at_least)}" if self.at_least is not None else
               f"({text(self.above)}" if self.above is not None else None)
        high = (f"{text(self.at_most)}]" if self.at_most is not None else
                f"{text(self.below)})" if self.below is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1] if high else "a finite number"

    def in_range(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))


def flag(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **spec):
    """A config field with its command-line flag (see ``Flag``)."""
    return field(default=default, default_factory=default_factory, metadata={"flag": Flag(**spec)})


def flag_of(cls, name: str) -> str:
    """The command-line flag of field ``name`` of config class ``cls``."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["flag"]
    return spec.name or "--" + name.replace("_", "-")


def ranged(kind: type, **bounds) -> Callable[[str], int | float]:
    """The argparse ``type`` of a tool's numeric flag (the tools' own flags are not config fields):
    ``kind`` (int also in scientific notation, 4e8) within ``bounds`` (``Flag``'s ``at_least``,
    ``above``, ``at_most``, ``below``), else a usage error naming the flag and the range."""
    spec = Flag(**bounds)

    def parse(text: str) -> int | float:
        value = whole_number(text) if kind is int else _number(text)
        if not spec.in_range(value):
            raise argparse.ArgumentTypeError(f"{text}: must be {spec.range_words()}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def check_ranges(section) -> None:
    """Refuse a numeric field of ``section`` (a config dataclass) outside its flag's range
    (``Flag.at_least`` ...), naming the flag: a value the code would otherwise take silently (a
    negative minimum, a NaN epsilon) or read as "not given" (0 for an optional size)."""
    for f in dataclasses.fields(section):
        spec = f.metadata.get("flag")
        value = getattr(section, f.name)
        if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = spec.name or "--" + f.name.replace("_", "-")
        require(spec.in_range(value), f"{name} {value}: must be {spec.range_words()}")


def choices(cls, name: str) -> tuple:
    """The values a ``Literal``-typed field of ``cls`` allows (the one list of them)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is not Literal:  # Literal[...] | None
        hint = next(a for a in typing.get_args(hint) if typing.get_origin(a) is Literal)
    return typing.get_args(hint)


def require_choice(obj, name: str, flag_name: str) -> None:
    allowed = choices(type(obj), name)
    value = getattr(obj, name)
    require(value in allowed, f"{flag_name} {value!r}: use {', '.join(map(str, allowed))}")


# -- value parsers of flags whose text is not a plain int/float/str
def token_count(text: str) -> int:
    """A count written as an integer or in scientific notation (5e10)."""
    value = _number(text)
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def whole_number(text: str) -> int:
    """An integer, also in scientific notation (4e8); range checks are the config's."""
    value = _number(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(value)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def comma_list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())
