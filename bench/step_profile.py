"""Where a training step's time goes on CPU, for a comparison recipe's parent model (megatron-core
on gloo, one process), and the tokens/s of each micro-batch size (the cheap knob).

    python bench/step_profile.py [--recipe cpu-small] [--iters 20] [--threads 2]

Prints tokens/s per micro-batch size, then torch.profiler's top operators by self CPU time for the
recipe's own micro-batch size. Mock data: the tokenizer and the corpus do not matter here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(model: dict, gbs: int, mbs: int, iters: int, profile: bool) -> dict:
    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 PretrainConfig, TrainConfig)
    from pretrain.run.segments import run

    cfg = PretrainConfig(model=ModelConfig(**{**model, "vocab_size": model.get("vocab_size") or 4032}),
                         parallel=ParallelConfig(), data=DataConfig(mock_data=True, split="100,0,0"),
                         optim=OptimConfig(lr=1e-3, min_lr=1e-4),
                         train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters,
                                           log_interval=10**6),
                         checkpoint=CheckpointConfig())
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            summary = run(cfg)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    else:
        summary = run(cfg)
    steps = summary["history"][3:]  # after warm-up
    seconds = sum(h["step_seconds"] for h in steps) / len(steps)
    return {"step_seconds": seconds, "tokens_per_second": gbs * model["seq_length"] / seconds, "table": table}


def main() -> None:
    from pretrain.compare.recipes import get_recipe
    from tests.dist_helper import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="cpu-small")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    recipe = get_recipe(args.recipe)
    gbs = recipe.global_batch_size
    sizes = sorted({m for m in (1, 2, 4, 8, 16, 32) if gbs % m == 0 and m <= gbs} | {recipe.micro_batch_size})
    for mbs in sizes:
        r = run_distributed(_worker, 1, recipe.model, gbs, mbs, args.iters, False)[0]
        print(f"micro-batch {mbs:>3}: {r['tokens_per_second']:8,.0f} tokens/s ({r['step_seconds'] * 1000:.0f} ms/step)"
              + ("  <- the recipe's" if mbs == recipe.micro_batch_size else ""), flush=True)
    r = run_distributed(_worker, 1, recipe.model, gbs, recipe.micro_batch_size, args.iters, True)[0]
    print(r["table"])


if __name__ == "__main__":
    main()
