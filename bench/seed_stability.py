"""Is the architecture that pruning finds stable across seeds? (A question reviewers of the paper
asked.) Prunes the same model on the built-in corpus once per seed and compares what survives.

    python bench/seed_stability.py [--seeds 1,2,3] [--iters 60] [--target-ratio 0.5] \\
        [--granularity per-layer] [--common-start-iters 20]

By default every seed draws its own initialisation and data order: only the *shape* (kept
fractions per type, per-layer widths) can be compared. With ``--common-start-iters N`` one model
is first trained N steps without pruning (seed 0), and every seed continues from that checkpoint
with its own data order (the paper's setting: pruning starts from a trained model); then the
*identity* of the kept groups is compared too (mean pairwise Jaccard index).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _build_data(root: str, documents: int) -> dict:
    from data_prep.build_corpus import builtin_documents
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        for doc in itertools.islice(builtin_documents(), documents):
            f.write(json.dumps(doc) + "\n")
    tokenizer = train_tokenizer([corpus], os.path.join(root, "tok"), vocab_size=2000, num_threads=1)
    summary = preprocess([corpus], os.path.join(root, "data"), "GPTSentencePieceTokenizer", tokenizer,
                         append_eod=True, workers=0, progress=False)
    return {"prefix": summary.outputs[0], "tokenizer": tokenizer}


def _worker(data: dict, seeds: list, iters: int, ratio: float, granularity: str, common_start: int,
            root: str) -> list:
    import dataclasses

    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 PretrainConfig, TrainConfig, MODEL_PRESETS)
    from pretrain.run.segments import run

    def config(seed: int, train_iters: int, load: str | None = None, save: str | None = None):
        return PretrainConfig(
            model=ModelConfig(**MODEL_PRESETS["debug"]), parallel=ParallelConfig(),
            data=DataConfig(data_path=[data["prefix"]], tokenizer_model=data["tokenizer"], split="98,2,0"),
            optim=OptimConfig(lr=2e-3, min_lr=2e-4, lr_warmup_iters=5),
            train=TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=train_iters, seed=seed,
                              log_interval=10**6),
            checkpoint=CheckpointConfig(load=load, save=save, save_interval=train_iters if save else None))

    load = None
    if common_start:
        run(config(0, common_start, save=f"{root}/start"))
        load = f"{root}/start"
    out = []
    for seed in seeds:
        cfg = config(seed, iters, load=load)
        tokens_per_step = 8 * cfg.model.seq_length
        cfg.prune = dataclasses.replace(cfg.prune, target_ratio=ratio, interval=2, granularity=granularity,
                                        start_tokens=(iters // 6) * tokens_per_step,
                                        end_tokens=(iters * 2 // 3) * tokens_per_step)
        summary = run(cfg)
        pruner = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
        masks = pruner.masks
        out.append({"seed": seed, "loss": summary["history"][-1]["loss"], "params": pruner.current_params(),
                    "initial": pruner.initial_params, "heads": masks.heads.tolist(), "ffn": masks.ffn.tolist(),
                    "hidden": masks.hidden.tolist(), "layers": masks.layers.tolist()})
    return out


def _fraction(rows) -> float:
    flat = [x for row in rows for x in (row if isinstance(row, list) else [row])]
    return sum(flat) / len(flat)


def _jaccard(a, b) -> float:
    fa = [x for row in a for x in (row if isinstance(row, list) else [row])]
    fb = [x for row in b for x in (row if isinstance(row, list) else [row])]
    both = sum(1 for x, y in zip(fa, fb) if x and y)
    either = sum(1 for x, y in zip(fa, fb) if x or y)
    return both / either if either else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--target-ratio", type=float, default=0.5)
    p.add_argument("--granularity", default="per-layer", choices=["per-layer", "uniform"])
    p.add_argument("--documents", type=int, default=1500, help="built-in corpus documents to train on")
    p.add_argument("--common-start-iters", type=int, default=0,
                   help="train this many steps once (no pruning), then prune every seed from there")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from tests.dist_helper import run_distributed

    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as root:
        data = _build_data(root, args.documents)
        runs = run_distributed(_worker, 1, data, seeds, args.iters, args.target_ratio, args.granularity,
                               args.common_start_iters, root)[0]
    print(f"{'seed':>5} {'loss':>7} {'params':>12} {'heads':>6} {'ffn':>6} {'hidden':>6} {'layers':>6}  "
          "per-layer (query groups / FFN)")
    for r in runs:
        per_layer = " ".join(f"{sum(h)}/{sum(f)}" for h, f in zip(r["heads"], r["ffn"]))
        print(f"{r['seed']:>5} {r['loss']:>7.3f} {r['params']:>12,} {_fraction(r['heads']):>6.2f} "
              f"{_fraction(r['ffn']):>6.2f} {_fraction(r['hidden']):>6.2f} {_fraction(r['layers']):>6.2f}  {per_layer}")
    for kind in ("heads", "ffn", "hidden"):
        values = [_fraction(r[kind]) for r in runs]
        spread = statistics.pstdev(values)
        line = f"kept {kind}: mean {statistics.mean(values):.3f}, std {spread:.3f} across {len(runs)} seeds"
        if args.common_start_iters and len(runs) > 1:
            pairs = list(itertools.combinations(runs, 2))
            same = statistics.mean(_jaccard(a[kind], b[kind]) for a, b in pairs)
            # two independent random choices of these sizes would share this much
            chance = statistics.mean(_fraction(a[kind]) * _fraction(b[kind]) / max(
                _fraction(a[kind]) + _fraction(b[kind]) - _fraction(a[kind]) * _fraction(b[kind]), 1e-9)
                for a, b in pairs)
            line += f"; same groups kept (mean pairwise Jaccard) {same:.3f}, by chance {chance:.3f}"
        print(line)
    widths = [[sum(f) for f in r["ffn"]] for r in runs]
    per_layer_std = [statistics.pstdev(col) for col in zip(*widths)]
    print(f"per-layer FFN width std across seeds: {' '.join(f'{s:.1f}' for s in per_layer_std)} "
          f"(of {len(runs[0]['ffn'][0])} channels)")


if __name__ == "__main__":
    main()
