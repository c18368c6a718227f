"""Step time of the masked model with saliency on vs the same model built from megatron-core's
plain local spec, interleaved in one process (blocks of steps alternate, medians compared).

    python bench/pruning_overhead.py [--saliency taylor] [--rounds 3] [--iters 8]

The pruning side scores every step (the most expensive setting), applies gradient masks, and has
masks set (one pruning event early), so every per-step cost of pruning is in the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(saliency: str, rounds: int, iters: int, seq: int):
    from pretrain.config import (DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 PretrainConfig, TrainConfig, MODEL_PRESETS)
    from pretrain.train import run

    def cfg(prune: bool):
        c = PretrainConfig(
            model=ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=seq)),
            parallel=ParallelConfig(), data=DataConfig(mock_data=True, split="100,0,0"),
            optim=OptimConfig(lr=1e-4, min_lr=1e-5),
            train=TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=iters, log_interval=iters))
        if prune:
            # one event at step 2 (masks set), then scoring on every step with no further events
            c.prune = dataclasses.replace(c.prune, target_ratio=0.9, saliency=saliency, interval=2,
                                          start_tokens=0, end_tokens=10**12)
        return c

    plain, pruned = [], []
    for _ in range(rounds):
        h = run(cfg(False), plain_megatron_spec=True)["history"][2:]
        plain += [r["step_seconds"] for r in h]
        h = run(cfg(True))["history"][2:]
        pruned += [r["step_seconds"] for r in h]
    return {"plain": statistics.median(plain), "pruned": statistics.median(pruned),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--saliency", default="taylor")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.dist_helper import run_distributed

    for saliency in args.saliency.split(","):
        r = run_distributed(_worker, 1, saliency, args.rounds, args.iters, args.seq_length)[0]
        print(f"saliency={saliency}: plain megatron-core spec {r['plain'] * 1000:.1f} ms/step, "
              f"masked + saliency {r['pruned'] * 1000:.1f} ms/step, ratio {r['pruned'] / r['plain']:.3f} "
              f"(peak RSS {r['max_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
