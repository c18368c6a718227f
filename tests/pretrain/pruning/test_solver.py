"""Budget solver properties on random tables: target met within one aligned unit, constraints
hold, masks never regrow, deterministic."""

import random

import pytest
import torch

from pretrain.pruning.masks import GroupMasks, GroupScores, ModelShape
from pretrain.pruning.schedule import ramp_fraction, target_params
from pretrain.pruning.solver import SolverConstraints, check_constraints, solve

SHAPES = [
    ModelShape(num_layers=4, hidden=128, num_heads=4, num_groups=2, head_dim=32, ffn=384, vocab=1024, tied=True),
    ModelShape(num_layers=3, hidden=96, num_heads=6, num_groups=6, head_dim=16, ffn=256, vocab=512, tied=False),
    ModelShape(num_layers=4, hidden=96, num_heads=4, num_groups=2, head_dim=16, ffn=256, vocab=512, tied=True,
               qkv_bias=True),
]


def _random_scores(shape, gen):
    return GroupScores(torch.rand(shape.num_layers, shape.num_groups, generator=gen, dtype=torch.float64),
                       torch.rand(shape.num_layers, shape.ffn, generator=gen, dtype=torch.float64),
                       torch.rand(shape.hidden, generator=gen, dtype=torch.float64))


def _max_unit_cost(shape, c):
    """The largest unit the solver may take (its costs are the one count's, checked against real
    models in test_parameter_count.py)."""
    full = shape.full_masks()
    head = c.group_unit() * shape.group_cost(shape.hidden)
    ffn = c.ffn_unit() * shape.ffn_channel_cost(shape.hidden)
    hidden = c.hidden_unit() * shape.hidden_channel_cost(full)
    if c.granularity == "uniform":
        head, ffn = head * shape.num_layers, ffn * shape.num_layers
    layer = c.pipeline_parallel * int(shape.layer_costs(full).max())
    return max(head, ffn, hidden, layer if "layers" in c.prune_types else 0)


@pytest.mark.parametrize("granularity", ["per-layer", "uniform"])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_tables(shape, granularity):
    rng = random.Random(0)
    for trial in range(12):
        gen = torch.Generator().manual_seed(trial)
        tp = rng.choice([1, 2])
        types = ("heads", "ffn", "hidden") + (("layers",) if trial % 2 else ())
        c = SolverConstraints(tensor_parallel=tp, align=8, min_groups=rng.choice([tp, min(2 * tp, shape.num_groups)]),
                              min_ffn=rng.choice([0, 64]), min_hidden=rng.choice([0, 32]),
                              granularity=granularity, prune_types=types,
                              pipeline_parallel=rng.choice([1, 1, 3 if shape.num_layers % 3 == 0 else 1]))
        masks = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
        initial = shape.parameter_count(masks)
        for step_ratio in (0.85, 0.7, 0.55):
            target = int(initial * step_ratio)
            new, moves = solve(shape, masks, _random_scores(shape, gen), target, c)
            # never unprunes
            for t in ("heads", "ffn", "hidden", "layers"):
                assert not bool((getattr(new, t) & ~getattr(masks, t)).any())
            assert check_constraints(shape, new, c) == []
            params = shape.parameter_count(new)
            # every move's cost is exactly what it removes from the count
            assert shape.parameter_count(masks) - params == sum(m["params_removed"] for m in moves)
            if params > target:  # only when every type is at its minimum
                assert not moves or solve(shape, new, _random_scores(shape, gen), target, c)[1] == []
            else:
                assert target - params < _max_unit_cost(shape, c), (target, params)
            # deterministic
            again, _ = solve(shape, masks, GroupScores(*(x.clone() for x in (
                _random_scores(shape, torch.Generator().manual_seed(99)).heads,
                _random_scores(shape, torch.Generator().manual_seed(99)).ffn,
                _random_scores(shape, torch.Generator().manual_seed(99)).hidden))), target, c)
            again2, _ = solve(shape, masks, _random_scores(shape, torch.Generator().manual_seed(99)), target, c)
            assert again.equal(again2)
            masks = new


