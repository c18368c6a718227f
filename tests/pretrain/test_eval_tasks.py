"""--eval-tasks (issue 27 item 4): the benchmarks scored on the training model itself at every
--eval-interval. A pruned run with DP=2 scores them, logs them (evals.jsonl, tensorboard), and
trains bit-identically to the same run without them; its numbers are those of its checkpoint
scored by tools/evaluate.py's path. Config-time refusals: tests/bad_inputs/cases_train.py."""

import dataclasses
import json
import types

import pytest

from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, full_params, losses_of

TASKS, LIMIT = "arc_easy,boolq,hellaswag", 3


def _config(data, root: str, name: str, tasks: str | None):
    cfg = debug_config(data, iters=4, save=f"{root}/{name}", save_interval=4, tensorboard_dir=f"{root}/{name}_tb")
    cfg.train = dataclasses.replace(cfg.train, eval_interval=2, eval_iters=1, eval_tasks=tasks, eval_tasks_limit=LIMIT)
    # masked in the run: the scores are those of the pruned model
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.6, interval=1, start_tokens=0, end_tokens=3 * 512,
                                    granularity="per-layer", taylor_form="vector")
    return cfg


def train_worker(data, root):
    import torch

    from pretrain.benchmarks import load_for_benchmarks, load_tasks, parse_tasks, score_documents
    from pretrain.run.segments import run

    plain = run(_config(data, root, "plain", None))
    scored = run(_config(data, root, "scored", TASKS))
    a, b = full_params(plain), full_params(scored)
    same = a.keys() == b.keys() and all(
        torch.equal(x[1], y[1]) for k in a for x, y in zip(a[k], b[k]))
    chunks = scored["trainer"].model_chunks
    training = all(m.training for c in chunks for m in c.modules())
    model = load_for_benchmarks(f"{root}/scored")  # the final checkpoint, as tools/evaluate.py scores it
    ref = score_documents(model, load_tasks(parse_tasks(TASKS), 0, LIMIT), batch_size=4, progress=False)
    return {"plain": losses_of(plain), "scored": losses_of(scored), "same_params": same, "training": training,
            "reference": {n: (m["acc"], m["acc_norm"]) for n, m in ref["tasks"].items()}}


@pytest.mark.distributed
def test_eval_tasks_score_the_training_model_and_change_nothing(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = str(tmp_path)
    results = run_distributed(train_worker, 2, tiny_dataset, root)
    for r in results:
        assert r["scored"] == r["plain"] and r["same_params"], r  # bit-identical training
        assert r["training"]  # the model is back in training mode
    evals = [json.loads(line) for line in open(f"{root}/scored_tb/evals.jsonl")]
    assert [e["iteration"] for e in evals if "benchmarks" in e] == [2, 4]
    assert not any("benchmarks" in json.loads(line) for line in open(f"{root}/plain_tb/evals.jsonl"))
    last = evals[-1]["benchmarks"]
    assert last["limit"] == LIMIT and last["num_fewshot"] == 0
    assert set(last["tasks"]) == set(TASKS.split(","))
    for name, (acc, acc_norm) in results[0]["reference"].items():
        m = last["tasks"][name]
        assert (m["acc"], m["acc_norm"], m["documents"]) == (acc, acc_norm, LIMIT), name
        assert m["score"] == m[m["primary"]]
    assert "valid_loss" in evals[-1]  # the same line as the held-out loss
    assert last["seconds"] > 0 and last["cpu_seconds"] > 0  # the scoring's own time ...
    # ... also on the record of the step whose time includes it (iteration 3, after the scoring at 2;
    # the end's scoring follows the last record), so training time is told apart from it
    steps = [json.loads(line) for line in open(f"{root}/scored_tb/metrics.jsonl")]
    assert [s["iteration"] for s in steps if "tasks_seconds" in s] == [3]
    third = next(s for s in steps if s["iteration"] == 3)
    assert evals[0]["benchmarks"]["seconds"] == third["tasks_seconds"] <= third["elapsed_seconds"]
    assert not any("tasks_seconds" in json.loads(line) for line in open(f"{root}/plain_tb/metrics.jsonl"))
    events = EventAccumulator(f"{root}/scored_tb")
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in TASKS.split(","):
        for metric in ("acc", "acc_norm", "score"):
            steps = [e.step for e in events.Scalars(f"benchmarks/{name}/{metric}")]
            assert steps == [2, 4], (name, metric, tags)


class _CountingTasks:
    """Stands for TaskEvaluation: records the iterations it is scored at."""

    def __init__(self):
        self.scored_at = []

    def evaluate(self, trainer):
        self.scored_at.append(trainer.state.iteration)
        return {"tasks": {}, "num_fewshot": 0, "seconds": 0.0}


class _Trainer:
    def __init__(self, total_iters: int, test_set: bool):
        self.state = types.SimpleNamespace(iteration=0, tokens_seen=0)
        self.total_iters, self.has_test_set = total_iters, test_set
        self.validated_at = []

    def evaluate(self, iters):
        self.validated_at.append(self.state.iteration)
        return 1.0

    def evaluate_test(self, iters):
        return 1.0


@pytest.mark.parametrize("total, eval_interval, tasks_interval, test_set, validated, scored", [
    (8, 2, None, False, [2, 4, 6, 8], [2, 4, 6, 8]),  # default: at every evaluation
    (8, 2, 4, False, [2, 4, 6, 8], [4, 8]),
    (7, 2, 4, False, [2, 4, 6, 7], [4, 7]),  # and at the end, whatever its iteration
    (8, 2, 0, False, [2, 4, 6, 8], [8]),  # 0: at the end only
    (8, 0, 0, True, [], [8]),  # no validation interval: the test set's evaluation at the end
])
def test_eval_tasks_interval_chooses_which_evaluations_score_the_tasks(total, eval_interval, tasks_interval, test_set,
                                                                       validated, scored):
    """--eval-tasks-interval: the held-out loss is evaluated as before, the tasks (minutes each on a
    CPU) only at the evaluations of every N iterations and at the end."""
    from pretrain.callbacks import EvalCallback

    tasks, trainer = _CountingTasks(), _Trainer(total, test_set)
    callback = EvalCallback(eval_interval, 1, None, tasks, tasks_interval)
    for it in range(1, total + 1):
        trainer.state.iteration = it
        callback.on_step_end(trainer, None)
    assert trainer.validated_at == validated and tasks.scored_at == scored
