"""Step time of the masked model with saliency on vs the same model built from megatron-core's
plain local spec, interleaved in one process (blocks of steps alternate, medians compared), as wall
time and as this process's CPU time (the fairer number on a shared, loaded machine).

    python bench/pruning_overhead.py [--saliency taylor] [--rounds 3] [--iters 8]

The pruning side scores every step (the most expensive setting), applies gradient masks, and has
masks set (one pruning event early), so every per-step cost of pruning is in the measurement.

It also reports the extra memory of scoring, from one more short pruned run (not timed): the peak
bytes that ``SaliencyEstimator.partial_table`` allocates on top of what exists before it
(``torch.cuda.max_memory_allocated`` on a GPU, ``tests/pretrain/pruning/allocations.py``'s counter
on CPU), the steps after the first (which allocates Fisher's running g^2), against one fp32 copy of
the largest parameter (the budget, issue 15); and Fisher's running g^2 (persistent state, apart).
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
    from pretrain.run.segments import run

    def cfg(prune: bool):
        c = PretrainConfig(
            model=ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=seq)),
            parallel=ParallelConfig(), data=DataConfig(mock_data=True, split="100,0,0"),
            optim=OptimConfig(lr=1e-4, min_lr=1e-5),
            train=TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=iters, log_interval=iters))
        if prune:
            # pruning events every 2 steps from step 2 on (masks set: the masked norms, the gradient
            # masks and the pruning state all work in the timed steps; events run after a step,
            # outside its time), scoring on every step, the schedule's end well past the run
            tokens_per_step = c.train.global_batch_size * c.model.seq_length
            c.prune = dataclasses.replace(c.prune, target_ratio=0.5, saliency=saliency, interval=2,
                                          start_tokens=0, end_tokens=4 * iters * tokens_per_step)
        return c

    # CPU time of each step as well as wall time: on a shared, loaded machine the wall time also
    # counts the time other processes had the cores; the CPU time of this (single-threaded) process
    # counts only its own work
    import time

    from pretrain.trainer import Trainer

    original_step, cpu_seconds = Trainer.train_step, []

    def timed_step(self):
        start = time.thread_time()
        metrics = original_step(self)
        cpu_seconds.append(time.thread_time() - start)
        return metrics

    Trainer.train_step = timed_step
    plain, pruned, plain_cpu, pruned_cpu = [], [], [], []
    try:
        for _ in range(rounds):
            cpu_seconds.clear()
            h = run(cfg(False), plain_megatron_spec=True)["history"][2:]
            plain += [r["step_seconds"] for r in h]
            plain_cpu += cpu_seconds[2:]
            cpu_seconds.clear()
            summary = run(cfg(True))
            pruner = next(cb for cb in summary["trainer"].callbacks if cb.name == "pruning")
            kept = pruner.current_params() / pruner.initial_params
            h = summary["history"][2:]
            pruned += [r["step_seconds"] for r in h]
            pruned_cpu += cpu_seconds[2:]
    finally:
        Trainer.train_step = original_step
    return {"plain": statistics.median(plain), "pruned": statistics.median(pruned),
            "kept": kept, "plain_cpu": statistics.median(plain_cpu), "pruned_cpu": statistics.median(pruned_cpu),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **_scoring_memory(run, cfg(True))}


def _scoring_memory(run, cfg) -> dict:
    """Peak extra bytes of a scoring call (over the calls after the first), the largest parameter
    (fp32 bytes) and Fisher's running g^2 (bytes), from one short run with a measuring wrapper."""
    import torch

    from pretrain.pruning.saliency import SaliencyEstimator
    from tests.pretrain.pruning.allocations import AllocationCounter

    original = SaliencyEstimator.partial_table
    seen = {"calls": 0, "peak": 0, "largest_param": 0, "fisher": 0}

    def measured(self):
        device = next((e.param.device for e in self.entries if e.param is not None), torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            table = original(self)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with AllocationCounter() as counter:
                table = original(self)
            peak = counter.peak_bytes
        seen["calls"] += 1
        if seen["calls"] > 1:  # the first call allocates Fisher's running g^2
            seen["peak"] = max(seen["peak"], peak)
        seen["largest_param"] = max(e.param.numel() * 4 for e in self.entries if e.param is not None)
        seen["fisher"] = sum(v.numel() * v.element_size() for v in self.fisher.values())
        return table

    SaliencyEstimator.partial_table = measured
    try:
        run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, train_iters=4)))
    finally:
        SaliencyEstimator.partial_table = original
    return {"scoring_peak_bytes": seen["peak"], "largest_param_bytes": seen["largest_param"],
            "fisher_bytes": seen["fisher"]}


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
              f"(peak RSS {r['max_rss_mb']:.0f} MB; {r['kept']:.1%} of the parameters kept at the end)")
        print(f"  CPU time: plain {r['plain_cpu'] * 1000:.1f} ms/step, masked + saliency "
              f"{r['pruned_cpu'] * 1000:.1f} ms/step, ratio {r['pruned_cpu'] / r['plain_cpu']:.3f}")
        print(f"  scoring extra memory: peak {r['scoring_peak_bytes'] / 2**20:.2f} MiB = "
              f"{r['scoring_peak_bytes'] / r['largest_param_bytes']:.3f} x the largest parameter in fp32 "
              f"({r['largest_param_bytes'] / 2**20:.2f} MiB, budget 1.0 x); Fisher's running g^2 "
              f"{r['fisher_bytes'] / 2**20:.2f} MiB (persistent, apart)")


if __name__ == "__main__":
    main()
