"""Our benchmark scorer against lm-evaluation-harness itself, on the same documents of a real model.

    python bench/lm_eval_agreement.py --load ckpt_smollm2 --tasks paper --limit 200 --out agreement/

Exports ``--load`` as a HuggingFace folder (``tools/convert_to_hf.py``, fp32), scores the first
``--limit`` documents of each task with ``tools/evaluate.py --load`` (our scorer, on the
checkpoint) and with ``tools/evaluate.py --hf-model`` (lm-eval's ``hf`` model on the export, over
local task files holding the same documents), and prints per task: the two primary scores and
their difference in points, how many documents get the same choice (``acc``'s and ``acc_norm``'s),
and the largest log-likelihood difference. Each step's output stays in ``--out``: a rerun reuses
what is there (delete a file to redo that step). Tolerance (issue 27): at most 0.5 points per task;
the same choice on every document where the tokenization is the same. The exit status is 1 when a
task is outside the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE_POINTS = 0.5


def _step(name: str, output: str, cmd: list[str]) -> float:
    """Run one step unless its output exists; its wall seconds (0 when reused)."""
    if os.path.exists(output):
        print(f"{name}: reusing {output}")
        return 0.0
    print(f"{name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - start


def compare(ours: dict, theirs: dict) -> dict:
    """Per task: scores, difference, agreeing choices, largest log-likelihood difference."""
    rows = {}
    for name, mine in ours["tasks"].items():
        other = theirs["tasks"][name]
        docs_a, docs_b = mine["per_document"], other["per_document"]
        assert [d["doc_id"] for d in docs_a] == [d["doc_id"] for d in docs_b], name
        rows[name] = {
            "primary": mine["primary"], "documents": len(docs_a),
            "ours": 100 * mine["score"], "lm_eval": 100 * other["score"],
            "difference_points": 100 * (mine["score"] - other["score"]),
            "same_choice_acc": sum(a["pred"] == b["pred"] for a, b in zip(docs_a, docs_b)),
            "same_choice_acc_norm": sum(a["pred_norm"] == b["pred_norm"] for a, b in zip(docs_a, docs_b)),
            "max_loglik_difference": max(abs(x - y) for a, b in zip(docs_a, docs_b)
                                         for x, y in zip(a["logliks"], b["logliks"]))}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="the checkpoint (any layout; imported, pruned, shrunk)")
    p.add_argument("--tasks", default="paper")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--num-fewshot", type=int, default=0, choices=(0, 5))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="folder for the export and both results (reused on a rerun)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    common = ["--tasks", args.tasks, "--limit", str(args.limit), "--num-fewshot", str(args.num_fewshot),
              "--batch-size", str(args.batch_size), "--per-document"]
    hf, ours_json, lm_json = (os.path.join(args.out, n) for n in ("hf", "ours.json", "lm_eval.json"))
    seconds = {"export": _step("export", hf, [py, "tools/convert_to_hf.py", "--load", args.load, "--save", hf]),
               "ours": _step("ours", ours_json, [py, "tools/evaluate.py", "--load", args.load, *common,
                                                 "--output", ours_json]),
               "lm_eval": _step("lm-eval", lm_json, [py, "tools/evaluate.py", "--hf-model", hf, *common,
                                                     "--output", lm_json])}
    with open(ours_json) as f:
        ours = json.load(f)
    with open(lm_json) as f:
        theirs = json.load(f)
    rows = compare(ours, theirs)
    print(f"\n{args.load}: the first {args.limit} documents per task, {args.num_fewshot}-shot; "
          f"ours vs {theirs.get('harness', 'lm-eval')} on the fp32 HF export")
    print("| task (primary) | docs | ours | lm-eval | diff (points) | same choice acc / acc_norm | max |Δ loglik| |")
    print("|---|---|---|---|---|---|---|")
    failed = []
    for name, r in rows.items():
        print(f"| {name} ({r['primary']}) | {r['documents']} | {r['ours']:.1f} | {r['lm_eval']:.1f} | "
              f"{r['difference_points']:+.1f} | {r['same_choice_acc']} / {r['same_choice_acc_norm']} | "
              f"{r['max_loglik_difference']:.2g} |")
        if abs(r["difference_points"]) > TOLERANCE_POINTS:
            failed.append(name)
    if "average" in ours and "average" in theirs:
        print(f"| average (7) | | {100 * ours['average']:.2f} | {100 * theirs['average']:.2f} | "
              f"{100 * (ours['average'] - theirs['average']):+.2f} | | |")
    speed = {k: v for k, v in seconds.items() if v}
    if speed:
        print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()))
    with open(os.path.join(args.out, "agreement.json"), "w") as f:
        json.dump({"load": args.load, "limit": args.limit, "num_fewshot": args.num_fewshot, "tasks": rows,
                   "tolerance_points": TOLERANCE_POINTS, "outside_tolerance": failed, "seconds": seconds}, f, indent=2)
    if failed:
        print(f"outside the tolerance of {TOLERANCE_POINTS} points: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
