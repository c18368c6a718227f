"""tools/campaign_records.py: a comparison's records without its checkpoints (what a resume on
another disk reads), and what a campaign does with a finished run whose checkpoint is gone. The
round trip through a real campaign is in tests/tools/test_compare_real_parent.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pretrain.compare import arms
from pretrain.compare.campaign import FINAL_TEST_FILE, TASKS_FILE, Campaign
from pretrain.compare.recipes import get_recipe
from pretrain.outputs import OutputError
from tools.campaign_records import copy_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path: str, text: str = "{}") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _comparison(out: str) -> None:
    """A comparison's folder as a campaign leaves it: a finished run, a failed one, one still
    training (no result yet), a sweep, checkpoints and logs."""
    _write(os.path.join(out, "plan.json"), json.dumps({"settings": {}}))
    _write(os.path.join(out, "report.md"), "# report")
    _write(os.path.join(out, "run.lock"), "pid 1")
    done = os.path.join(out, "A", "seed0")
    _write(os.path.join(done, "result.json"), json.dumps({"status": "ok", "test_loss": 3.9}))
    _write(os.path.join(done, "command.sh"), "python -m pretrain")
    _write(os.path.join(done, "tb", "metrics.jsonl"), '{"iteration": 1}\n')
    _write(os.path.join(done, "log.txt"), "a log")
    _write(os.path.join(done, "ckpt", "latest_checkpointed_iteration.txt"), "120")
    _write(os.path.join(done, "ckpt", "iter_0000120", "common.json"), "{}")
    _write(os.path.join(out, "M", "seed0", "result.json"), json.dumps({"status": "failed", "reason": "exit 1"}))
    _write(os.path.join(out, "M", "seed0", "command.sh"), "python -m pretrain")
    _write(os.path.join(out, "M-OBS", "seed0", "command.sh"), "python -m pretrain")
    _write(os.path.join(out, "M-OBS", "seed0", "tb", "metrics.jsonl"), '{"iteration": 1}\n')
    _write(os.path.join(out, "sweep", "A", "lr0.0003", "result.json"), json.dumps({"status": "ok"}))


def test_only_finished_runs_records_are_copied_and_dest_is_replaced_whole(tmp_path):
    out, dest = str(tmp_path / "cmp"), str(tmp_path / "kept")
    _comparison(out)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "campaign_records.py"), out, dest],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "(the records of 1 finished runs and 1 sweep runs)" in proc.stdout, proc.stdout
    assert "left out: M/seed0/ (a run that did not finish" in proc.stdout
    assert "left out: M-OBS/seed0/ (a run that did not finish" in proc.stdout
    copied = sorted(os.path.relpath(os.path.join(r, f), dest) for r, _, fs in os.walk(dest) for f in fs)
    assert copied == ["A/seed0/command.sh", "A/seed0/result.json", "A/seed0/tb/metrics.jsonl", "plan.json",
                      "report.md", "sweep/A/lr0.0003/result.json"]
    # a run retrained since (its result deleted, e.g. to run it again): the copy follows, no stale record
    os.remove(os.path.join(out, "A", "seed0", "result.json"))
    copy_records(out, dest)
    assert not os.path.exists(os.path.join(dest, "A"))
    assert not [f for f in os.listdir(str(tmp_path)) if ".partial-" in f or ".old-" in f]


def test_a_dest_that_is_not_an_earlier_copy_is_refused_untouched(tmp_path):
    out = str(tmp_path / "cmp")
    _comparison(out)
    other = str(tmp_path / "notes")
    _write(os.path.join(other, "todo.txt"), "mine")
    live = str(tmp_path / "live")
    _comparison(live)
    linked = str(tmp_path / "linked")  # an earlier copy's look, with a link to nowhere in it
    _write(os.path.join(linked, "plan.json"))
    os.symlink(str(tmp_path / "nowhere"), os.path.join(linked, "result.json"))
    for dest, message in ((os.path.join(out, "kept"), "inside it"), (str(tmp_path), "holds it"),
                          (other, "holds todo.txt"), (linked, "holds result.json"), (live, "live holds (run.lock|A/seed0/)")):
        with pytest.raises(OutputError, match=message):
            copy_records(out, dest)
    assert open(os.path.join(other, "todo.txt")).read() == "mine"
    assert os.path.isfile(os.path.join(live, "A", "seed0", "ckpt", "latest_checkpointed_iteration.txt"))
    with pytest.raises(OutputError, match="holds no comparison"):
        copy_records(other, str(tmp_path / "new"))


def _campaign(tmp_path, recipe_name: str, **ctx_fields) -> tuple[Campaign, arms.Context]:
    ctx = arms.Context(out=str(tmp_path), data=arms.Data(data_path=["d"], tokenizer_model="t", test_data_path=["x"]),
                       **ctx_fields)

    def no_training(command, log):
        raise AssertionError(f"nothing may run: {command}")

    return Campaign(get_recipe(recipe_name), ctx, [0], ["parent", "A"], execute=no_training), ctx


def test_a_run_that_starts_from_a_finished_runs_gone_checkpoint_is_said_not_started(tmp_path):
    """Trained-parent recipes: A starts from parent's checkpoint, which a copy of records lacks."""
    camp, ctx = _campaign(tmp_path, "cpu-tiny")
    _write(os.path.join(ctx.run_dir("parent", 0), "result.json"), json.dumps({"status": "ok"}))
    camp.load_results()
    result = camp.run_if_possible("A", 0)
    assert result["status"] == "missing", result
    assert "parent/seed0/ckpt, which holds no checkpoint" in result["reason"]
    assert "parent/seed0/result.json so that --resume trains it again" in result["reason"]
    assert json.load(open(os.path.join(ctx.run_dir("A", 0), "result.json")))["status"] == "missing"


