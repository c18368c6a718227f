"""This machine's own limits, measured: GEMM FLOP/s (fp32 and bf16) at the shapes our models train
with, with the threads training uses, and memory bandwidth. The denominator of the "model FLOPs
utilisation on this CPU" that ``bench/train_throughput.py`` reports.

    python bench/cpu_peak.py [--threads 1] [--json FILE]

Each GEMM is a linear's forward product, ``[tokens, in] @ [in, out]``, for the debug model and
SmolLM2-135M (micro-batch x sequence tokens as ``train_throughput.py`` runs them); each is repeated
for ``--seconds`` and its best rate kept (the least disturbed by other jobs on a shared machine).
The peak of a dtype is the best of its shapes: what torch's GEMM reaches here at our shapes, not a
datasheet figure. Bandwidth: a copy of a 256 MiB tensor (read + write bytes per second).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (model, tokens per micro-batch): the shapes train_throughput.py trains
MODELS = {"debug": 2 * 128, "smollm-135m": 1 * 256}


def gemm_shapes() -> list[tuple[str, int, int, int]]:
    """(name, tokens, in, out) of every distinct linear of the benchmarked models."""
    from pretrain.config import MODEL_PRESETS, ModelConfig

    shapes = []
    for model, tokens in MODELS.items():
        m = ModelConfig(**MODEL_PRESETS[model])
        h, hd = m.hidden_size, m.head_dim
        qkv = hd * (m.num_attention_heads + 2 * (m.num_query_groups or m.num_attention_heads))
        for name, k, n in (("qkv", h, qkv), ("proj", m.num_attention_heads * hd, h),
                           ("fc1", h, 2 * m.ffn_hidden_size), ("fc2", m.ffn_hidden_size, h),
                           ("output", h, m.vocab_size or 8192)):
            shapes.append((f"{model} {name}", tokens, k, n))
    return shapes


def _best_seconds(fn, seconds: float) -> float:
    fn()  # warm-up (allocation, packing)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(threads: int = 1, seconds: float = 0.3) -> dict:
    """The figures as a dict: per dtype its peak FLOP/s and each shape's; memory bandwidth."""
    import torch

    torch.set_num_threads(threads)
    out = {"threads": threads, "torch": torch.__version__, "cpu": _cpu_name(), "gemm": {}, "peak_flops": {}}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {}
        for name, tokens, k, n in gemm_shapes():
            a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            rates[name] = 2 * tokens * k * n / _best_seconds(lambda: torch.matmul(a, b), seconds)
        out["gemm"][dtype_name] = rates
        out["peak_flops"][dtype_name] = max(rates.values())
    src = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    out["memory_bandwidth_bytes_per_s"] = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), seconds * 3)
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads (training runs one per process: OMP_NUM_THREADS=1)")
    p.add_argument("--seconds", type=float, default=0.3, help="time per shape")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    r = measure(args.threads, args.seconds)
    print(f"{r['cpu']}, torch {r['torch']}, {r['threads']} thread(s)")
    for dtype, rates in r["gemm"].items():
        print(f"  {dtype} GEMM peak {r['peak_flops'][dtype] / 1e9:.1f} GFLOP/s; per shape: "
              + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in rates.items()))
    print(f"  memory bandwidth (copy) {r['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
