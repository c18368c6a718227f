"""Step time of the masked model with saliency on vs the same model built from megatron-core's
plain local spec, interleaved in one process (blocks of steps alternate, medians compared), as wall
time and as this process's CPU time (the fairer number on a shared, loaded machine).

    python bench/pruning_overhead.py [--saliency taylor,fisher,obs,activation] [--rounds 5] [--iters 8]
        [--kernels] [--json FILE]

Each round runs the plain model and the masked one (their order alternating); a round's ratio is
the ratio of its two median step times; the figure is the median of the rounds' ratios, with
their spread (min-max).

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
import json
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

    # the pruning code's own CPU time inside each step (the callback's step hooks and the layer-input
    # captures; not the mask-aware norms inside the forward): far less noisy than the difference of
    # two step times on a loaded machine
    from pretrain.pruning.callback import PruningCallback
    from pretrain.pruning.saliency import SaliencyEstimator

    in_pruning = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                in_pruning[0] += time.thread_time() - start
        return wrapper

    originals = {(PruningCallback, name): getattr(PruningCallback, name)
                 for name in ("on_step_begin", "on_before_optimizer_step")}
    originals[(SaliencyEstimator, "_make_hook")] = SaliencyEstimator._make_hook
    for (cls, name), fn in originals.items():
        if name == "_make_hook":
            setattr(cls, name, lambda self, module, fn=fn: timed(fn(self, module)))
        else:
            setattr(cls, name, timed(fn))
    pruning_seconds = []

    def timed_step(self):
        start, before = time.thread_time(), in_pruning[0]
        metrics = original_step(self)
        cpu_seconds.append(time.thread_time() - start)
        pruning_seconds.append(in_pruning[0] - before)
        return metrics

    Trainer.train_step = timed_step
    rounds_out, kept, in_pruning_code = [], None, []
    try:
        for i in range(rounds):
            # the order alternates, so a drift in the machine's load (another job starting) weighs
            # on both sides alike
            sides = {}
            for side in (("plain", "masked") if i % 2 == 0 else ("masked", "plain")):
                cpu_seconds.clear()
                pruning_seconds.clear()
                if side == "plain":
                    summary = run(cfg(False), plain_megatron_spec=True)
                else:
                    summary = run(cfg(True))
                    pruner = next(cb for cb in summary["trainer"].callbacks if cb.name == "pruning")
                    kept = pruner.current_params() / pruner.initial_params
                    in_pruning_code += pruning_seconds[2:]
                sides[side] = ([r["step_seconds"] for r in summary["history"][2:]], list(cpu_seconds[2:]))
            rounds_out.append(sides)
    finally:
        Trainer.train_step = original_step
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)
    return {"rounds": rounds_out, "kept": kept, "in_pruning_code": statistics.median(in_pruning_code),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **_scoring_memory(run, cfg(True))}


def summarise(rounds: list) -> dict:
    """Per clock (wall, cpu): the median step time of each side over all rounds, and the ratio
    masked/plain of each round's medians: their median and spread (min, max)."""
    out = {}
    for clock, k in (("wall", 0), ("cpu", 1)):
        plain = [t for r in rounds for t in r["plain"][k]]
        masked = [t for r in rounds for t in r["masked"][k]]
        ratios = [statistics.median(r["masked"][k]) / statistics.median(r["plain"][k]) for r in rounds]
        out[clock] = {"plain_ms": 1000 * statistics.median(plain), "masked_ms": 1000 * statistics.median(masked),
                      "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


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
    p.add_argument("--kernels", action="store_true", help="also time the ways of zeroing dropped elements")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.dist_helper import run_distributed

    if args.kernels:
        print_kernels()
    results = {}
    for saliency in args.saliency.split(","):
        r = run_distributed(_worker, 1, saliency, args.rounds, args.iters, args.seq_length)[0]
        s = summarise(r["rounds"])
        results[saliency] = {**s, "kept": r["kept"], "in_pruning_code_ms": 1000 * r["in_pruning_code"], "scoring_peak_bytes": r["scoring_peak_bytes"],
                             "largest_param_bytes": r["largest_param_bytes"], "rounds": len(r["rounds"])}
        for clock, name in (("wall", "wall"), ("cpu", "CPU time")):
            c = s[clock]
            print(f"saliency={saliency} {name}: plain megatron-core spec {c['plain_ms']:.1f} ms/step, masked + "
                  f"saliency {c['masked_ms']:.1f} ms/step, ratio {c['ratio']:.3f} (median of {len(r['rounds'])} "
                  f"rounds; spread {c['ratio_min']:.3f}-{c['ratio_max']:.3f})")
        print(f"  of the masked step's CPU time, {r['in_pruning_code'] * 1000:.1f} ms/step in the pruning callback's "
              f"step hooks and the layer-input captures (median; the mask-aware norms not included)")
        print(f"  {r['kept']:.1%} of the parameters kept at the end; peak RSS {r['max_rss_mb']:.0f} MB")
        print(f"  scoring extra memory: peak {r['scoring_peak_bytes'] / 2**20:.2f} MiB = "
              f"{r['scoring_peak_bytes'] / r['largest_param_bytes']:.3f} x the largest parameter in fp32 "
              f"({r['largest_param_bytes'] / 2**20:.2f} MiB, budget 1.0 x); Fisher's running g^2 "
              f"{r['fisher_bytes'] / 2**20:.2f} MiB (persistent, apart)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_kernels() -> None:
    """How fast each way of zeroing the dropped elements of a gradient is on this machine, at the
    debug model's shapes (an FFN's fc1 rows, fc2 columns, a quarter dropped) and for the whole flat
    grad buffer at once: why ``LocalModelMasks`` fills rows and columns by index."""
    import time

    import torch

    from pretrain.pruning.masks import DroppedElements

    def per_call(f, n=200):
        f()
        start = time.thread_time()
        for _ in range(n):
            f()
        return (time.thread_time() - start) / n * 1e6

    shapes = {"fc1 [768, 128], rows": (768, 128, 0), "fc2 [128, 384], columns": (128, 384, 1),
              "embedding [8192, 128], columns": (8192, 128, 1)}
    print("zeroing a quarter of a tensor's elements, us per call (thread CPU time):")
    for name, (rows, cols, dim) in shapes.items():
        g = torch.randn(rows, cols)
        kept_axis = torch.arange((rows, cols)[dim]) % 4 != 0
        keep = (kept_axis[:, None] if dim == 0 else kept_axis[None, :]).expand(rows, cols).contiguous()
        drop, dropped = ~keep, DroppedElements(keep)
        print(f"  {name}: mul_(bool mask) {per_call(lambda: g.mul_(keep)):.0f}, masked_fill_(dropped) "
              f"{per_call(lambda: g.masked_fill_(drop, 0)):.0f}, index_fill_ by row/column "
              f"{per_call(lambda: dropped.zero(g)):.0f}")
    flat = torch.randn(1_835_008)  # the debug model's flat grad buffer
    keep = torch.arange(flat.numel()) // 128 % 8 != 0  # an eighth dropped, in whole rows of 128
    drop = ~keep
    print(f"  the whole flat buffer ({flat.numel():,} elements) in one call: mul_(bool mask) "
          f"{per_call(lambda: flat.mul_(keep), 50):.0f}, masked_fill_(dropped) "
          f"{per_call(lambda: flat.masked_fill_(drop, 0), 50):.0f}")

if __name__ == "__main__":
    main()
