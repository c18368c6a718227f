"""Bad inputs to training (`python -m pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bad_inputs.harness import BadInput, python


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
             message=r"--tensor/pipeline-model-parallel-size must be >= 1"),
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
]
