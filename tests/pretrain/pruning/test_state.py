"""PruningState: the pruning part of a checkpoint, its target after a shrink or a resume."""

import torch

from pretrain.config import PruneConfig
from pretrain.pruning.callback import PruningCallback
from pretrain.pruning.masks import ModelShape
from pretrain.pruning.state import PruningState

SHAPE = ModelShape(num_layers=2, hidden=64, num_heads=4, num_groups=2, head_dim=16, ffn=128, vocab=512, tied=True)
# what a shrink of SHAPE to half its FFN and hidden channels leaves
SHRUNK = ModelShape(num_layers=2, hidden=32, num_heads=4, num_groups=2, head_dim=16, ffn=64, vocab=512, tied=True)


def _pruner(shape: ModelShape = SHAPE, **prune) -> PruningCallback:
    return PruningCallback(PruneConfig(**prune), shape, 1, 10**6)


def _half_pruned() -> PruningCallback:
    pruner = _pruner(target_ratio=0.5)
    pruner.masks.ffn[:, 64:] = False
    pruner.masks.hidden[32:] = False
    return pruner


def test_round_trip_keeps_every_field():
    pruner = _half_pruned()
    pruner.state.ema_steps, pruner.state.shrink_points_done = 3, [1000]
    pruner.state.loss_before_event, pruner.state.shrunk_at_params = (10, 2.5), 12345
    again = PruningState.from_dict(pruner.state.to_dict())
    assert again.to_dict().keys() == pruner.state.to_dict().keys()
    assert again.masks.equal(pruner.masks) and again.loss_before_event == (10, 2.5)
    assert (again.initial_params, again.final_params, again.original) == (
        pruner.initial_params, pruner.final_params, pruner.state.original)
    assert (again.ema_steps, again.shrink_points_done, again.shrunk_at_params) == (3, [1000], 12345)


def test_an_older_layout_loads_with_the_current_models_values():
    stored = {"masks": SHAPE.full_masks().state_dict(), "ema": None, "history": [{"iteration": 4}]}
    fresh = PruningState.fresh(SHAPE, None, 0.5)
    state = PruningState.from_dict(stored, fallback=fresh)
    assert (state.initial_params, state.final_params) == (fresh.initial_params, fresh.final_params)
    assert state.history == [{"iteration": 4}] and state.loss_before_event is None


def test_after_a_shrink_the_plan_gives_the_original_ends_and_what_is_left(capsys):
    before = _half_pruned()
    original, target = before.initial_params, before.final_params
    # the shrunk model's callback starts from its own (smaller) shape, then loads the state
    after = _pruner(SHRUNK, target_ratio=0.5)
    after.load_state_dict({**before.state_dict(), "masks": SHRUNK.full_masks().state_dict()})
    assert (after.initial_params, after.final_params) == (original, target)
    assert capsys.readouterr().out == ""  # same target: nothing to say
    line = after.plan_line()
    now = SHRUNK.parameter_count(SHRUNK.full_masks())
    assert line.startswith(f"pruning: {original / 1e6:.3f} M -> {target / 1e6:.3f} M parameters (now "
                           f"{now / 1e6:.3f} M; {max(now - target, 0) / 1e6:.3f} M left to remove)"), line


def test_a_target_changed_on_resume_applies_from_there_with_a_message(capsys):
    saved = _half_pruned().state_dict()
    resumed = _pruner(SHRUNK, target_ratio=0.3)  # a ratio is of the model the schedule started from
    resumed.load_state_dict({**saved, "masks": SHRUNK.full_masks().state_dict()})
    assert resumed.final_params == round(saved["initial_params"] * 0.3)
    out = capsys.readouterr().out
    assert f"pruning target changed on resume: {saved['final_params']:,} -> {resumed.final_params:,}" in out
    # the next checkpoint holds the new target
    assert PruningState.from_dict(resumed.state_dict()).final_params == resumed.final_params
    # --end-pruning keeps the masks and removes nothing more: no target applies
    ended = _pruner(target_ratio=0.3, end_pruning=True)
    ended.load_state_dict(saved)
    assert ended.final_params == saved["final_params"] and capsys.readouterr().out == ""


def test_stored_in_replaces_only_the_pruning_part():
    trainer_state = {"iteration": 7, "callbacks": {"logging": {"x": 1}, "pruning": {"old": True}}}
    state = PruningState.fresh(SHAPE, 100, None)
    written = state.stored_in(trainer_state)
    assert written["callbacks"]["logging"] == {"x": 1} and written["iteration"] == 7
    assert torch.equal(PruningState.stored_masks(written).ffn, state.masks.ffn)
    assert trainer_state["callbacks"]["pruning"] == {"old": True}  # the input is not modified
    assert PruningState.stored_masks({"callbacks": {}}) is None


def test_removes_groups_is_about_the_groups_the_shape_has():
    """Issue 30: one rule for "do these masks remove anything" (HF export, a distillation teacher,
    the pruning callback). A per-layer shape's full masks are False past each narrower layer's
    width; those entries do not exist, so they remove nothing."""
    per_layer = ModelShape(num_layers=2, hidden=64, num_heads=4, num_groups=2, head_dim=16, ffn=128, vocab=512,
                           tied=True, layer_groups=(1, 2), layer_ffn=(128, 64))
    assert not PruningState.removes_groups(SHAPE.full_masks(), SHAPE)
    assert not PruningState.removes_groups(per_layer.full_masks(), per_layer)
    assert PruningState.removes_groups(per_layer.full_masks(), SHAPE)  # the same masks on the full-width model
    for drop in (lambda m: m.heads[1].__setitem__(1, False), lambda m: m.ffn[0].__setitem__(127, False),
                 lambda m: m.hidden.__setitem__(0, False), lambda m: m.drop_layer(1)):
        masks = per_layer.full_masks()
        drop(masks)
        assert PruningState.removes_groups(masks, per_layer)
