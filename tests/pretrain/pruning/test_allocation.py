"""Issue 21: saliency that holds on real pretrained models.

* a hidden channel whose embedding signal sits on a few rows (the tokens one batch holds) is not
  ranked as cheap;
* one event never removes more than the cap, and overshoots the target by at most the cheapest
  unit that can still move; small units taken before a large one that lands far below the target
  are given back;
* ``proportional`` allocation prunes every type by the same fraction, and on a pretrained tiny
  model whose embeddings are most of its parameters the global ranking is no worse.
"""

import pytest
import torch

from pretrain.pruning.masks import GroupMasks, GroupScores, ModelShape
from pretrain.pruning.saliency import reduce_table
from pretrain.pruning.solver import SolverConstraints, check_constraints, solve

# a large-vocabulary model in miniature: the embedding holds most of a hidden channel's parameters
BIG_VOCAB = ModelShape(num_layers=2, hidden=64, num_heads=4, num_groups=2, head_dim=16, ffn=128, vocab=4096,
                       tied=True)


def _uniform_partial_table(shape: ModelShape, per_param: float, seen_rows: int) -> GroupScores:
    """A partial table whose every group scores ``per_param`` per parameter that got a signal; a
    hidden channel's embedding got one only on ``seen_rows`` of its rows."""
    full = shape.full_masks()
    h = shape.hidden
    table = GroupScores.zeros(shape, with_embedding=True)
    table.heads[:] = per_param * shape.group_cost(h)
    table.ffn[:] = per_param * shape.ffn_channel_cost(h)
    table.hidden[:] = per_param * (shape.hidden_channel_cost(full) - shape.vocab)  # layers and norms
    table.embedding[:] = per_param * seen_rows
    table.embedding_signal[:] = seen_rows
    return table


def test_hidden_channel_with_signal_on_few_embedding_rows_is_not_ranked_cheap():
    shape = BIG_VOCAB
    table = reduce_table(_uniform_partial_table(shape, 1.0, seen_rows=20), shape, signed=False)
    full = shape.full_masks()
    # the unseen 4,076 rows are scored at the seen rows' mean: one per parameter, like every group
    assert torch.allclose(table.hidden / shape.hidden_channel_cost(full), torch.ones(shape.hidden, dtype=torch.float64))
    # heads and FFN slightly cheaper per parameter: they go, not the hidden channels
    scores = GroupScores(table.heads * 0.9, table.ffn * 0.9, table.hidden)
    target = int(shape.parameter_count(full) * 0.7)
    _, moves = solve(shape, full, scores, target, SolverConstraints(align=8))
    assert moves[0]["type"] != "hidden"
    # the unfolded sum (what the table held before) made every hidden channel look 4x cheaper
    raw = _uniform_partial_table(shape, 1.0, seen_rows=20)
    raw_per_param = float((raw.hidden + raw.embedding)[0]) / shape.hidden_channel_cost(full)
    assert raw_per_param < 0.3
    _, raw_moves = solve(shape, full, GroupScores(scores.heads, scores.ffn, raw.hidden + raw.embedding),
                         target, SolverConstraints(align=8))
    assert raw_moves[0]["type"] == "hidden"


def test_embedding_rows_without_signal_do_not_change_a_fully_seen_table():
    shape = BIG_VOCAB
    table = reduce_table(_uniform_partial_table(shape, 2.0, seen_rows=shape.vocab), shape, signed=False)
    assert torch.allclose(table.hidden / shape.hidden_channel_cost(shape.full_masks()),
                          torch.full((shape.hidden,), 2.0, dtype=torch.float64))


def test_padded_vocabulary_rows_score_nothing():
    """Issue 31 item 4: the padded rows (zero, -inf logits) are no rows the model has: a hidden
    channel's embedding share is folded over the unpadded rows only, its padded ones score zero."""
    import dataclasses

    shape = dataclasses.replace(BIG_VOCAB, unpadded_vocab=4000)
    table = reduce_table(_uniform_partial_table(shape, 2.0, seen_rows=4000), shape, signed=False)
    padding = shape.vocab - shape.unpadded_vocab
    assert torch.allclose(table.hidden, torch.full((shape.hidden,), 2.0 * (shape.hidden_channel_cost(
        shape.full_masks()) - padding), dtype=torch.float64))


