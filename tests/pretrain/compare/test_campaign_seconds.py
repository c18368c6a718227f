"""A run's own account of its time (``campaign.train_seconds``) leaves out the task curve's
scoring, which the run records apart (``campaign.task_curve_seconds``), and a curve's points
keep each task's score (``campaign.curve_tasks``)."""

import pytest

from pretrain.compare.campaign import curve_tasks, task_curve_seconds, train_seconds


def test_training_seconds_leave_out_the_scoring_that_a_step_record_names():
    metrics = [{"iteration": 1, "elapsed_seconds": 2.0, "process_cpu_seconds": 3.0},
               {"iteration": 2, "elapsed_seconds": 2.5, "process_cpu_seconds": 3.5},
               # after the scoring at iteration 2: its time is in this record, and named
               {"iteration": 3, "elapsed_seconds": 12.0, "process_cpu_seconds": 21.0,
                "tasks_seconds": 10.0, "tasks_cpu_seconds": 18.0}]
    assert train_seconds(metrics) == {"train_wall_seconds": pytest.approx(6.5),
                                      "train_cpu_seconds": pytest.approx(9.5)}
    assert train_seconds([{k: v for k, v in m.items() if not k.startswith("tasks")} for m in metrics]) == {
        "train_wall_seconds": pytest.approx(16.5), "train_cpu_seconds": pytest.approx(27.5)}
    assert train_seconds([{"iteration": 1, "elapsed_seconds": 2.0}]) == {}  # records before CPU time was kept


def test_the_curve_keeps_each_tasks_score_and_the_scoring_time_of_every_point():
    def benchmarks(seconds, average=None):
        record = {"tasks": {"boolq": {"score": 0.5, "acc": 0.5}, "piqa": {"score": 0.75, "acc": 0.7}}, "limit": 4,
                  "seconds": seconds, "cpu_seconds": 2 * seconds}
        return {**record, "paper_average": average} if average is not None else record

    assert curve_tasks(benchmarks(1.0)) == {"boolq": 0.5, "piqa": 0.75}
    assert curve_tasks(benchmarks(1.0, 0.4)) == {"boolq": 0.5, "piqa": 0.75, "average": 0.4}
    evals = [{"iteration": 2, "valid_loss": 3.0}, {"iteration": 4, "benchmarks": benchmarks(1.5)},
             {"iteration": 8, "benchmarks": benchmarks(2.0)}]
    assert task_curve_seconds(evals) == {"task_curve_wall_seconds": 3.5, "task_curve_cpu_seconds": 7.0}
    assert task_curve_seconds(evals[:1]) == {}
    # a record of a run before the scoring's time was kept: no seconds to sum, none invented
    assert task_curve_seconds([{"iteration": 4, "benchmarks": {"tasks": {}, "limit": 4}}]) == {}
