"""Summarise a run from its ``metrics.jsonl``: did the loss go down, what was saved, where logs are.

``python -m pretrain.report RUN/tensorboard/metrics.jsonl [--checkpoints DIR] [--tensorboard-dir D]``
exits non-zero if the loss did not go down (the demo uses this as its check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_jsonl(path: str) -> list[dict]:
    """The records of a run's JSONL log (metrics, evals, pruning history), one per iteration, in
    order; [] when the file does not exist. A resumed run rewrites later iterations: the last line
    of an iteration wins."""
    if not os.path.isfile(path):
        return []
    by_iteration = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_iteration[record["iteration"]] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def summarise(metrics_path: str) -> dict:
    records = {r["iteration"]: r for r in read_jsonl(metrics_path)}
    its = sorted(records)
    if not its:
        raise SystemExit(f"error: {metrics_path} has no records")
    window = max(1, len(its) // 10)
    first = sum(records[i]["loss"] for i in its[:window]) / window
    last = sum(records[i]["loss"] for i in its[-window:]) / window
    return {"iterations": its[-1], "first_loss": first, "last_loss": last,
            "tokens": records[its[-1]]["tokens"], "window": window}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("--checkpoints")
    p.add_argument("--tensorboard-dir")
    args = p.parse_args(argv)
    s = summarise(args.metrics)
    print("=" * 72)
    print(f"trained {s['iterations']} iterations ({s['tokens']:,} tokens)")
    print(f"loss: {s['first_loss']:.3f} (mean of first {s['window']}) -> {s['last_loss']:.3f} "
          f"(mean of last {s['window']})")
    pruning = os.path.join(os.path.dirname(args.metrics), "pruning_history.jsonl")
    if os.path.isfile(pruning):
        events = [json.loads(line) for line in open(pruning) if line.strip()]
        if events:
            last = events[-1]
            per_layer = last["kept_per_layer"]
            print(f"pruning: {len(events)} events; parameters -> {last['params'] / 1e6:.3f} M "
                  f"(target {last['target'] / 1e6:.3f} M); kept heads {last['kept_heads']:.0%}, "
                  f"FFN {last['kept_ffn']:.0%}, hidden {last['kept_hidden']:.0%}")
            print(f"  found architecture: query groups per layer {per_layer['heads']}, "
                  f"FFN per layer {per_layer['ffn']}, hidden {per_layer['hidden']}")
    if args.checkpoints and os.path.isdir(args.checkpoints):
        ckpts = sorted(n for n in os.listdir(args.checkpoints) if n.startswith("iter_"))
        print(f"checkpoints in {args.checkpoints}: {', '.join(ckpts)}")
    if args.tensorboard_dir:
        print(f"tensorboard logs: {os.path.abspath(args.tensorboard_dir)}")
        print(f"  view with: .venv/bin/tensorboard --logdir {args.tensorboard_dir}")
    ok = s["last_loss"] < s["first_loss"] - 0.5
    print("loss went down: " + ("yes" if ok else "NO"))
    print("=" * 72)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