def _random_scores(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return GroupScores(torch.rand(shape.num_layers, shape.num_groups, generator=gen, dtype=torch.float64),
                       torch.rand(shape.num_layers, shape.ffn, generator=gen, dtype=torch.float64),
                       torch.rand(shape.hidden, generator=gen, dtype=torch.float64))


def test_one_event_never_removes_more_than_the_cap():
    shape = ModelShape(num_layers=4, hidden=128, num_heads=4, num_groups=2, head_dim=32, ffn=384, vocab=1024,
                       tied=True)
    full = shape.full_masks()
    # the largest unit: one query group in every layer (uniform)
    largest_unit = shape.num_layers * shape.group_cost(shape.hidden)
    for seed, cap in enumerate((0.02, 0.05, 0.1, 0.3)):
        for granularity in ("per-layer", "uniform"):
            c = SolverConstraints(align=8, granularity=granularity, max_step_fraction=cap)
            masks = full
            target = int(shape.parameter_count(masks) * 0.4)
            for _ in range(6):  # successive events towards a far target
                before = shape.parameter_count(masks)
                new, moves = solve(shape, masks, _random_scores(shape, seed), target, c)
                removed = before - shape.parameter_count(new)
                assert removed <= cap * before, (cap, granularity, removed, before)
                if cap * before >= largest_unit and before > target:  # any unit fits: progress
                    assert removed > 0
                assert check_constraints(shape, new, c) == []
                masks = new


def test_overshoot_is_bounded_by_the_cheapest_unit_that_can_move():
    shape = BIG_VOCAB
    full = shape.full_masks()
    c = SolverConstraints(align=8)
    ffn_unit = c.ffn_unit() * shape.ffn_channel_cost(shape.hidden)  # the cheapest unit here
    hidden_unit = c.hidden_unit() * shape.hidden_channel_cost(full)
    assert hidden_unit > 10 * ffn_unit
    # hidden channels score lowest per parameter, but the target is one FFN unit away: a hidden
    # unit would overshoot by ~30,000 parameters, so FFN units close the gap instead
    scores = GroupScores(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 128, dtype=torch.float64),
                         torch.full((64,), 1e-9, dtype=torch.float64))
    target = shape.parameter_count(full) - ffn_unit // 2
    new, moves = solve(shape, full, scores, target, c)
    params = shape.parameter_count(new)
    assert [m["type"] for m in moves] == ["ffn"]
    assert target - ffn_unit <= params <= target
    # far from the target the cheap hidden channels go first, and the last unit still lands within
    # one cheapest unit of the target
    target = shape.parameter_count(full) - 2 * hidden_unit - ffn_unit // 2
    new, moves = solve(shape, full, scores, target, c)
    assert moves[0]["type"] == "hidden"
    assert target - ffn_unit <= shape.parameter_count(new) <= target


def test_small_units_taken_before_a_large_one_that_lands_far_below_the_target_are_given_back():
    shape = BIG_VOCAB
    full = shape.full_masks()
    h = shape.hidden
    # per parameter: FFN channels cheapest (rising with the index), query groups next, hidden dearest
    ffn = (1 + torch.arange(shape.ffn, dtype=torch.float64) / shape.ffn).expand(2, -1) * 1e-3
    scores = GroupScores(torch.full((2, 2), 3e-3 * shape.group_cost(h), dtype=torch.float64),
                         ffn * shape.ffn_channel_cost(h),
                         torch.full((h,), 1e-2 * shape.hidden_channel_cost(full), dtype=torch.float64))
    target = int(0.7 * shape.parameter_count(full))
    # the greedy alone takes every FFN unit and query group it may, then has to take two hidden
    # units (~35,000 parameters each) and lands ~27,000 (8% of the model) below the target
    new, moves = solve(shape, full, scores, target, SolverConstraints(align=8))
    params = shape.parameter_count(new)
    assert int(new.hidden.sum()) == h - 16 and [m["type"] for m in moves][-2:] == ["hidden", "hidden"]
    ffn_unit = 8 * shape.ffn_channel_cost(h - 16)
    assert target - ffn_unit < params <= target, (target, params)  # within one FFN unit again
    assert new.heads.all()  # the query groups are worth more per parameter than FFN channels: back first
    for layer in range(2):  # the FFN channels back are the most salient ones
        kept = int(new.ffn[layer].sum())
        assert 8 < kept < shape.ffn and bool(new.ffn[layer, shape.ffn - kept:].all())
    # the moves left say exactly what the event removed
    assert sum(m["params_removed"] for m in moves) == shape.parameter_count(full) - params
    assert check_constraints(shape, new, SolverConstraints(align=8)) == []


