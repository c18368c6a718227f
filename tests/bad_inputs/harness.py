"""A corpus of bad inputs, each with the message a user must get (issue 12, DESIGN invariant 9).

A case builds its bad input under a fresh folder and returns the command a user would type.
The walker (``test_bad_inputs.py``) runs every case as a subprocess, from the repository root,
and fails on: exit code 0, any Python traceback in the output, a missing expected message, or
anything left under a final output name (``leftovers``: paths relative to the case's folder
that must not exist afterwards).

Cases live in ``cases_<area>.py`` modules, each exporting ``CASES: list[BadInput]``. Keep each
case cheap: it should fail in seconds, before any training step where possible.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclasses.dataclass(frozen=True)
class Fixtures:
    """Valid inputs a case may start from (made once per test session)."""

    dataset: str  # a Megatron indexed dataset prefix (vocabulary 1000)
    tokenizer: str  # the sentencepiece model that made it
    corpus: str  # the JSONL it came from
    checkpoint: str  # a small pruned checkpoint (`--model debug`-like shape, TP=1)


@dataclasses.dataclass(frozen=True)
class BadInput:
    name: str
    # build(case_dir, fixtures) -> argv; the command runs with cwd = repository root.
    build: Callable[[Path, Fixtures], list[str]]
    message: str  # a regular expression the combined stdout+stderr must contain
    leftovers: tuple[str, ...] = ()  # paths (relative to case_dir) that must not exist after
    timeout: float = 120.0


def python(*args: str) -> list[str]:
    return [PYTHON, *args]


def tool(name: str, *args: str) -> list[str]:
    return [PYTHON, str(ROOT / "tools" / name), *args]