def test_a_finished_run_without_its_checkpoint_keeps_what_it_recorded_and_says_what_it_cannot_redo(tmp_path, capsys):
    camp, ctx = _campaign(tmp_path, "cpu-tiny-real", tasks=("boolq",), task_limit=4, final_test_samples=8,
                          parent="/nowhere")
    plan = arms.RunPlan(name="A", seed=0, folder=ctx.run_dir("A", 0), flags=[], train_tokens=1, lr=1e-3)
    scores = {"boolq": 0.5, "average": 0.5}
    _write(os.path.join(plan.folder, TASKS_FILE), json.dumps(
        {"settings": {"tasks": ["boolq"], "limit": 4, "num_fewshot": 0, "checkpoint": "/elsewhere/ckpt",
                      "primary": {"boolq": "acc"}}, "scores": scores}))
    measured = {"loss": 3.9, "samples": 8, "tokens": 8 * camp.recipe.seq_length}
    _write(os.path.join(plan.folder, FINAL_TEST_FILE), json.dumps(
        {"settings": {"test_data_path": ["x"], "samples": 8, "seq_length": camp.recipe.seq_length,
                      "checkpoint": "/elsewhere/ckpt"}, **measured}))
    # recorded in their own files but not yet in result.json (copied between the two writes): merged
    result = camp.measure(plan, {"status": "ok", "run": "A"})
    assert result["tasks"] == scores and result["final_test"] == measured
    assert json.load(open(os.path.join(plan.folder, "result.json")))["final_test"] == measured
    assert "is gone" not in capsys.readouterr().out
    # other settings than were recorded: nothing can be redone, said; the stale loss is not kept
    camp.ctx = dataclasses.replace(camp.ctx, final_test_samples=16, tasks=("boolq", "piqa"))
    result = camp.measure(plan, result)
    said = capsys.readouterr().out
    assert "A seed 0: its final checkpoint is gone" in said and "cannot be measured on the first 16" in said
    assert "cannot be scored on boolq, piqa" in said and "recorded under other settings" in said
    assert "final_test" not in result and "final_test" not in json.load(open(os.path.join(plan.folder, "result.json")))
