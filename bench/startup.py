"""Start-up: the time from launching ``torchrun ... -m pretrain`` to its first training step, by part
(imports, the checks and the plan, megatron-core's model and optimizer build, the checkpoint load,
the datasets' indices from their cache, ...), for a run that resumes from a checkpoint.

    python bench/startup.py [--model debug] [--tp 2] [--rounds 2] [--keep DIR]
    python bench/startup.py --model smollm-135m --model-args "--num-attention-heads 8 --num-query-groups 2 --kv-channels 64"

First one run trains 1 step and saves (not timed) and one more builds the datasets' index cache;
then each round relaunches the resuming command (``--load``, the same cache) and stops it at its
first step. Every rank records when each part of ``pretrain.run.segments._run_segment`` ends;
the table is rank 0's, in seconds since the launch (median over the rounds). The tiny dataset of
the test fixtures is the data (its tokenizer's 384-entry vocabulary: the model's embedding is small).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "old_checkpoints" / "data"

# the parts of a segment, in order, each timed at its end (``pretrain.run.segments`` globals)
PARTS = ["resolve_config", "tokenizer_and_vocab", "init_distributed", "check_data", "print_plan",
         "check_training_memory", "build_model_and_engine", "load_run_checkpoint", "build_callbacks",
         "build_trainer", "restore_trainer_state"]

# run inside each rank (``python -c``): time every part, stop at the first step
_HARNESS = r"""
import json, os, sys, time
launch = float(os.environ["STARTUP_LAUNCH"])
marks = [("interpreter up", time.time())]
sys.path.insert(0, os.environ["STARTUP_ROOT"])
from pretrain.run import cli, segments
from pretrain.trainer import Trainer
marks.append(("imports (pretrain, torch)", time.time()))
import megatron.core.parallel_state  # what the run imports lazily first (in init_distributed)
marks.append(("import megatron.core", time.time()))

def timed(name, fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        marks.append((name, time.time()))
        return out
    return wrapper

for name in json.loads(os.environ["STARTUP_PARTS"]):
    setattr(segments, name, timed(name, getattr(segments, name)))

def first_step(self):
    marks.append(("first step begins", time.time()))
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.environ["STARTUP_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump([(name, t - launch) for name, t in marks], f)
    sys.stdout.flush()
    os._exit(0)

Trainer.train_step = first_step
sys.argv = ["pretrain"] + sys.argv[1:]
sys.exit(cli.main())
"""


def _command(args, python: str) -> list[str]:
    return [str(Path(python).parent / "torchrun"), "--standalone", "--nproc-per-node", str(args.tp * args.pp)]


def _run_args(args, root: str) -> list[str]:
    return ["--model", args.model, "--tensor-model-parallel-size", str(args.tp),
            "--pipeline-model-parallel-size", str(args.pp),
            "--data-path", str(DATA / "tiny_text_document"), "--split", "98,2,0",
            "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(DATA / "tok.model"),
            "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", str(args.seq_length),
            "--data-cache-path", f"{root}/cache", "--eval-iters", "0", "--log-interval", "1"] + args.model_args.split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--model-args", default="", help="more model flags, e.g. '--num-attention-heads 8 "
                   "--num-query-groups 2 --kv-channels 64': SmolLM2-135M's 9 heads do not split over TP=2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep", help="a folder for the checkpoint and cache (kept: later calls reuse them)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    python = sys.executable
    root = args.keep or tempfile.mkdtemp(prefix="startup_")
    os.makedirs(root, exist_ok=True)
    try:
        base = _command(args, python)
        run_args = _run_args(args, root)
        if not os.path.isdir(f"{root}/ckpt"):
            subprocess.run(base + ["-m", "pretrain"] + run_args + ["--train-iters", "2", "--save", f"{root}/ckpt",
                                                                  "--save-interval", "1", "--exit-interval", "1"],
                           check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
        rounds = []
        for _ in range(args.rounds):
            out = tempfile.mkdtemp(dir=root)
            launch = time.time()
            subprocess.run(base + ["--no-python", python, "-c", _HARNESS] + run_args +
                           ["--train-iters", "2", "--load", f"{root}/ckpt"], check=True, cwd=root,
                           env={**env, "STARTUP_LAUNCH": repr(launch), "STARTUP_ROOT": str(ROOT),
                                "STARTUP_PARTS": json.dumps(PARTS), "STARTUP_OUT": out},
                           stdout=subprocess.DEVNULL)
            rounds.append(json.loads(Path(out, "rank0.json").read_text()))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    names = [name for name, _ in rounds[0]]
    ends = {name: statistics.median(dict(r)[name] for r in rounds) for name in names}
    print(f"{args.model}, TP={args.tp} PP={args.pp}: launch -> first step {ends['first step begins']:.2f}s "
          f"(median of {len(rounds)}; rank 0)")
    previous = 0.0
    for name in names:
        print(f"  {name:<24} ends at {ends[name]:6.2f}s  (+{ends[name] - previous:5.2f}s)")
        previous = ends[name]


if __name__ == "__main__":
    main()
