"""Shrink a pruned checkpoint into the smaller architecture and/or change its TP/PP layout.

    python tools/reshard_checkpoint.py --load ckpt --save ckpt_small --shrink \\
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 1] [--overwrite]

Weights, fp32 master weights and Adam moments are sliced to the kept groups; iteration, consumed
samples, LR schedule and pruning history are carried over, so ``python -m pretrain --load
ckpt_small`` continues the run on the small model. Runs in one process.
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
    p.add_argument("--save", required=True, help="where to write the new checkpoint")
    p.add_argument("--shrink", action="store_true", help="remove masked groups (pruning runs)")
    p.add_argument("--target-tensor-parallel-size", type=int, help="TP size to run on (default: unchanged)")
    p.add_argument("--target-pipeline-parallel-size", type=int, help="PP size to run on (default: unchanged)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --save to be an existing non-empty folder: its checkpoint of the same iteration is "
                        "replaced (atomically) and its latest file points at the new one")
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.checkpoint import CheckpointError  # lazy: torch after quiet_start()
    from pretrain.shrink import ShrinkError, reshard_checkpoint  # lazy: likewise

    r, status = run_reporting_errors(lambda: reshard_checkpoint(
        args.load, args.save, args.shrink, args.target_tensor_parallel_size,
        args.target_pipeline_parallel_size, overwrite=args.overwrite), (ShrinkError, CheckpointError))
    if status:
        return status
    m = r["config"].model
    print(f"wrote {r['folder']} (iteration {r['iteration']}): {r['params_before'] / 1e6:.3f} M -> "
          f"{r['params_after'] / 1e6:.3f} M parameters; hidden {m.hidden_size}, heads "
          f"{m.num_attention_heads} (groups {m.query_groups}), FFN {m.ffn_hidden_size}; "
          f"TP {r['config'].parallel.tensor_model_parallel_size} x PP "
          f"{r['config'].parallel.pipeline_model_parallel_size}; {r['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
