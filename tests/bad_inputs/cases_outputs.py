"""Outputs that cannot be written (issue 31 item 10): every entry point that writes is told a
path below a file (the same OSError family as a read-only folder, without needing a mount; the
read-only and full disks themselves are in ``tests/bad_inputs/test_output_disks.py``). Each must say
which flag and what to do, before any work, and leave nothing."""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs.harness import BadInput, Fixtures, python, tool


def _blocked(case_dir: Path, name: str = "out") -> str:
    """A path whose folder is a file: nothing can be written there."""
    blocker = case_dir / "a_file"
    blocker.write_text("a file where a folder should be")
    return str(blocker / name)


def _train(f: Fixtures, *extra: str) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", f.dataset,
                  "--tokenizer-model", f.tokenizer, "--split", "98,2,0", "--micro-batch-size", "2",
                  "--global-batch-size", "2", "--train-iters", "2", *extra)


def _hf_export(case_dir: Path, f: Fixtures) -> str:
    """A HF export of the fixture checkpoint (the input of the import case)."""
    import subprocess

    from tests.bad_inputs.harness import ROOT
    from tests.dist_helper import subprocess_env

    folder = case_dir / "hf"
    subprocess.run(tool("convert_to_hf.py", "--load", f.checkpoint, "--save", str(folder)), cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True)
    return str(folder)


_UNWRITABLE = r"{flag} .*a_file/out: .*a_file is a file, not a folder; choose another path"

CASES = [
    BadInput("output-train-save-unwritable", lambda d, f: _train(f, "--save", _blocked(d)),
             message=_UNWRITABLE.format(flag="--save")),
    BadInput("output-train-tensorboard-unwritable", lambda d, f: _train(f, "--tensorboard-dir", _blocked(d)),
             message=_UNWRITABLE.format(flag="--tensorboard-dir")),
    BadInput("output-export-hf-unwritable",
             lambda d, f: tool("convert_to_hf.py", "--load", f.checkpoint, "--save", _blocked(d)),
             message=_UNWRITABLE.format(flag="--save")),
    BadInput("output-import-hf-unwritable",
             lambda d, f: tool("convert_from_hf.py", "--load", _hf_export(d, f), "--save", _blocked(d)),
             message=_UNWRITABLE.format(flag="--save")),
    BadInput("output-engine-convert-unwritable",
             lambda d, f: tool("convert_checkpoint.py", "--load", f.checkpoint, "--save", _blocked(d),
                               "--to", "deepspeed"),
             message=_UNWRITABLE.format(flag="--save")),
    BadInput("output-reshard-unwritable",
             lambda d, f: tool("reshard_checkpoint.py", "--load", f.checkpoint, "--save", _blocked(d), "--shrink"),
             message=_UNWRITABLE.format(flag="--save")),
    BadInput("output-evaluate-unwritable",
             lambda d, f: tool("evaluate.py", "--load", f.checkpoint, "--data-path", f.dataset, "--seq-length",
                               "32", "--max-samples", "4", "--output", _blocked(d)),
             message=_UNWRITABLE.format(flag="--output")),
]