def test_lowest_saliency_per_parameter_goes_first():
    shape = SHAPES[0]
    c = SolverConstraints(tensor_parallel=1, align=8)
    masks = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    scores = GroupScores(torch.full((4, 2), 1e3, dtype=torch.float64), torch.full((4, 384), 1e3, dtype=torch.float64),
                         torch.full((128,), 1e3, dtype=torch.float64))
    scores.ffn[2, 10:18] = 0.0  # eight nearly free FFN channels in layer 2
    new, moves = solve(shape, masks, scores, shape.parameter_count(masks) - 1, c)
    assert moves[0]["type"] == "ffn" and moves[0]["layers"] == [2]
    assert not bool(new.ffn[2, 10:18].any()) and int(new.ffn.sum()) == 4 * 384 - 8


def test_schedule_ramps():
    assert ramp_fraction(0, 10, 110) == 0.0 and ramp_fraction(60, 10, 110) == 0.5
    assert ramp_fraction(200, 10, 110) == 1.0
    assert ramp_fraction(60, 10, 110, "cubic") == pytest.approx(1 - 0.5 ** 3)
    assert target_params(60, 1000, 400, 10, 110) == 700
    with pytest.raises(ValueError):
        ramp_fraction(1, 0, 2, "exp")


def test_whole_layers_go_when_they_matter_least():
    shape = SHAPES[0]
    # a layer's saliency per parameter is an average of its groups', so whole layers go when the
    # per-layer minimums stop the groups themselves from going (here: every group is at its minimum)
    c = SolverConstraints(tensor_parallel=1, align=8, min_groups=2, min_ffn=384,
                          prune_types=("heads", "ffn", "hidden", "layers"))
    masks = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    scores = GroupScores(torch.full((4, 2), 1e3, dtype=torch.float64), torch.full((4, 384), 1e3, dtype=torch.float64),
                         torch.full((128,), 1e3, dtype=torch.float64))
    scores.heads[1] = 0.0
    scores.ffn[1] = 0.0  # layer 1 contributes nothing
    per_layer = int(shape.layer_costs(masks)[1])
    # a target one layer below: a smaller one would make the layer overshoot by more than a hidden unit
    new, moves = solve(shape, masks, scores, shape.parameter_count(masks) - per_layer, c)
    assert moves[0]["type"] == "layers" and moves[0]["layers"] == [1]
    assert not bool(new.layers[1]) and not bool(new.heads[1].any()) and not bool(new.ffn[1].any())
    assert check_constraints(shape, new, c) == []
    # the removed layer's parameters and norms are gone from the count
    assert shape.parameter_count(masks) - shape.parameter_count(new) == per_layer


def test_a_gradual_step_takes_the_least_salient_unit_even_when_it_is_larger_than_the_step():
    """One step of a gradual schedule removes ~2% of the model; a hidden unit (8 channels and their
    embedding rows) costs more than that. With the least saliency per parameter on hidden channels,
    the step takes them (running ahead of its step target, never past the final one); without the
    final target, the overshoot bound makes it take FFN channels instead (the old behaviour, which
    left hidden channels untouched until heads and FFN sat at their floors)."""
    shape = SHAPES[0]
    c = SolverConstraints(tensor_parallel=1, align=8)
    masks = shape.full_masks()
    initial = shape.parameter_count(masks)
    scores = GroupScores(torch.full((shape.num_layers, shape.num_groups), 10.0, dtype=torch.float64),
                         torch.full((shape.num_layers, shape.ffn), 1.0, dtype=torch.float64),
                         torch.full((shape.hidden,), 0.01, dtype=torch.float64))
    step_target = int(initial * 0.98)
    hidden_unit = c.hidden_unit() * shape.hidden_channel_cost(masks)
    assert hidden_unit > initial - step_target  # the unit is bigger than the step
    _, moves = solve(shape, masks, scores, step_target, c)
    assert {m["type"] for m in moves} == {"ffn"}
    new, moves = solve(shape, masks, scores, step_target, c, final_params=initial // 2)
    assert [m["type"] for m in moves] == ["hidden"]
    assert initial // 2 <= shape.parameter_count(new) < step_target
    # the next step of the schedule waits: the model is below its target already
    assert shape.parameter_count(new) <= int(initial * 0.97)
    # never past the final target: with it just below the step, the hidden unit does not fit
    _, moves = solve(shape, masks, scores, step_target, c, final_params=step_target - 10)
    assert {m["type"] for m in moves} == {"ffn"}
