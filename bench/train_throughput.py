"""Training throughput (tokens/s) of the debug model for TP=1/PP=1 vs TP=2 and PP=2 on CPU, and
``--gpu``: a 1B-class model for a few steps on one GPU with MFU.

    python bench/train_throughput.py            # CPU, gloo, 1-2 processes
    python bench/train_throughput.py --gpu      # one GPU (bf16)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(layout, iters, mock_seq, model, bf16, mbs, gbs):
    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig,
                                 ParallelConfig, PretrainConfig, TrainConfig, MODEL_PRESETS)
    from pretrain.run.segments import run

    tp, pp = layout
    m = dict(MODEL_PRESETS[model], seq_length=mock_seq)
    cfg = PretrainConfig(
        model=ModelConfig(**m),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(mock_data=True, split="100,0,0"),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5),
        train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters,
                          log_interval=max(1, iters), bf16=bf16),
        checkpoint=CheckpointConfig(),
    )
    s = run(cfg)
    steps = s["history"][2:]  # skip warm-up steps
    seconds = sum(h["step_seconds"] for h in steps)
    tokens = len(steps) * gbs * mock_seq
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(steps),
            "params": cfg.model.num_parameters(s["trainer"].config.model.padded_vocab_size(
                cfg.model.vocab_size or 8192, tp))["total"]}


def cpu(iters: int) -> None:
    from tests.dist_helper import run_distributed

    rows = []
    for layout, world in (((1, 1), 1), ((2, 1), 2), ((1, 2), 2)):
        r = run_distributed(_worker, world, layout, iters, 128, "debug", False, 2, 8)[0]
        rows.append((layout, world, r))
        print(f"TP={layout[0]} PP={layout[1]} ({world} proc): {r['tokens_per_s']:8,.0f} tokens/s "
              f"({r['step_s'] * 1000:.0f} ms/step)", flush=True)
    base = rows[0][2]["tokens_per_s"]
    for layout, world, r in rows[1:]:
        print(f"  TP={layout[0]} PP={layout[1]} vs TP=1 PP=1: {r['tokens_per_s'] / base:.2f}x")


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
    p.add_argument("--iters", type=int, default=12)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    gpu(args.iters) if args.gpu else cpu(args.iters)


if __name__ == "__main__":
    main()