def test_proportional_allocation_prunes_every_type_by_the_same_fraction():
    shape = ModelShape(num_layers=4, hidden=128, num_heads=8, num_groups=8, head_dim=16, ffn=512, vocab=256,
                       tied=True)
    full = shape.full_masks()
    # scores that would make the global ranking take only FFN channels
    scores = GroupScores(torch.ones(4, 8, dtype=torch.float64), torch.full((4, 512), 1e-6, dtype=torch.float64),
                         torch.ones(128, dtype=torch.float64))
    target = int(shape.parameter_count(full) * 0.6)
    glob, _ = solve(shape, full, scores, target, SolverConstraints(align=8))
    assert bool(glob.heads.all()) and bool(glob.hidden.all())
    prop, _ = solve(shape, full, scores, target, SolverConstraints(align=8, allocation="proportional"))
    kept = [float(prop.heads.float().mean()), float(prop.ffn.float().mean()), float(prop.hidden.float().mean())]
    # each type within one unit of the others: heads 1/8, FFN 8/512, hidden 8/128
    assert max(kept) - min(kept) <= 1 / 8 + 1e-9, kept
    assert min(kept) < 1.0


def embedding_heavy_worker(data, ratios):
    """Pretrain a tiny model whose (untied) embeddings are most of its parameters, score its last
    two steps (element-form Taylor), then prune it one-shot to each ratio with each allocation."""
    import dataclasses

    from pretrain.model.build import unwrap
    from pretrain.pruning.masks import build_local_masks
    from pretrain.run.segments import run
    from tests.pretrain.common import debug_config

    # 400 steps: held-out loss 4.3, well past the unigram stage (5.3 after 150 steps), so the
    # scores rank a model that has learned something, as a pretrained parent has
    iters, tokens_per_step = 400, 8 * 64
    cfg = debug_config(data, iters=iters, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, untie_embeddings_and_output_weights=True)
    cfg.train = dataclasses.replace(cfg.train, log_interval=10**6)
    # the last two steps score; no event fires inside the run
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=min(ratios), start_tokens=(iters - 2) * tokens_per_step,
                                    end_tokens=10**12, interval=10**9, taylor_form="element")
    summary = run(cfg)
    pruner = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
    chunks = summary["trainer"].model_chunks
    model = unwrap(chunks[0])
    model.eval()
    batch = _last_sequences(data["prefix"], count=16, length=65)
    parent = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
    shape, table = pruner.shape, pruner.ema
    full = shape.full_masks()
    out = {"embedding_share": shape.vocab * shape.hidden * 2 / shape.parameter_count(full)}

    def heldout_loss(masks) -> float:
        model.load_state_dict(parent, strict=False)
        build_local_masks(chunks, masks, shape).apply_to_weights()
        with torch.no_grad():
            tokens, labels = batch[:, :-1], batch[:, 1:]
            return float(model(tokens, torch.arange(64).expand_as(tokens), None, labels=labels).mean())

    out["parent"] = heldout_loss(full)
    for ratio in ratios:
        for allocation in ("global", "proportional"):
            target = int(shape.parameter_count(full) * ratio)
            masks, _ = solve(shape, full, GroupScores(table.heads, table.ffn, table.hidden), target,
                             SolverConstraints(align=8, allocation=allocation))
            out[(ratio, allocation)] = {
                "loss": heldout_loss(masks), "params": shape.parameter_count(masks) / shape.parameter_count(full),
                "kept": [float(getattr(masks, k).float().mean()) for k in ("heads", "ffn", "hidden")]}
    return out


