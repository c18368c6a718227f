"""Training throughput (tokens/s) and model FLOPs utilisation on this CPU, and ``--gpu``: a 1B-class
model for a few steps on one GPU with MFU.

    python bench/train_throughput.py [--peak FILE]   # CPU, gloo, 1-2 processes, ~4 min
    python bench/train_throughput.py --gpu           # one GPU (bf16)

On CPU: the debug model with megatron-core's plain local spec and with ours (masked spec, no
pruning), at TP=1, TP=2 and PP=2; a SmolLM2-135M-shaped model with the plain spec, with ours masked
to half its parameters (the forward still computes at full size) and shrunk (a smaller Llama shape
of about half the parameters). "MFU on this CPU" = training FLOPs per token of the shape in memory
(``pretrain/model/flops.py``: 6 N plus attention) x tokens/s, over the fp32 GEMM peak that
``bench/cpu_peak.py`` measures with one thread (training runs one thread per process), times the
processes. ``--peak FILE`` reads that peak from ``cpu_peak.py --json``; otherwise it is measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(layout, iters, mock_seq, model, bf16, mbs, gbs, plain=False, prune=False, overrides=None):
    import dataclasses

    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig,
                                 ParallelConfig, PretrainConfig, TrainConfig, MODEL_PRESETS)
    from pretrain.model.flops import training_flops_per_token
    from pretrain.run.segments import run

    tp, pp = layout
    m = dict(MODEL_PRESETS[model], seq_length=mock_seq, **(overrides or {}))
    cfg = PretrainConfig(
        model=ModelConfig(**m),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(mock_data=True, split="100,0,0"),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5),
        train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters,
                          log_interval=max(1, iters), bf16=bf16),
        checkpoint=CheckpointConfig(),
    )
    if prune:  # one event after the first step removes half the parameters; then masked steps only
        cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.5, saliency="taylor", interval=1, start_tokens=0,
                                        end_tokens=gbs * mock_seq, max_step_fraction=0.5)
    import time

    from pretrain.trainer import Trainer

    # this process's CPU time per step too: on a shared machine the wall time also counts the time
    # other jobs held the cores
    original_step, cpu_seconds = Trainer.train_step, []

    def timed_step(self):
        start = time.thread_time()
        metrics = original_step(self)
        cpu_seconds.append(time.thread_time() - start)
        return metrics

    Trainer.train_step = timed_step
    try:
        s = run(cfg, plain_megatron_spec=plain)
    finally:
        Trainer.train_step = original_step
    steps = s["history"][2:]  # skip warm-up steps (and the pruning event)
    seconds = sum(h["step_seconds"] for h in steps)
    cpu = sum(cpu_seconds[2:])
    tokens = len(steps) * gbs * mock_seq
    model_cfg = s["trainer"].config.model
    vocab = model_cfg.padded_vocab_size(cfg.model.vocab_size or 8192, tp)
    kept = None
    if prune:
        pruner = next(cb for cb in s["trainer"].callbacks if cb.name == "pruning")
        kept = pruner.current_params() / pruner.initial_params
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(steps), "kept": kept,
            "tokens_per_cpu_s": tokens / cpu, "step_cpu_s": cpu / len(steps),
            "params": model_cfg.num_parameters(vocab)["total"],
            "flops_per_token": training_flops_per_token(model_cfg, vocab)}


# (label, model, layout, processes, micro-batch, global batch, sequence, iterations, plain spec, pruned,
# shape overrides): the rows of the CPU table
CPU_ROWS = [
    ("debug, megatron-core plain spec", "debug", (1, 1), 1, 2, 8, 128, 12, True, False, None),
    ("debug, ours (masked spec)", "debug", (1, 1), 1, 2, 8, 128, 12, False, False, None),
    ("debug, ours, TP=2", "debug", (2, 1), 2, 2, 8, 128, 12, False, False, None),
    ("debug, ours, PP=2", "debug", (1, 2), 2, 2, 8, 128, 12, False, False, None),
    ("135M, megatron-core plain spec", "smollm-135m", (1, 1), 1, 1, 1, 256, 5, True, False, None),
    ("135M, ours masked to 50%", "smollm-135m", (1, 1), 1, 1, 1, 256, 5, False, True, None),
    # about half of SmolLM2-135M as a plain Llama shape: 6 heads in 2 groups, FFN 512
    ("135M shrunk (6 heads, FFN 512)", "smollm-135m", (1, 1), 1, 1, 1, 256, 5, False, False,
     {"num_attention_heads": 6, "num_query_groups": 2, "kv_channels": 64, "ffn_hidden_size": 512}),
]


def cpu(peak_file: str | None) -> list[dict]:
    from bench.cpu_peak import measure
    from tests.dist_helper import run_distributed

    peak = json.loads(Path(peak_file).read_text()) if peak_file else measure(threads=1)
    per_process = peak["peak_flops"]["fp32"]
    print(f"fp32 GEMM peak {per_process / 1e9:.1f} GFLOP/s per process ({peak['threads']} thread, {peak['cpu']})",
          flush=True)
    rows = []
    for label, model, layout, world, mbs, gbs, seq, iters, plain, prune, overrides in CPU_ROWS:
        r = run_distributed(_worker, world, layout, iters, seq, model, False, mbs, gbs, plain, prune, overrides)[0]
        mfu = r["flops_per_token"] * r["tokens_per_s"] / (per_process * world)
        # per CPU-second of rank 0 (each rank computes its share of the same step)
        mfu_cpu = r["flops_per_token"] * r["tokens_per_cpu_s"] / (per_process * world)
        rows.append({"label": label, "processes": world, **r, "mfu": mfu, "mfu_cpu": mfu_cpu})
        kept = f", {r['kept']:.0%} of the parameters kept" if r["kept"] is not None else ""
        print(f"{label} ({world} proc; {r['params'] / 1e6:.1f} M params{kept}): {r['tokens_per_s']:8,.0f} tokens/s "
              f"({r['step_s'] * 1000:.0f} ms/step wall, {r['step_cpu_s'] * 1000:.0f} ms CPU), "
              f"{r['flops_per_token'] * r['tokens_per_s'] / 1e9:.1f} GFLOP/s; MFU on this CPU {mfu:.1%} "
              f"(by CPU time {mfu_cpu:.1%})", flush=True)
    return rows


def gpu(iters: int) -> None:
    import torch

    from tests.dist_helper import run_distributed

    seq, mbs = 2048, 4
    r = run_distributed(_worker, 1, (1, 1), iters, seq, "llama-3.2-1b", True, mbs, mbs)[0]
    n = r["params"]
    flops_per_token = 6 * n  # + attention: 12 * layers * hidden * seq
    from pretrain.config import MODEL_PRESETS

    p = MODEL_PRESETS["llama-3.2-1b"]
    flops_per_token += 12 * p["num_layers"] * p["hidden_size"] * seq
    achieved = r["tokens_per_s"] * flops_per_token
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12  # H100/H200 dense bf16
    print(f"GPU {torch.cuda.get_device_name()}: {n / 1e9:.2f} B params, seq {seq}, micro-batch {mbs}")
    print(f"  {r['tokens_per_s']:,.0f} tokens/s, {r['step_s'] * 1000:.0f} ms/step, "
          f"{achieved / 1e12:.1f} TFLOP/s, MFU {achieved / peak:.1%} (peak {peak / 1e12:.0f} TFLOP/s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--iters", type=int, default=12, help="--gpu: steps")
    p.add_argument("--peak", help="bench/cpu_peak.py --json output (else the peak is measured first)")
    p.add_argument("--json", help="CPU: also write the rows to this file")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.gpu:
        gpu(args.iters)
        return
    rows = cpu(args.peak)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
