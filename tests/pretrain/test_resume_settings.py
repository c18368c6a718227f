"""Resume keeps what it says (issue 31, items 2 and 3): a flag not given on resume keeps the
checkpoint's value and a flag given changes only itself (pruning, distillation, optimizer); a
schedule that differs from the checkpoint's is refused unless --override-opt_param-scheduler or
--use-checkpoint-opt_param-scheduler says which one to follow, and the plan tells the truth."""

import dataclasses

import pytest

from pretrain.run import arguments
from pretrain.config import (ConfigError, DistillConfig, ModelConfig, OptimConfig, PretrainConfig, PruneConfig,
                             TrainConfig, MODEL_PRESETS)
from pretrain.engines.optim import learning_rate_at, schedule_settings
from pretrain.resume import with_checkpoint_distill, with_checkpoint_pruning, with_checkpoint_schedule
from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config

SAVED_PRUNE = PruneConfig(target_ratio=0.5, saliency="fisher", interval=2, end_tokens=4096, shrink_auto=True)
SAVED_KD = DistillConfig(teacher="/parent", weight=0.5, temperature=2.0)
SAVED_OPTIM = OptimConfig(lr=2e-3, min_lr=2e-4, lr_warmup_iters=2, weight_decay=0.0)


def _state(prune=SAVED_PRUNE, distill=SAVED_KD, optim=SAVED_OPTIM, iters=20, pruning_state=True) -> dict:
    cfg = PretrainConfig(model=ModelConfig(**MODEL_PRESETS["debug"]), prune=prune, distill=distill, optim=optim,
                         train=TrainConfig(train_iters=iters))
    state = {"config": cfg.to_dict(), "iteration": iters, "callbacks": {}}
    if pruning_state:
        state["callbacks"]["pruning"] = {"masks": {}}
    state["scheduler"] = {**{k: v for k, v in schedule_settings(optim, iters).items()}, "num_steps": iters}
    return state


def _resumed(monkeypatch, argv, state) -> PretrainConfig:
    monkeypatch.setattr(arguments, "peek_checkpoint", lambda load: ("ckpt/iter_0000020", state))
    args = arguments.build_parser().parse_args(["--mock-data", "--train-iters", "20", "--load", "ckpt", *argv])
    return arguments.config_from_args(args)


def test_a_flag_given_on_resume_changes_only_itself(monkeypatch):
    cfg = _resumed(monkeypatch, ["--prune-target-ratio", "0.6"], _state())
    assert cfg.prune == dataclasses.replace(SAVED_PRUNE, target_ratio=0.6)  # fisher, interval 2, window kept
    cfg = _resumed(monkeypatch, ["--prune-target-params", "1e5"], _state())
    assert (cfg.prune.target_params, cfg.prune.target_ratio, cfg.prune.saliency) == (100000, None, "fisher")
    cfg = _resumed(monkeypatch, ["--kd-teacher", "/parent"], _state())
    assert cfg.distill == SAVED_KD  # --kd-weight 0.5 and --kd-temperature 2 kept
    cfg = _resumed(monkeypatch, ["--kd-weight", "0.25"], _state())
    assert cfg.distill == dataclasses.replace(SAVED_KD, weight=0.25)
    cfg = _resumed(monkeypatch, [], _state())
    assert cfg.optim == SAVED_OPTIM and cfg.prune == SAVED_PRUNE  # no flag: everything the checkpoint's
    cfg = _resumed(monkeypatch, ["--clip-grad", "0.5"], _state())
    assert cfg.optim == dataclasses.replace(SAVED_OPTIM, clip_grad=0.5)
    # --end-pruning acts on this resume only, and keeps the masks unshrunk unless a shrink is asked for
    cfg = _resumed(monkeypatch, ["--end-pruning"], _state())
    assert cfg.prune.end_pruning and not cfg.prune.shrink_auto and cfg.prune.saliency == "fisher"
    # --finetune starts a new training: the optimizer settings are this command's
    assert _resumed(monkeypatch, ["--finetune"], _state()).optim == OptimConfig()


def test_eval_tasks_are_kept_on_resume(monkeypatch):
    """--eval-tasks (issue 27 item 4): a resumed run goes on scoring the same tasks and documents;
    a flag given changes only itself, and --eval-tasks none stops the scoring."""
    state = _state()
    saved = PretrainConfig.from_dict(state["config"])
    state["config"] = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, eval_tasks="paper", eval_tasks_limit=20, eval_tasks_num_fewshot=5)).to_dict()
    cfg = _resumed(monkeypatch, [], state)
    assert (cfg.train.eval_tasks, cfg.train.eval_tasks_limit, cfg.train.eval_tasks_num_fewshot) == ("paper", 20, 5)
    cfg = _resumed(monkeypatch, ["--eval-tasks-limit", "50"], state)
    assert (cfg.train.eval_tasks, cfg.train.eval_tasks_limit, cfg.train.eval_tasks_num_fewshot) == ("paper", 50, 5)
    cfg = _resumed(monkeypatch, ["--eval-tasks", "none"], state)
    assert cfg.train.eval_tasks == "none" and not cfg.train.scores_tasks
    state["config"]["train"]["eval_tasks_interval"] = 0  # scored at the end only: so on resume
    assert _resumed(monkeypatch, [], state).train.eval_tasks_interval == 0
    assert _resumed(monkeypatch, ["--eval-tasks-interval", "40"], state).train.eval_tasks_interval == 40
    # a kept interval is checked only while tasks are scored: stopping them with another
    # --eval-interval is no conflict
    state["config"]["train"]["eval_tasks_interval"] = 200
    cfg = _resumed(monkeypatch, ["--eval-tasks", "none", "--eval-interval", "300"], state)
    cfg.train.validate(1, cfg.model.seq_length)
    assert _resumed(monkeypatch, [], _state()).train.eval_tasks is None  # a checkpoint without them: none