def _last_sequences(prefix: str, count: int, length: int) -> torch.Tensor:
    """The corpus's last tokens (its validation split's end) as ``count`` sequences."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(max(0, len(ds) - 60), len(ds))]).astype(np.int64)
    return torch.from_numpy(tokens[-count * length:]).view(count, length)


@pytest.mark.slow
def test_global_allocation_is_no_worse_than_proportional_on_an_embedding_heavy_model(tiny_dataset):
    """Issue 21. Until the solver gave back small units (``_give_back``), the global ranking took
    every FFN unit and query group it could, then a hidden unit (8 channels, ~9% of this model)
    that landed far below the target: 62.6% kept at a 70% target and 44.7% at 50%, held-out 5.01
    and 5.38 against proportional's 4.61 and 4.98 (after 150 training steps: 6.13 against 5.79)."""
    from tests.dist_helper import run_distributed

    res = run_distributed(embedding_heavy_worker, 1, tiny_dataset, (0.7, 0.5))[0]
    assert res["embedding_share"] > 0.5, res
    for ratio in (0.7, 0.5):
        glob, prop = res[(ratio, "global")], res[(ratio, "proportional")]
        # the overshoot is at most one FFN unit (8 channels: at most 0.75% of this model)
        assert ratio - 0.01 < glob["params"] <= ratio, res
        # Tolerance 0.02 nats. Both losses come from the same trained weights on the same 1,024
        # held-out tokens, so only the masks differ. Measured with seeds 7, 1, 2: at 70% global
        # wins by 0.12, 0.14, 0.17 nats (it keeps the hidden width, which this model needs most,
        # and takes query groups and FFN channels instead); at 50% the target leaves no choice
        # (both reach query groups at their floor and 40 of 64 hidden channels) and the masks,
        # hence the losses, are identical. 0.02 covers another CPU's float summation order
        # flipping a near-tie between two channels; it is far below the margins above.
        assert glob["loss"] <= prop["loss"] + 0.02, res


def test_a_loss_jump_after_an_event_is_recorded_logged_and_warned(capsys):
    from types import SimpleNamespace

    from pretrain.config import PruneConfig
    from pretrain.pruning.callback import PruningCallback

    logged = []
    logger = SimpleNamespace(name="logging", log_scalar=lambda tag, value, step: logged.append((tag, value, step)))
    trainer = SimpleNamespace(callbacks=[logger])
    pruner = PruningCallback(PruneConfig(target_ratio=0.5, loss_jump_warn=0.5), BIG_VOCAB, 1, 10**6)
    for event, before, after, warned in ((10, 3.81, 4.98, True), (20, 4.0, 4.2, False)):
        pruner.history.append({"iteration": event})
        pruner.state.loss_before_event = (event, before)
        pruner._check_loss_jump(trainer, event + 1, after)
        record = pruner.history[-1]
        assert abs(record["loss_jump"] - (after - before)) < 1e-9 and record["loss_jump_warning"] is warned
        assert logged[-1][0] == "pruning/loss_jump" and logged[-1][2] == event
        assert ("WARNING: the loss rose by" in capsys.readouterr().out) is warned
    pruner._check_loss_jump(trainer, 30, 9.0)  # no event just before: nothing to compare
    assert len(logged) == 2


def test_an_events_history_line_is_written_with_its_loss_jump(tmp_path):
    import json
    from types import SimpleNamespace

    from pretrain.config import PruneConfig
    from pretrain.pruning.callback import PruningCallback

    trainer = SimpleNamespace(callbacks=[], state=SimpleNamespace(iteration=11), total_iters=100)
    pruner = PruningCallback(PruneConfig(target_ratio=0.5), BIG_VOCAB, 1, 10**6, log_dir=str(tmp_path))
    history_file = tmp_path / "pruning_history.jsonl"
    pruner.history.append({"iteration": 10})
    pruner.state.loss_before_event = (10, 3.0)
    assert not history_file.exists()  # written once the next step's loss is known
    pruner._check_loss_jump(trainer, 11, 3.25)
    [line] = history_file.read_text().splitlines()
    assert json.loads(line) == {"iteration": 10, "loss_before": 3.0, "loss_after": 3.25, "loss_jump": 0.25,
                                "loss_jump_warning": False}
    # pending when the run ends on an event: written at the end (no jump), once
    pruner.history.append({"iteration": 100})
    pruner.state.loss_before_event = (100, 3.0)
    trainer.state.iteration = 100
    pruner.on_train_end(trainer)
    pruner.on_train_end(trainer)
    assert [json.loads(x)["iteration"] for x in history_file.read_text().splitlines()] == [10, 100]
    # pending state survives a checkpoint (a resumed run writes the line)
    pruner.state.loss_before_event = (40, 2.5)
    restored = PruningCallback(PruneConfig(target_ratio=0.5), BIG_VOCAB, 1, 10**6)
    restored.load_state_dict(pruner.state_dict())
    assert restored.state.loss_before_event == (40, 2.5)


