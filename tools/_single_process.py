"""What the one-process tools (reshard, HF conversion) share: a quiet start, and errors that the
user can act on printed as one line (exit 1) instead of a traceback."""

from __future__ import annotations

import os
import sys
import warnings

from pretrain.errors import UserError


def quiet_start() -> None:
    """No torch.compile warm-ups (megatron's jit fusions) and no library warnings in the output."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    warnings.filterwarnings("ignore")


def run_reporting_errors(fn, errors: tuple):
    """``(fn(), 0)``, or ``(None, 1)`` after printing an error of the given types or a
    ``UserError`` (an output that cannot be written, a model too big for memory, ...); the
    process group the tool opened is torn down either way."""
    from pretrain.distributed import destroy_distributed  # lazy: torch loads after quiet_start()

    try:
        return fn(), 0
    except (*errors, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1
    finally:
        destroy_distributed()
