"""Convert a checkpoint between the training engines.

    python tools/convert_checkpoint.py --load ds_ckpt --save megatron_ckpt --to megatron

``--to megatron``: a ``--engine deepspeed`` checkpoint becomes a megatron-engine (resharding DCP)
checkpoint through DeepSpeed's consolidated ZeRO partitions: the weights, the fp32 master weights,
both Adam moments and the Adam step, with the same iteration, data position, LR schedule and
pruning state; the shrink tool, HF export, evaluation and ``--engine megatron`` then read it.
``--to deepspeed``: a megatron checkpoint (weights and AdamW state) is copied for a DeepSpeed
run, which reads both; the command says how to start from it. ``--to deepspeed`` of a DeepSpeed
checkpoint re-partitions it for any layout (a run on another DP/TP size than the one that saved it).
Runs in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._single_process import quiet_start, run_reporting_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (or its parent with latest_...)")
    p.add_argument("--save", required=True, help="where to write the converted checkpoint (a new folder)")
    p.add_argument("--to", required=True, choices=["megatron", "deepspeed"], help="the engine to convert for")
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.checkpoint import CheckpointError  # lazy: torch after quiet_start()
    from pretrain.engines.convert import (  # lazy: likewise
        EngineConversionError, deepspeed_to_megatron, megatron_to_deepspeed)

    convert = deepspeed_to_megatron if args.to == "megatron" else megatron_to_deepspeed
    r, status = run_reporting_errors(lambda: convert(args.load, args.save),
                                     (EngineConversionError, CheckpointError))
    if status:
        return status
    print(f"wrote {r['folder']} (iteration {r['iteration']}, {r['parameters'] / 1e6:.3f} M parameters, "
          f"for --engine {args.to}); {r['note']}; {r['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
