"""Start-up at scale: how long megatron-core's ``BlendedMegatronDatasetBuilder`` (what the trainer
calls, through ``pretrain.data.build_datasets``) takes to build its indices for a blend of many
small datasets and for one large one, the first time (no index cache: built and saved) and the
next time (read from the cache), with the default cache (beside each dataset) and with
``--data-cache-path``. The datasets are synthetic (random ids, random document lengths), written
with the preprocessing writer (so they have manifests).

    python bench/dataset_startup.py --root /tmp/startup [--prefixes 1000] [--large-tokens 1e9]

``--ranks 2`` also runs the cached case on 2 gloo ranks and reports each rank's time: rank 0
builds (or finds the cache), the others wait for it and read the cache.
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

VOCAB = 32000
SEQ = 2048


def make_dataset(prefix: str, tokens: int, rng: np.random.Generator, mean_doc: int = 1000) -> None:
    from data_prep.preprocess import IndexedDatasetWriter

    if os.path.exists(prefix + ".idx"):
        return
    writer = IndexedDatasetWriter(prefix, np.uint16, {"vocab_size": VOCAB, "tokenizer_type": "NullTokenizer",
                                                      "tokenizer_model_sha256": None})
    left = tokens
    while left > 0:
        lengths = rng.integers(mean_doc // 4, mean_doc * 7 // 4, size=max(1, min(left, 1 << 24) // mean_doc))
        lengths[np.cumsum(lengths) > left] = 0
        lengths = lengths[lengths > 0] if lengths.sum() else np.array([left])
        writer.add_documents(rng.integers(0, VOCAB, size=int(lengths.sum()), dtype=np.uint16), lengths)
        left -= int(lengths.sum())
    writer.finalize({})


def build_once(data_path: list[str], cache: str | None, train_tokens: int) -> float:
    """Seconds for build_datasets in this process (a world of 1)."""
    import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401 (imports are not start-up
    import megatron.core.datasets.gpt_dataset  # noqa: F401               work the data causes)
    import torch

    from data_prep.tokenizers import build_tokenizer
    from pretrain.config import DataConfig
    from pretrain.data import build_datasets

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    data = DataConfig(data_path=data_path, tokenizer_type="NullTokenizer", vocab_size_for_null_tokenizer=VOCAB,
                      split="99,1,0", data_cache_path=cache)
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    samples = train_tokens // SEQ
    start = time.time()
    build_datasets(data, tok, SEQ, seed=1234, num_samples=(samples, max(1, samples // 100), 0))
    return time.time() - start


def _child(args) -> None:
    """One measurement in a fresh process (no import or page-cache effects of the others)."""
    data_path = args.data_path_file.read_text().split()
    print(f"{build_once(data_path, args.cache or None, args.train_tokens):.3f}")


def _measure(data_path_file: Path, cache: str | None, train_tokens: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", "--data-path-file", str(data_path_file),
                          "--cache", cache or "", "--train-tokens", str(train_tokens)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def _clear_default_caches(prefixes: list[str]) -> None:
    for prefix in prefixes:  # megatron-core's default cache: PREFIX/cache/ (a folder named like the prefix)
        shutil.rmtree(prefix, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/tmp/dataset_startup"))
    p.add_argument("--prefixes", type=int, default=1000)
    p.add_argument("--small-tokens", type=float, default=1e5, help="tokens per small dataset")
    p.add_argument("--large-tokens", type=float, default=1e9)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-path-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--train-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    rng = np.random.default_rng(0)
    args.root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    small = [str(args.root / "small" / f"shard_{i:05d}") for i in range(args.prefixes)]
    os.makedirs(args.root / "small", exist_ok=True)
    for prefix in small:
        make_dataset(prefix, int(args.small_tokens), rng)
    large = str(args.root / "large")
    make_dataset(large, int(args.large_tokens), rng)
    print(f"datasets ready in {time.time() - start:.0f}s: {args.prefixes} x {args.small_tokens:.0e} tokens, "
          f"1 x {args.large_tokens:.0e} tokens")

    blends = {
        f"blend of {args.prefixes} prefixes": (" ".join(f"1 {s}" for s in small), small,
                                                int(args.prefixes * args.small_tokens)),
        f"one prefix of {args.large_tokens:.0e} tokens": (large, [large], int(args.large_tokens)),
    }
    for name, (data_path, prefixes, tokens) in blends.items():
        path_file = args.root / f"data_args_{len(prefixes)}.txt"
        path_file.write_text(data_path)
        for cache in (None, str(args.root / "cache")):
            _clear_default_caches(prefixes) if cache is None else shutil.rmtree(cache, ignore_errors=True)
            first = _measure(path_file, cache, tokens)
            second = _measure(path_file, cache, tokens)
            where = "--data-cache-path" if cache else "default cache (beside the data)"
            print(f"{name}, {where}: first build {first:.2f}s, cached {second:.2f}s")
        _clear_default_caches(prefixes)


if __name__ == "__main__":
    main()
