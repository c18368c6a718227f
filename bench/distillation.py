"""Does distilling from the unpruned parent help pruning-aware pretraining at the same tokens, and
what does the teacher cost? (issue 19)

    python bench/distillation.py [--parent-iters 150] [--iters 60] [--target-ratio 0.5] \\
        [--weights 0,0.5,1] [--temperature 1] [--seq 64] [--gbs 8]

On the built-in corpus (its last documents held out): a `debug`-shaped parent is trained from
scratch (the stand-in for a released model), then continued from its checkpoint once per
``--kd-weight``, every run pruned to ``--target-ratio`` over the first two thirds of its steps and
shrunk in-run, with the same seed, data and tokens (``--kd-weight 0`` runs the teacher but gives
its KL no weight: the no-distillation arm, bit-identical to a run without a teacher). Prints the
held-out loss of each, the parent's, and the teacher's share of the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiny_corpus import build_tiny_corpus  # noqa: E402



def _train(args: list[str], label: str) -> float:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.time() - start


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent-iters", type=int, default=150)
    p.add_argument("--iters", type=int, default=60, help="steps of each pruned run")
    p.add_argument("--target-ratio", type=float, default=0.5)
    p.add_argument("--weights", default="0,0.5,1", help="--kd-weight of each run (0: no distillation)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--out", default=None, help="folder to keep (default: a temporary one)")
    args = p.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="bench_distill_")
    os.makedirs(root, exist_ok=True)
    data = build_tiny_corpus(root, args.documents - args.held_out, args.held_out)
    tokens_per_step = args.gbs * args.seq
    common = ["--model", "debug", "--seq-length", str(args.seq), "--data-path", data["train"], "--split", "100,0,0",
              "--tokenizer-model", data["tokenizer"], "--test-data-path", data["held_out"], "--eval-iters", "8",
              "--micro-batch-size", str(args.gbs), "--global-batch-size", str(args.gbs), "--seed", "1",
              "--log-interval", "1000"]
    parent = os.path.join(root, "parent")
    seconds = _train(common + ["--train-iters", str(args.parent_iters), "--lr", "2e-3", "--min-lr", "2e-4",
                               "--lr-warmup-iters", "10", "--save", parent, "--save-interval", str(args.parent_iters),
                               "--tensorboard-dir", os.path.join(parent, "tb")], "parent")
    rows = [("parent", _read(os.path.join(parent, "tb", "evals.jsonl"))[-1]["test_loss"], seconds, None, None)]
    end_tokens = args.iters * 2 // 3 * tokens_per_step
    for weight in [float(w) for w in args.weights.split(",")]:
        folder = os.path.join(root, f"kd{weight:g}")
        # the student's own schedule restarts from the parent's weights: --finetune
        seconds = _train(common + ["--load", parent, "--finetune", "--train-iters", str(args.iters),
                                   "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
                                   "--prune-target-ratio", str(args.target_ratio), "--prune-interval", "2",
                                   "--prune-end-tokens", str(end_tokens), "--shrink-at", "auto",
                                   "--kd-teacher", parent, "--kd-weight", str(weight),
                                   "--kd-temperature", str(args.temperature),
                                   "--save", folder, "--tensorboard-dir", os.path.join(folder, "tb")],
                         f"--kd-weight {weight:g}")
        metrics = _read(os.path.join(folder, "tb", "metrics.jsonl"))
        share = statistics.mean(m["kd_teacher_seconds"] / m["step_seconds"] for m in metrics[2:])
        rows.append((f"pruned, --kd-weight {weight:g}", _read(os.path.join(folder, "tb", "evals.jsonl"))[-1]["test_loss"],
                     seconds, share, metrics[-1].get("kd_kl")))
    print(f"\nparent: {args.parent_iters} steps; each pruned run: {args.iters} steps x {tokens_per_step} tokens "
          f"from the parent, pruned to {args.target_ratio:.0%} by {end_tokens} tokens and shrunk, T {args.temperature:g}")
    print("| run | held-out loss | wall s | teacher share of step time | final KL |")
    print("|---|---|---|---|---|")
    for name, loss, secs, share, kl in rows:
        print(f"| {name} | {loss:.4f} | {secs:.0f} | " + (f"{share:.0%}" if share is not None else "-") + " | "
              + (f"{kl:.4f}" if kl is not None else "-") + " |")


if __name__ == "__main__":
    main()
