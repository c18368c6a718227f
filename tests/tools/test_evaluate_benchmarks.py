"""tools/evaluate.py --load CKPT --tasks (pretrain/benchmarks.py) on a tiny two-layer model: the
loglikelihoods equal a hand computation, every TP/PP/DP layout and the shrunk model choose as TP=1
does, lm-eval on the HF export chooses the same, and the command line runs `--tasks paper` (issue 27)."""

import json
import os
import subprocess
import sys

import pytest

from tests.dist_helper import run_distributed
from tests.tools.test_convert_hf import ROOT, _our_logits, _pruned

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REAL_TASKS = ("arc_easy", "boolq", "hellaswag", "winogrande")
LIMIT = 4


def _fake_task():
    """Three documents whose label we set: a shared context with short answers, WinoGrande-style
    contexts that differ, and a context longer than the model's 64 positions (left-truncated)."""
    from pretrain.benchmarks import Document

    long_context = "The package manager installs the files of a package. " * 12
    return [Document(0, ["The file is"] * 3, [" a", " the package", " written"], 1),
            Document(1, ["A package depends on", "A library depends on"], [" other files."] * 2, 0),
            Document(2, [long_context] * 2, [" It works.", " It removes the system configuration."], 1)]


def _documents():
    from pretrain.benchmarks import load_tasks

    return {"fake": _fake_task(), **load_tasks(REAL_TASKS, 0, LIMIT)}


def layouts_worker(data, root):
    """Train a two-layer model pruned per layer (TP=2), shrink it, and score the same documents
    with DP=2, TP=2, PP=2 and the shrunk checkpoint; per-document log-likelihoods per case."""
    import torch

    from pretrain.benchmarks import load_for_benchmarks, score_documents
    from pretrain.shrink import reshard_checkpoint
    from pretrain.run.segments import run

    run(_pruned(data, "per-layer", tp=2, save=f"{root}/masked", num_layers=2))
    if torch.distributed.get_rank() == 0:
        reshard_checkpoint(f"{root}/masked", f"{root}/shrunk", shrink=True, progress=False)
    torch.distributed.barrier()
    docs = _documents()
    out = {}
    for case, load, tp, pp in (("dp2", "masked", 1, 1), ("tp2", "masked", 2, 1), ("pp2", "masked", 1, 2),
                               ("shrunk", "shrunk", 1, 1)):
        model = load_for_benchmarks(f"{root}/{load}", tp, pp)
        summary = score_documents(model, docs, batch_size=3, progress=False, per_document=True)
        out[case] = {name: [(d["logliks"], d["pred"], d["pred_norm"]) for d in m["per_document"]]
                     for name, m in summary["tasks"].items()}
        out[case]["metrics"] = {name: (m["acc"], m["acc_norm"]) for name, m in summary["tasks"].items()}
    return out


def reference_worker(data, root):
    """By hand: each request alone through the full model (TP=1, masks applied), log-softmax over
    the tokenizer's vocabulary; our TP=1 scorer; lm-eval on the HF export of the same checkpoint."""
    import torch

    from pretrain.benchmarks import document_scores, load_for_benchmarks, score_documents
    from pretrain.interop.hf import export_hf
    from tools.evaluate import run_lm_eval_on_our_documents

    docs = _documents()
    model = load_for_benchmarks(f"{root}/masked")
    ours = score_documents(model, docs, batch_size=4, progress=False, per_document=True)
    tokenizer, max_length = model.tokenizer, model.max_length
    by_hand = {}
    for name, task_docs in docs.items():
        by_hand[name] = []
        for doc in task_docs:
            logliks = []
            for context, continuation in zip(doc.contexts, doc.continuations):
                if context.endswith(" "):  # lm-eval moves the space into the continuation
                    context, continuation = context[:-1], " " + continuation
                ctx = tokenizer.tokenize(context)
                cont = tokenizer.tokenize(context + continuation)[len(ctx):]
                ids = torch.tensor([(ctx + cont)[-(max_length + 1):]])
                logp = torch.log_softmax(_our_logits(f"{root}/masked", ids[:, :-1])[0, :, :1000].double(), -1)
                n = len(cont)
                logliks.append(float(logp[-n:].gather(1, ids[0, -n:, None]).sum()))
            by_hand[name].append(document_scores(doc, logliks))
    export_hf(f"{root}/masked", f"{root}/hf")
    # the same documents through lm-eval (WinoGrande in its multiple-input form), as --hf-model --tasks does
    lm = run_lm_eval_on_our_documents(f"{root}/hf", list(REAL_TASKS), 0, LIMIT, batch_size=4, per_document=True,
                                      device="cpu")
    return {"ours": {n: m["per_document"] for n, m in ours["tasks"].items()},
            "ours_metrics": {n: (m["acc"], m["acc_norm"]) for n, m in ours["tasks"].items()},
            "by_hand": by_hand, "lm_eval": {n: [d["logliks"] for d in m["per_document"]] for n, m in lm["tasks"].items()},
            "lm_eval_metrics": {n: (m["acc"], m["acc_norm"]) for n, m in lm["tasks"].items()}}