def test_the_log_names_every_change(monkeypatch):
    cfg = _resumed(monkeypatch, ["--prune-target-ratio", "0.6", "--prune-interval", "4"], _state())
    _, note = with_checkpoint_pruning(cfg, ("ckpt/iter_0000020", _state()))
    assert "changed by this command: --prune-target-ratio 0.5 -> 0.6; --prune-interval 2 -> 4" in note
    _, note = with_checkpoint_pruning(_resumed(monkeypatch, [], _state()), ("ckpt/iter_0000020", _state()))
    assert "with its own pruning settings;" in note
    cfg = _resumed(monkeypatch, ["--kd-weight", "0.25"], _state())
    _, note = with_checkpoint_distill(cfg, ("ckpt/iter_0000020", _state()))
    assert note.endswith("changed by this command: --kd-weight 0.5 -> 0.25")


def test_a_changed_schedule_is_refused_unless_the_user_says_which_to_follow(monkeypatch):
    peeked = ("ckpt/iter_0000020", _state())
    # the checkpoint's own schedule (nothing given): nothing to say
    assert with_checkpoint_schedule(_resumed(monkeypatch, [], peeked[1]), peeked)[1] == ""
    longer = ["--train-iters", "40"]
    with pytest.raises(ConfigError) as err:
        with_checkpoint_schedule(_resumed(monkeypatch, longer, peeked[1]), peeked)
    text = str(err.value)
    assert "decay over 40 iterations (--train-iters), the checkpoint's over 20" in text
    assert "--use-checkpoint-opt_param-scheduler" in text and "--override-opt_param-scheduler" in text
    with pytest.raises(ConfigError, match="--lr 0.001, the checkpoint's 0.002"):
        with_checkpoint_schedule(_resumed(monkeypatch, ["--lr", "1e-3"], peeked[1]), peeked)
    # keep the checkpoint's: the config (and so the plan line) says what will happen
    kept, note = with_checkpoint_schedule(
        _resumed(monkeypatch, longer + ["--use-checkpoint-opt_param-scheduler"], peeked[1]), peeked)
    assert kept.optim.lr_decay_iters == 20 and "not applied: decay over 40" in note
    assert schedule_settings(kept.optim, kept.total_iters())["lr_decay_steps"] == 20
    # follow this command's from iteration 20: cosine over 40, the LR goes back up
    cfg, note = with_checkpoint_schedule(
        _resumed(monkeypatch, longer + ["--override-opt_param-scheduler"], peeked[1]), peeked)
    assert cfg.optim.lr_decay_iters is None and "from iteration 20 the LR follows this command's" in note
    assert learning_rate_at(schedule_settings(cfg.optim, 40), 20) > 5e-4 > learning_rate_at(peeked[1]["scheduler"], 20)


def schedule_worker(data, root):
    from pretrain.run.segments import run

    def config(iters, **checkpoint):
        cfg = debug_config(data, iters=iters, save=f"{root}/run", load=f"{root}/run")
        cfg.optim = dataclasses.replace(cfg.optim, lr_warmup_iters=0)
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, **checkpoint)
        return cfg

    run(config(4))
    kept = run(config(6, use_checkpoint_opt_param_scheduler=True, save=f"{root}/kept"))
    followed = run(config(6, override_opt_param_scheduler=True, save=f"{root}/followed"))
    refused = ""
    try:
        run(config(6, save=f"{root}/refused"))
    except ConfigError as err:
        refused = str(err)
    return {"kept": [h["lr"] for h in kept["history"]], "followed": [h["lr"] for h in followed["history"]],
            "refused": refused}


def test_a_resumed_run_trains_on_the_schedule_it_announced(tiny_dataset, tmp_path):
    res = run_distributed(schedule_worker, 1, tiny_dataset, str(tmp_path))[0]
    min_lr, lr = 2e-4, 2e-3  # debug_config's
    assert res["kept"] == pytest.approx([min_lr, min_lr])  # the 4-step cosine had ended
    # the log's LR of iteration i is the schedule's after i steps
    expected = [learning_rate_at(schedule_settings(OptimConfig(lr=lr, min_lr=min_lr), 6), s) for s in (5, 6)]
    assert res["followed"] == pytest.approx(expected) and expected[0] > 1.5 * min_lr
    assert "decay over 6 iterations (--train-iters), the checkpoint's over 4" in res["refused"]
