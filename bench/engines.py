"""Peak memory per rank and step time: the megatron engine (distributed optimizer) vs DeepSpeed
ZeRO-1, 2, 3 and ZeRO-3 with the optimizer offloaded to host memory, for one model and layout.

    python bench/engines.py [--model debug] [--world 4] [--tp 2] [--iters 8] [--seq-length 128]

Each engine trains the same run (mock data, same seed) in a launch of its own of ``--world``
ranks (gloo on CPU, NCCL on GPUs). Peak memory is each rank's peak allocated device memory on a
GPU (``torch.cuda.max_memory_allocated``), or its peak resident set on CPU (the whole process,
Python and libraries included, so differences between engines are what counts): once over the
training steps alone, once including building the model (every engine builds it at full size
before DeepSpeed partitions it; ``deepspeed.zero.Init`` is not used). Step time is the median over
the steps after the first two. Prints one markdown table (the README's).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.trainer import Callback  # noqa: E402

ENGINES = {
    "megatron": ("megatron", None, None),
    "zero1": ("deepspeed", 1, None),
    "zero2": ("deepspeed", 2, None),
    "zero3": ("deepspeed", 3, None),
    "zero3-offload": ("deepspeed", 3, "cpu"),
}


def _config(model: str, tp: int, iters: int, seq: int, mbs: int, gbs: int, engine: tuple):
    from pretrain.config import (DataConfig, ModelConfig, MODEL_PRESETS, OptimConfig, ParallelConfig,
                                 PretrainConfig, TrainConfig)

    import torch

    name, stage, offload = engine
    return PretrainConfig(
        model=ModelConfig(**dict(MODEL_PRESETS[model], seq_length=seq)),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, engine=name, zero_stage=stage, offload_optimizer=offload),
        data=DataConfig(mock_data=True),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=1),
        train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters, seed=1,
                          log_interval=iters, bf16=torch.cuda.is_available()),
    )


class _TrainingMemory(Callback):
    """A callback: the peak memory of the training steps alone (not of building the model, which
    every engine does at full size before DeepSpeed partitions it). GPU: peak allocated since
    training began; CPU: the resident-set high-water mark, reset when training begins
    (``/proc/self/clear_refs``)."""

    name = "training_memory"

    def __init__(self):
        self.peak_bytes = 0

    def on_train_begin(self, trainer) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one

    def on_train_end(self, trainer) -> None:
        import torch

        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            self.peak_bytes = int(hwm.split()[1]) * 1024


def _worker(args: dict, names: list) -> dict:
    import resource

    import torch

    from pretrain.run.segments import run

    out = {}
    for name in names:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        memory = _TrainingMemory()
        summary = run(_config(args["model"], args["tp"], args["iters"], args["seq_length"], args["mbs"],
                              args["gbs"], ENGINES[name]), extra_callbacks=[memory])
        seconds = [h["step_seconds"] for h in summary["history"]][2:] or [float("nan")]
        peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        out[name] = {"peak_bytes": peak, "training_peak_bytes": memory.peak_bytes, "gpu": torch.cuda.is_available(),
                     "step_seconds": statistics.median(seconds), "params": summary["params"],
                     "layout": summary["layout"]}
        del summary
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    args = p.parse_args(argv)
    names = [n for n in args.engines.split(",") if n]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown {unknown}; use {', '.join(ENGINES)}")
    from tests.dist_helper import run_distributed

    results = [{} for _ in range(args.world)]
    for name in names:  # a fresh launch per engine: a process's peak memory is a high-water mark
        for rank, got in enumerate(run_distributed(_worker, args.world, dataclasses.asdict(_Args(**vars(args))),
                                                   [name])):
            results[rank].update(got)
    layout = results[0][names[0]]["layout"]
    print(f"model {args.model}, {results[0][names[0]]['params'] / 1e6:.2f} M parameters, world {args.world} = "
          f"TP {layout['tp_size']} x DP {layout['dp_size']}, seq {args.seq_length}, global batch {args.gbs}")
    where = "GPU allocated" if results[0][names[0]].get("gpu") else "resident set (CPU)"
    print("| engine | peak while training, per rank | peak incl. building the model | step time |")
    print("|---|---|---|---|")
    for name in names:
        training = max(r[name]["training_peak_bytes"] for r in results) / 2**20
        peak = max(r[name]["peak_bytes"] for r in results) / 2**20
        step = max(r[name]["step_seconds"] for r in results)
        print(f"| {name} | {training:,.0f} MiB | {peak:,.0f} MiB | {step * 1000:,.0f} ms |")
    print(f"memory: {where}, the maximum over ranks; step time: the slowest rank's median")
    return 0


@dataclasses.dataclass
class _Args:
    model: str
    world: int
    tp: int
    iters: int
    seq_length: int
    mbs: int
    gbs: int
    engines: str


if __name__ == "__main__":
    sys.exit(main())
