"""Bad inputs to training (`python -m pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bad_inputs.harness import BadInput, python, tool


def _train(f, *extra: str) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32",
                  "--data-path", f.dataset, "--tokenizer-model", f.tokenizer, "--split", "98,2,0",
                  "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", *extra)


def _wider_layer_shapes(d: Path) -> str:
    """The debug model's 4 layers, the second wider than --ffn-hidden-size 384."""
    path = d / "layer_shapes.json"
    shapes = [{"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 384}] * 4
    shapes[1] = {**shapes[1], "ffn_hidden_size": 512}
    path.write_text(json.dumps(shapes))
    return str(path)


CASES = [
    BadInput("train-layer-shapes-wider-than-flags",
             lambda d, f: _train(f, "--layer-shapes", _wider_layer_shapes(d), "--save", str(d / "ckpt")),
             message=r"--layer-shapes: layer 1 has ffn_hidden_size 512, more than --ffn-hidden-size 384",
             leftovers=("ckpt",)),
    BadInput("train-tensor-parallel-zero", lambda d, f: _train(f, "--tensor-model-parallel-size", "0"),
             message=r"--tensor-model-parallel-size 0 and --pipeline-model-parallel-size 1: both must be >= 1"),
    BadInput("train-shrink-at-not-a-number", lambda d, f: _train(f, "--shrink-at", "1e6,soon"),
             message=r"argument --shrink-at: 'soon' is not a number"),
    BadInput("train-shrink-without-pruning",
             lambda d, f: _train(f, "--shrink-at", "auto", "--save", str(d / "ckpt")),
             message=r"--shrink-at needs pruning", leftovers=("ckpt",)),
    BadInput("train-end-pruning-without-state", lambda d, f: _train(f, "--end-pruning"),
             message=r"--end-pruning applies to a checkpoint with pruning state"),
    BadInput("train-end-and-drop-pruning",
             lambda d, f: _train(f, "--load", f.checkpoint, "--end-pruning", "--drop-pruning-state"),
             message=r"--end-pruning and --drop-pruning-state exclude each other"),
    BadInput("train-sequence-too-long-for-memory",
             lambda d, f: _train(f, "--seq-length", "2000000", "--micro-batch-size", "8",
                                 "--global-batch-size", "8", "--max-position-embeddings", "2000000"),
             message=r"--seq-length 2000000 with --micro-batch-size 8 needs at least .* GiB per rank"),
    BadInput("train-diverges-to-nan",
             lambda d, f: _train(f, "--lr", "1e8", "--clip-grad", "0", "--train-iters", "30",
                                 "--max-skipped-nonfinite-steps", "1", "--save", str(d / "ckpt"),
                                 "--save-interval", "100"),
             message=r"more than --max-skipped-nonfinite-steps 1", leftovers=("ckpt/iter_0000030",)),
    # issue 31 item 13: flags taken silently (or read as "not given") are refused, naming the flag
    BadInput("train-split-beside-per-split-data",
             lambda d, f: python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--train-data-path",
                                 f.dataset, "--valid-data-path", f.dataset, "--tokenizer-model", f.tokenizer,
                                 "--split", "98,2,0", "--micro-batch-size", "2", "--global-batch-size", "2",
                                 "--train-iters", "2"),
             message=r"--split 98,2,0 cuts --data-path .* each split has data of its own .* drop it"),
    BadInput("train-query-groups-zero", lambda d, f: _train(f, "--num-query-groups", "0"),
             message=r"--num-query-groups 0: must be >= 1"),
    BadInput("train-seed-negative", lambda d, f: _train(f, "--seed", "-1"),
             message=r"--seed -1: must be in \[0, 4294967295\]"),
    BadInput("train-norm-epsilon-nan", lambda d, f: _train(f, "--norm-epsilon", "nan"),
             message=r"--norm-epsilon nan: must be > 0"),
    BadInput("train-prune-end-tokens-infinite",
             lambda d, f: _train(f, "--prune-target-ratio", "0.5", "--prune-end-tokens", "inf"),
             message=r"argument --prune-end-tokens: 'inf' is not a finite number"),
    # --eval-tasks (issue 27 item 4): refused before anything is built or written
    BadInput("train-eval-tasks-unknown",
             lambda d, f: _train(f, "--eval-interval", "1", "--eval-tasks", "paper,arc", "--save", str(d / "ckpt")),
             message=r"--eval-tasks arc: unknown task; known: arc_easy, arc_challenge, .*mmlu", leftovers=("ckpt",)),
    BadInput("train-eval-tasks-limit-zero",
             lambda d, f: _train(f, "--eval-interval", "1", "--eval-tasks", "boolq", "--eval-tasks-limit", "0"),
             message=r"--eval-tasks-limit 0: must be >= 1"),
    BadInput("train-eval-tasks-interval-not-a-multiple",
             lambda d, f: _train(f, "--eval-interval", "2", "--eval-tasks", "boolq", "--eval-tasks-interval", "3"),
             message=r"--eval-tasks-interval 3: the tasks are scored at evaluations, so it must be a multiple of "
                     r"--eval-interval \(2\); or 0 to score them at the end only"),
    BadInput("train-eval-tasks-without-tokenizer",
             lambda d, f: python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--mock-data",
                                 "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                                 "--eval-interval", "1", "--eval-tasks", "boolq", "--save", str(d / "ckpt")),
             message=r"--eval-tasks boolq: the tasks are text and this run has no tokenizer .* give --tokenizer-model",
             leftovers=("ckpt",)),
    BadInput("train-eval-tasks-without-evaluation", lambda d, f: _train(f, "--eval-tasks", "boolq"),
             message=r"--eval-tasks boolq: the tasks are scored where the held-out loss is evaluated, and this run "
                     r"evaluates nowhere: give --eval-interval N"),
    BadInput("tool-export-negative-shard-size",
             lambda d, f: tool("convert_to_hf.py", "--load", f.checkpoint, "--save", str(d / "hf"),
                               "--max-shard-size-gb", "-1"),
             message=r"argument --max-shard-size-gb: -1: must be > 0", leftovers=("hf",)),
    BadInput("tool-evaluate-zero-samples",
             lambda d, f: tool("evaluate.py", "--load", f.checkpoint, "--data-path", f.dataset, "--max-samples", "0"),
             message=r"argument --max-samples: 0: must be >= 1"),
]