def test_a_window_ending_above_its_target_is_warned_about(capsys):
    from pretrain.config import PruneConfig
    from pretrain.pruning.callback import PruningCallback

    pruner = PruningCallback(PruneConfig(target_ratio=0.5), BIG_VOCAB, 1, 10**6)
    pruner._warn_if_target_missed()
    assert "WARNING: the pruning window ends at" in capsys.readouterr().out
    pruner.final_params = pruner.current_params()
    pruner._warn_if_target_missed()
    assert capsys.readouterr().out == ""


def test_an_event_on_a_table_that_cannot_rank_is_skipped_with_a_warning(capsys):
    """Issue 28: a table that is all zero over the kept groups (every gradient 0: the student
    distilling from its own parent scored from the KL's gradient) or holds a NaN is never a choice;
    the event is skipped with a warning naming the cause. A step's non-finite table stays out of
    the EMA."""
    from types import SimpleNamespace

    from pretrain.config import PruneConfig
    from pretrain.pruning.callback import PruningCallback
    from pretrain.pruning.saliency import table_problem

    shape = BIG_VOCAB
    full = shape.full_masks()
    pruner = PruningCallback(PruneConfig(target_ratio=0.5), shape, 1, 10**6)
    pruner.estimator = SimpleNamespace(reads_gradients=True)
    trainer = SimpleNamespace(callbacks=[])
    zero, nan = GroupScores.zeros(shape), _random_scores(shape, 0)
    nan.ffn[1, 3] = float("nan")
    for table, cause in ((None, "no scoring step has given a saliency table yet"),
                         (zero, "every kept group's saliency is exactly zero (ffn, heads, hidden)"),
                         (nan, "the saliency table has non-finite entries (ffn)")):
        pruner.ema = table
        pruner.prune_event(trainer, 10, 5 * 10**5)  # half-way: the target is well below the model
        out = capsys.readouterr().out
        assert f"WARNING: pruning event at iteration 10 skipped: {cause}" in out, out
        assert ("--saliency taylor: the gradients these scores multiply" in out) is (table is zero), out
        assert pruner.masks.equal(full) and pruner.history == []
    # the kept groups decide: scores only on groups already dropped rank nothing
    partly = GroupScores.zeros(shape)
    partly.ffn[0, :8] = 1.0
    dropped = shape.full_masks()
    dropped.ffn[0, :8] = False
    assert table_problem(partly, full, ("ffn",)) == ""
    assert table_problem(partly, dropped, ("ffn", "layers")) == "every kept group's saliency is exactly zero (ffn, heads)"
    assert table_problem(partly, dropped, ("heads",)) == "every kept group's saliency is exactly zero (heads)"
    # one step's non-finite table is left out of the running saliency, with a warning
    good = _random_scores(shape, 1)
    pruner.ema, pruner.state.ema_steps = good, 3
    pruner._add_to_ema(nan, 7)
    assert "WARNING: iteration 7: the saliency table of this step has non-finite entries (ffn)" in capsys.readouterr().out
    assert pruner.ema is good and pruner.state.ema_steps == 3
    pruner._add_to_ema(zero, 8)  # a zero table is evidence of nothing, but harmless in the EMA
    assert pruner.state.ema_steps == 4 and torch.equal(pruner.ema.heads, 0.9 * good.heads)
