"""The real-parent comparison (issue 28): a --parent that is not an imported checkpoint or has no
tokenizer, a corpus made with another tokenizer, a target the parent cannot reach with its
alignment, a T too small for the pruning window. Each is refused by tools/compare_baselines.py
before any run starts, and nothing is written under --out."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.bad_inputs.harness import BadInput, Fixtures, tool

_MADE: dict[str, str] = {}  # one tiny imported parent for all cases of a session


def _parent(f: Fixtures) -> tuple[str, str]:
    """(a tiny HF Llama whose tokenizer made the fixture data, its import by tools/convert_from_hf.py)."""
    if not _MADE:
        from tests.tools.real_parent_fixture import import_parent, tiny_hf_llama

        root = Path(tempfile.mkdtemp(prefix="bad_inputs_real_parent_"))
        _MADE["hf"] = tiny_hf_llama(str(root / "hf"), f.tokenizer)
        _MADE["parent"] = import_parent(_MADE["hf"], str(root / "parent"))
    return _MADE["hf"], _MADE["parent"]


def _test_set(d: Path, f: Fixtures, tokenizer: str | None = None) -> str:
    """Held-out data: other documents than the training set's source file."""
    from data_prep.preprocess import preprocess

    lines = Path(f.corpus).read_text().splitlines()[:40]
    (d / "held_out.jsonl").write_text("\n".join(lines) + "\n")
    return preprocess([str(d / "held_out.jsonl")], str(d / "held_out"), "GPTSentencePieceTokenizer",
                      tokenizer or f.tokenizer, append_eod=True, workers=0, progress=False).outputs[0]


def _compare(d: Path, f: Fixtures, parent: str, *extra: str, data: str | None = None, test: str | None = None):
    return tool("compare_baselines.py", "--recipe", "cpu-tiny-real", "--parent", parent,
                "--data-path", data or f.dataset, "--test-data-path", test or _test_set(d, f), "--seeds", "1",
                "--out", str(d / "out"), *extra)


def parent_is_a_hf_model(d: Path, f: Fixtures) -> list[str]:
    return _compare(d, f, _parent(f)[0])


def parent_trained_here(d: Path, f: Fixtures) -> list[str]:
    return _compare(d, f, f.checkpoint)


def parent_without_tokenizer(d: Path, f: Fixtures) -> list[str]:
    # imported here (a copy would still find the tokenizer its checkpoint records), then lost
    from tests.tools.real_parent_fixture import import_parent

    import_parent(_parent(f)[0], str(d / "parent"))
    shutil.rmtree(d / "parent" / "tokenizer")
    return _compare(d, f, str(d / "parent"))


def corpus_of_another_tokenizer(d: Path, f: Fixtures) -> list[str]:
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    lines = Path(f.corpus).read_text().splitlines()
    (d / "other.jsonl").write_text("\n".join(lines[40:]) + "\n")
    other = train_tokenizer([str(d / "other.jsonl")], str(d / "other_tok"), vocab_size=400, num_threads=1)
    data = preprocess([str(d / "other.jsonl")], str(d / "other"), "GPTSentencePieceTokenizer", other,
                      append_eod=True, workers=0, progress=False).outputs[0]
    return _compare(d, f, _parent(f)[1], data=data)


CASES: list[BadInput] = [
    # issue 27 item 4: the tasks every run is scored on, checked before anything else
    BadInput("compare-unknown-task", lambda d, f: _compare(d, f, _parent(f)[1], "--tasks", "paper,arc"),
             message=r"--tasks arc: unknown task; known: arc_easy, arc_challenge, .*mmlu", leftovers=("out",)),
    BadInput("compare-task-limit-zero", lambda d, f: _compare(d, f, _parent(f)[1], "--task-limit", "0"),
             message=r"argument --task-limit: 0: must be >= 1", leftovers=("out",)),
    # the task curve: scored at the runs' evaluations, of tasks there are
    BadInput("compare-task-curve-not-at-evaluations",
             lambda d, f: _compare(d, f, _parent(f)[1], "--task-curve-interval", "3"),
             message=r"recipe cpu-tiny-real: task_curve_interval \(--task-curve-interval\) 3: the tasks are scored at "
                     r"the runs' evaluations, every 4 iterations: give a multiple of 4, or 0 \(no task curve\)",
             leftovers=("out",)),
    BadInput("compare-task-curve-without-tasks",
             lambda d, f: _compare(d, f, _parent(f)[1], "--task-curve-interval", "4", "--tasks", "none"),
             message=r"--task-curve-interval 4: --tasks none scores no task; give the tasks, or "
                     r"--task-curve-interval 0", leftovers=("out",)),
    BadInput("compare-real-parent-is-a-hf-model", parent_is_a_hf_model,
             message=r"--parent \S+/hf is a HuggingFace model or GGUF file, not an imported checkpoint: import it "
                     r"first: python tools/convert_from_hf.py", leftovers=("out",)),
    BadInput("compare-real-parent-trained-here", parent_trained_here,
             message=r"--parent \S+ is a checkpoint trained here, not a pretrained model imported by "
                     r"tools/convert_from_hf.py", leftovers=("out",)),
    BadInput("compare-real-parent-without-tokenizer", parent_without_tokenizer,
             message=r"--parent \S+/parent has no tokenizer \(\S+ is missing\)", leftovers=("out",)),
    BadInput("compare-real-corpus-of-another-tokenizer", corpus_of_another_tokenizer,
             message=r"--data-path was not made with the tokenizer of --parent \S+ \(\S+/tokenizer\): tokenize the "
                     r"corpus with it", leftovers=("out",)),
    BadInput("compare-real-target-unreachable",
             lambda d, f: _compare(d, f, _parent(f)[1], "--target-ratio", "0.03"),
             message=r"the target, 0.03 of the parent's [\d,]+ parameters .* is below the smallest model the parent "
                     r"can be pruned to with alignment 8", leftovers=("out",)),
    BadInput("compare-real-budget-too-small-for-the-window",
             lambda d, f: _compare(d, f, _parent(f)[1], "--train-tokens", "512"),
             message=r"recipe cpu-tiny-real: the pruning window \(0 steps\) is shorter than one --prune-interval "
                     r"\(1 steps\): a budget too small for the window; raise T \(continue_tokens, --train-tokens\) "
                     r"to at least 1,024 tokens", leftovers=("out",)),
    BadInput("compare-real-budget-too-small-for-the-calibration",
             lambda d, f: _compare(d, f, _parent(f)[1], "--train-tokens", "1024"),
             message=r"recipe cpu-tiny-real: the one-shot arms calibrate for 2 steps, not fewer than the 2 steps of "
                     r"T = 1,024 tokens: raise T \(--train-tokens\)", leftovers=("out",)),
]
