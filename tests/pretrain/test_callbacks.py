"""The logging callback's own account of a run's time (``metrics.jsonl``), which the comparison
sums into what each run cost (``pretrain.compare.campaign.train_seconds``)."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

from pretrain.callbacks import LoggingCallback
from pretrain.compare.campaign import train_seconds
from pretrain.report import read_jsonl
from pretrain.trainer import StepMetrics, TrainerState


def _busy(seconds: float) -> None:
    # this thread's CPU time: the process's (what the records count) also has the writer's thread
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _attempt(log_dir: str, iterations: range, work: float, between: float) -> None:
    """One process's steps: ``work`` CPU seconds in each step, ``between`` after its record (what
    an evaluation or a save costs), and a sleep that costs wall time alone."""
    trainer = SimpleNamespace(state=TrainerState(), total_iters=10)
    logger = LoggingCallback(log_interval=100, tensorboard_dir=log_dir)
    logger.on_train_begin(trainer)
    for it in iterations:
        start = time.time()
        _busy(work)
        time.sleep(0.05)
        trainer.state.iteration, trainer.state.tokens_seen = it, it * 512
        logger.on_step_end(trainer, StepMetrics(loss=3.0, grad_norm=1.0, lr=1e-3, skipped=False,
                                                seconds=time.time() - start, tokens=512))
        _busy(between)
    logger.writer.close()


def test_each_record_has_the_seconds_since_the_last_and_a_resumed_step_counts_once(tmp_path):
    log_dir = str(tmp_path / "tb")
    _attempt(log_dir, range(1, 5), work=0.05, between=0.1)  # stopped after step 4; 3 and 4 were lost
    _attempt(log_dir, range(3, 6), work=0.05, between=0.0)  # resumed from the checkpoint of step 2
    lines = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 3, 4, 5]
    # (bounds with room: two clocks, and a loaded machine; what is checked is where time is counted)
    for r in lines:
        assert r["elapsed_seconds"] >= r["step_seconds"] >= 0.09 and r["process_cpu_seconds"] >= 0.045, r
        assert r["elapsed_seconds"] >= r["process_cpu_seconds"] - 0.02, r  # one thread busy at a time
    # the step after one with an evaluation or a save carries its cost; the first of a process does not
    assert lines[1]["process_cpu_seconds"] >= 0.14 and lines[4]["process_cpu_seconds"] < 0.1
    kept = read_jsonl(os.path.join(log_dir, "metrics.jsonl"))
    total = train_seconds(kept)
    assert [r["iteration"] for r in kept] == [1, 2, 3, 4, 5]
    assert total["train_cpu_seconds"] == sum(r["process_cpu_seconds"] for r in lines[:2] + lines[4:])
    assert total["train_wall_seconds"] >= 5 * 0.1
    assert train_seconds([{k: v for k, v in r.items() if k != "process_cpu_seconds"} for r in kept]) == {}
