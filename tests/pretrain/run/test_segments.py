"""Training in segments (``pretrain.run.segments``): a stop asked for on the step the model was to
shrink is obeyed, and the resume does the shrink it skipped."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from pretrain.trainer import Callback
from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, losses_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TOKENS_PER_STEP = 8 * 64
SHRINK_STEP = 6


class SignalOnRankZeroAt(Callback):
    """Sends SIGTERM to rank 0's own process at the end of one step, before the checkpoint
    callback looks (as a preemption notice arriving during that step would)."""

    name = "signal_at"

    def __init__(self, iteration: int, late: bool = False):
        self.iteration, self.late = iteration, late

    def _send(self, trainer) -> None:
        import torch

        if trainer.state.iteration == self.iteration and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, trainer, metrics) -> None:
        if not self.late:
            self._send(trainer)

    def on_train_end(self, trainer) -> None:
        # late: after the step's own check, while the segment closes (before its handlers go)
        if self.late:
            self._send(trainer)


def _cfg(data, save: str, load: str | None = None):
    cfg = debug_config(data, tp=2, iters=10, save=save, save_interval=100)
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.55, interval=2, start_tokens=0,
                                    end_tokens=SHRINK_STEP * TOKENS_PER_STEP, taylor_form="vector",
                                    shrink_auto=True)
    if load:
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, load=load)
    return cfg


def signal_at_shrink_worker(data, root):
    import torch

    from pretrain.run.segments import run

    straight = run(_cfg(data, f"{root}/straight"))
    stopped = run(_cfg(data, f"{root}/s"), extra_callbacks=[SignalOnRankZeroAt(SHRINK_STEP)])
    stored = torch.load(f"{root}/s/iter_{SHRINK_STEP:07d}/trainer_state.pt", weights_only=False)
    shrunk_before_resume = os.path.isdir(f"{root}/s/shrunk_iter_{SHRINK_STEP:07d}")
    # resumed into another folder: the shrink's source is saved there first
    elsewhere = run(_cfg(data, f"{root}/other", load=f"{root}/s"))
    resumed = run(_cfg(data, f"{root}/s", load=f"{root}/s"))
    late = run(_cfg(data, f"{root}/late"), extra_callbacks=[SignalOnRankZeroAt(SHRINK_STEP, late=True)])
    return {"late_stopped_at": late["iteration"], "late_stop_reason": late["stop_reason"],
            "late_saved": os.path.isdir(f"{root}/late/iter_{SHRINK_STEP:07d}"),
            "late_shrunk": os.path.isdir(f"{root}/late/shrunk_iter_{SHRINK_STEP:07d}"),
            "elsewhere": losses_of(elsewhere),
            "elsewhere_shrunk": os.path.isdir(f"{root}/other/shrunk_iter_{SHRINK_STEP:07d}"),"straight": losses_of(straight), "straight_hidden": straight["trainer"].config.model.hidden_size,
            "stopped_at": stopped["iteration"], "stop_reasons": stopped.get("stop_reasons"),
            "stopped_segments": len(stopped.get("segments") or [stopped]),
            "stored_iteration": stored["iteration"], "shrunk_before_resume": shrunk_before_resume,
            "resumed": losses_of(resumed), "resumed_iters": [h["iteration"] for h in resumed["history"]],
            "resumed_hidden": resumed["trainer"].config.model.hidden_size,
            "shrunk_after_resume": os.path.isdir(f"{root}/s/shrunk_iter_{SHRINK_STEP:07d}")}


def test_a_stop_signal_on_the_shrink_step_stops_the_run_and_the_resume_shrinks_first(tiny_dataset, tmp_path):
    """A SIGTERM (Slurm's preemption notice, a campaign being stopped) that arrived on the step
    the in-run shrink was due was dropped: "shrink" had asked to stop first, so the run shrank and
    went on training the next segment, and the job was left to be killed. Now it saves and stops
    there, on every rank (the signal reached rank 0 only), and --load of that checkpoint shrinks
    first and continues the same curve, also into another --save folder. A signal that arrives
    after that step's own check, as the segment closes, is obeyed too."""
    res = run_distributed(signal_at_shrink_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["stopped_at"] == SHRINK_STEP and res["stopped_segments"] == 1, res
    assert res["stop_reasons"] == ["shrink", "signal"], res
    assert res["stored_iteration"] == SHRINK_STEP and not res["shrunk_before_resume"]
    assert res["resumed_iters"] == list(range(SHRINK_STEP + 1, 11)) and res["shrunk_after_resume"]
    assert res["resumed_hidden"] == res["straight_hidden"] < 128
    for a, b in zip(res["resumed"], res["straight"][SHRINK_STEP:]):
        assert abs(a - b) < 2e-4 * abs(b), (res["resumed"], res["straight"])
    assert res["elsewhere"] == res["resumed"] and res["elsewhere_shrunk"]
    # a signal that arrived after the shrink step's own check is still obeyed before the shrink
    assert res["late_stopped_at"] == SHRINK_STEP and res["late_stop_reason"] == "signal", res
    assert res["late_saved"] and not res["late_shrunk"]
