"""Target parameter count as a function of tokens seen (the paper: linear in tokens)."""

from __future__ import annotations

RAMPS = ("linear", "cubic")


def ramp_fraction(tokens: int, start: int, end: int, ramp: str = "linear") -> float:
    """How far along the pruning ramp we are: 0 before ``start``, 1 from ``end`` on."""
    if ramp not in RAMPS:
        raise ValueError(f"--prune-ramp {ramp!r}: choose linear or cubic")
    if tokens <= start:
        return 0.0
    if tokens >= end:
        return 1.0
    x = (tokens - start) / (end - start)
    # cubic: fast first, slow at the end (Zhu & Gupta's gradual pruning schedule)
    return x if ramp == "linear" else 1.0 - (1.0 - x) ** 3


def target_params(tokens: int, initial: int, final: int, start: int, end: int, ramp: str = "linear") -> int:
    return int(round(initial - (initial - final) * ramp_fraction(tokens, start, end, ramp)))