@pytest.fixture(scope="module")
def scored(tiny_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    layouts = run_distributed(layouts_worker, 2, tiny_dataset, root)
    reference = run_distributed(reference_worker, 1, tiny_dataset, root)[0]
    return root, layouts, reference


def test_scores_equal_the_hand_computation(scored):
    _, _, ref = scored
    for name, docs in ref["by_hand"].items():
        for ours, hand in zip(ref["ours"][name], docs):
            assert ours["logliks"] == pytest.approx(hand["logliks"], abs=1e-4), (name, ours, hand)
            assert (ours["pred"], ours["pred_norm"]) == (hand["pred"], hand["pred_norm"]), (name, ours, hand)
        n = len(docs)
        assert ref["ours_metrics"][name] == pytest.approx((sum(d["acc"] for d in docs) / n,
                                                           sum(d["acc_norm"] for d in docs) / n))
    # the fake task's labels are ours: its metrics follow from the hand-computed choices
    fake = ref["by_hand"]["fake"]
    assert ref["ours_metrics"]["fake"] == pytest.approx(
        (sum(d["pred"] == l for d, l in zip(fake, (1, 0, 1))) / 3, sum(d["pred_norm"] == l for d, l in zip(fake, (1, 0, 1))) / 3))


def test_every_layout_and_the_shrunk_model_choose_as_tp1(scored):
    _, layouts, ref = scored
    one = {n: [(d["logliks"], d["pred"], d["pred_norm"]) for d in docs] for n, docs in ref["ours"].items()}
    for case in ("dp2", "tp2", "pp2", "shrunk"):
        for rank in (0, 1):  # every rank gets the gathered result
            got = layouts[rank][case]
            for name, docs in one.items():
                assert [(p, q) for _, p, q in got[name]] == [(p, q) for _, p, q in docs], (case, name)
                for (ll, _, _), (ref_ll, _, _) in zip(got[name], docs):
                    assert ll == pytest.approx(ref_ll, abs=1e-4), (case, name)


def test_lm_eval_on_the_export_chooses_the_same(scored):
    _, _, ref = scored
    assert sorted(ref["lm_eval"]) == sorted(REAL_TASKS)  # WinoGrande included (multiple-input form)
    for name, docs in ref["lm_eval"].items():
        assert len(docs) == len(ref["ours"][name])
        for ours, theirs in zip(ref["ours"][name], docs):
            assert ours["logliks"] == pytest.approx(theirs, abs=1e-3), name
        assert ref["lm_eval_metrics"][name] == pytest.approx(ref["ours_metrics"][name]), name


def test_command_line_runs_the_paper_tasks(scored, tmp_path):
    """The CI smoke, under torchrun with two data-parallel ranks: `--tasks paper --limit 2`, one
    table, JSON with per-document scores, tensorboard."""
    root, _, _ = scored
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        os.path.join(ROOT, "tools", "evaluate.py"), "--load", f"{root}/shrunk",
                        "--tasks", "paper", "--limit", "2", "--output", str(out), "--per-document",
                        "--tensorboard-dir", str(tmp_path / "tb")], capture_output=True, text=True, timeout=300,
                       cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the first 2 documents of each task" in r.stdout and r.stdout.count("average (7)") == 1, r.stdout
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa",
                                      "winogrande"]
    assert all(m["documents"] == 2 and len(m["per_document"]) == 2 for m in results["tasks"].values())
    assert results["average"] == pytest.approx(sum(m["score"] for m in results["tasks"].values()) / 7)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
