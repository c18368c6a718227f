"""Entry point: ``torchrun --nproc-per-node N -m pretrain [flags]`` (or ``python -m pretrain``):
the flags, the run, and one line instead of a traceback for every error a user can act on."""

from __future__ import annotations

import os
import sys

import torch

from data_prep.tokenizers import TokenizerError
from pretrain.distributed import destroy_distributed
from pretrain.errors import UserError
from pretrain.run.arguments import build_parser, config_and_checkpoint_from_args
from pretrain.run.segments import run


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    args = build_parser().parse_args(argv)
    os.environ["PRETRAIN_LAUNCHER"] = args.launcher  # read by launch_environment
    try:
        cfg, checkpoint = config_and_checkpoint_from_args(args)
        run(cfg, checkpoint=checkpoint)
    except (UserError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C, or one outside training): nothing saved since the last "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, MemoryError) as err:
        if not _is_out_of_memory(err):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: out of memory ({first_line}). Lower --micro-batch-size or --seq-length, or spread "
              "the model over more ranks (--tensor/pipeline-model-parallel-size)", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
