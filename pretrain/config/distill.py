"""The distillation section (``--kd-*``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

from pretrain.config.flags import flag, require, whole_number


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher checkpoint (pretrain/distill.py).

    loss = (1 - α)·CE + α·T²·KL(teacher_T ‖ student_T), both softmaxes at temperature T; the T²
    keeps the KL's gradient on the scale of the CE's whatever T is (Hinton et al.)."""

    cli_group: ClassVar[str] = "distillation"

    # absolute: the path is recorded in the student's checkpoints and read again on resume
    teacher: str | None = flag(None, name="--kd-teacher", metavar="CKPT", parse=os.path.abspath,
                               help="a checkpoint (ours, or tools/convert_from_hf.py's) to distil from: frozen, "
                                    "same vocabulary and tokenizer; its own shape")
    weight: float = flag(1.0, name="--kd-weight", help="α: the KL's share of the loss, in [0, 1] "
                                                        "(1: distillation only, Minitron's recipe)",
                   at_least=0, at_most=1)
    temperature: float = flag(1.0, name="--kd-temperature", help="T of both softmaxes", above=0)
    until_tokens: int | None = flag(None, name="--kd-until-tokens", parse=whole_number,
                                    help="distil until this many training tokens, then train on CE alone", at_least=1)

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    def validate(self) -> None:
        require(0.0 <= self.weight <= 1.0, f"--kd-weight {self.weight}: must be in [0, 1] "
                 "(the KL's share of the loss; the CE gets 1 - it)")
        require(self.temperature > 0 and math.isfinite(self.temperature),
                 f"--kd-temperature {self.temperature}: must be a positive number")
        require(self.until_tokens is None or self.until_tokens > 0,
                 f"--kd-until-tokens {self.until_tokens}: must be positive")
        if not self.enabled:
            unused = [name for name, value, default in (("--kd-weight", self.weight, 1.0),
                                                        ("--kd-temperature", self.temperature, 1.0),
                                                        ("--kd-until-tokens", self.until_tokens, None))
                      if value != default]
            require(not unused, f"{', '.join(unused)} given without --kd-teacher: name the teacher checkpoint")
