"""What a resume does with a checkpoint's pruning state, and the non-finite step policy (issue 12)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, losses_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WINDOW = dict(target_ratio=0.5, start_tokens=0, end_tokens=8 * 64 * 8, interval=2)


def _config(data, prune: dict | None = None, **kw):
    cfg = debug_config(data, iters=10, **kw)
    if prune is not None:
        cfg.prune = dataclasses.replace(cfg.prune, **prune)
    return cfg


def _plain(masks: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in masks.items()}


def _masks(summary):
    pruner = next((c for c in summary["trainer"].callbacks if c.name == "pruning"), None)
    return None if pruner is None else _plain(pruner.masks.state_dict())


def _saved_pruning(folder):
    from pretrain.checkpoint import find_checkpoint, read_trainer_state

    return read_trainer_state(find_checkpoint(folder))["callbacks"].get("pruning")


def resume_worker(data, root):
    from pretrain.run.segments import run

    straight = run(_config(data, WINDOW, save=f"{root}/straight"))
    first = run(_config(data, WINDOW, save=f"{root}/run", exit_interval=5))
    half = f"{root}/run/iter_0000005"
    # no --prune-* flags: the checkpoint's own pruning settings continue, exactly
    resumed = run(_config(data, None, save=f"{root}/run", load=f"{root}/run"))
    ended = run(_config(data, {"end_pruning": True}, save=f"{root}/ended", load=half))
    dropped = run(_config(data, {"drop_state": True}, save=f"{root}/dropped", load=half))
    return {"straight": losses_of(straight), "resumed": losses_of(resumed),
            "straight_masks": _masks(straight), "resumed_masks": _masks(resumed),
            "half_masks": _masks(first), "ended_masks": _masks(ended),
            "ended_saved": _plain(_saved_pruning(f"{root}/ended")["masks"]),
            "dropped_pruner": _masks(dropped), "dropped_saved": _saved_pruning(f"{root}/dropped")}


def test_pruning_state_is_kept_unless_the_user_ends_it(tiny_dataset, tmp_path):
    res = run_distributed(resume_worker, 1, tiny_dataset, str(tmp_path))[0]
    # pruning went on from iteration 5 to 10 in the straight run
    assert res["straight_masks"] != res["half_masks"]
    assert res["resumed"] == res["straight"][5:]
    assert res["resumed_masks"] == res["straight_masks"]
    # --end-pruning: the masks stay as loaded, and are saved again
    assert res["ended_masks"] == res["half_masks"] == res["ended_saved"]
    # --drop-pruning-state: no pruning from here, and the new checkpoint says so
    assert res["dropped_pruner"] is None and res["dropped_saved"] is None


def nonfinite_worker(data, root):
    from pretrain.trainer import NonFiniteError
    from pretrain.run.segments import run

    cfg = _config(data, save=f"{root}/nan", save_interval=1)
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e8, clip_grad=0.0, lr_warmup_iters=0)
    cfg.train = dataclasses.replace(cfg.train, max_skipped_nonfinite_steps=2)
    try:
        run(cfg)
    except NonFiniteError as err:
        return str(err)
    return None


def test_nonfinite_steps_are_skipped_then_stop(tiny_dataset, tmp_path):
    message = run_distributed(nonfinite_worker, 1, tiny_dataset, str(tmp_path))[0]
    assert message is not None and "--max-skipped-nonfinite-steps 2" in message, message
    from pretrain.checkpoint import find_checkpoint, read_trainer_state

    # the last checkpoint is from before the failing step: skipped steps changed no weights, and
    # the step that broke the limit saved nothing
    state = read_trainer_state(find_checkpoint(str(tmp_path / "nan")))
    assert state["skipped_nonfinite_steps"] == 2


def test_pruning_that_would_do_nothing_is_warned_about(tiny_dataset):
    from pretrain.run.plan import pruning_warnings as _pruning_warnings

    cfg = _config(tiny_dataset, {**WINDOW, "start_tokens": 10**9, "end_tokens": 2 * 10**9})
    counts = {"total": 919_000}
    assert any("prunes nothing" in w for w in _pruning_warnings(cfg, counts, 10, None))
    cfg = _config(tiny_dataset, {"target_params": 2_000_000, "start_tokens": 0, "end_tokens": 4096})
    assert any("not below the model's" in w for w in _pruning_warnings(cfg, counts, 10, None))
    assert _pruning_warnings(_config(tiny_dataset, WINDOW), counts, 10, None) == []
