"""Merge throughput: tools/merge_datasets.py (``data_prep.merge``) vs ``cp`` of the same bytes,
and vs megatron-core's ``IndexedDatasetBuilder.add_index`` (what Megatron-LM's merge_datasets.py
runs). Synthetic shards (random ids), the page cache dropped of nothing: all three read warm files.

    python bench/merge.py [--shards 64] [--tokens-per-shard 4e6] [--root /tmp/merge_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dataset_startup import make_dataset  # noqa: E402


def _timed(fn) -> float:
    start = time.time()
    fn()
    return time.time() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/tmp/merge_bench"))
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--tokens-per-shard", type=float, default=4e6)
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    args = p.parse_args()
    from data_prep.merge import merge_datasets

    shards_dir = args.root / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prefixes = [str(shards_dir / f"shard_{i:05d}") for i in range(args.shards)]
    for prefix in prefixes:
        make_dataset(prefix, int(args.tokens_per_shard), rng)
    nbytes = sum(os.path.getsize(p + ".bin") + os.path.getsize(p + ".idx") for p in prefixes)
    bins = [p + ".bin" for p in prefixes]

    def ours():
        merge_datasets(prefixes, str(args.root / "ours"), overwrite=True)

    def cp():  # the same bytes, one cp: the .bin and .idx files into a folder
        target = args.root / "cp"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        subprocess.run(["cp", *bins, *(p + ".idx" for p in prefixes), str(target)], check=True)

    def megatron():
        import torch  # noqa: F401
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(args.root / "megatron.bin"), dtype=np.uint16)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(str(args.root / "megatron.idx"))

    times = {name: min(_timed(fn) for _ in range(args.repeat)) for name, fn in
             (("cp", cp), ("ours", ours), ("megatron-core add_index", megatron))}
    same = all(open(str(args.root / "ours") + e, "rb").read() == open(str(args.root / "megatron") + e, "rb").read()
               for e in (".bin", ".idx"))
    print(f"{args.shards} shards, {nbytes / 1e6:.0f} MB (.bin + .idx), best of {args.repeat}:")
    for name, seconds in times.items():
        print(f"  {name:24s} {seconds:6.2f}s  {nbytes / seconds / 1e6:8.0f} MB/s  "
              f"({times['cp'] / seconds:.2f}x cp)")
    print(f"  ours == megatron-core's output: {same}")
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
