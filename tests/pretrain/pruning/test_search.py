"""Minitron's architecture search (``--prune-allocation search``, ``pretrain/pruning/search.py``):
Model-Optimizer's choice rule, the top-k largest homogeneous shapes under the target, each axis
kept by its own ranking, and in training: every candidate scored on the same validation batches,
the lowest loss chosen, its forward passes charged, the weights put back between candidates."""

import dataclasses
import itertools

import pytest
import torch

from pretrain.config import ConfigError, PruneConfig
from pretrain.pruning import search
from pretrain.pruning.masks import GroupScores, ModelShape
from tests.dist_helper import run_distributed

SHAPE = ModelShape(num_layers=3, hidden=96, num_heads=6, num_groups=3, head_dim=16, ffn=256, vocab=512, tied=True)


def _scores(seed: int) -> GroupScores:
    gen = torch.Generator().manual_seed(seed)
    return GroupScores(torch.rand(3, 3, generator=gen, dtype=torch.float64),
                       torch.rand(3, 256, generator=gen, dtype=torch.float64),
                       torch.rand(96, generator=gen, dtype=torch.float64))


def test_axis_choices_follow_model_optimizers_rule():
    # sorted(multiples of the divisor below the size, and the size)[int((1 - max) * count):]
    assert search.axis_choices(576, 64, 0.4) == [384, 448, 512, 576]
    assert search.axis_choices(1536, 512, 0.4) == [1024, 1536]
    assert search.axis_choices(3, 1, 0.4) == [2, 3]
    assert search.axis_choices(96, 256, 0.4) == [96]  # a model narrower than the divisor keeps its width
    assert search.axis_choices(64, 16, 1.0) == [16, 32, 48, 64]


def test_candidates_are_the_largest_shapes_under_the_target_by_brute_force():
    settings = search.SearchSettings(top_k=5, max_width_pruning=0.5, hidden_divisor=16, ffn_divisor=32)
    full = SHAPE.full_masks()
    target = int(0.7 * SHAPE.parameter_count(full))
    found = search.candidates(SHAPE, full, target, settings)
    every = []
    for h, f, g in itertools.product(search.axis_choices(96, 16, 0.5), search.axis_choices(256, 32, 0.5),
                                     search.axis_choices(3, 1, 0.5)):
        kept = search.apply(full, _scores(0), search.Candidate(h, f, g, 0))
        assert (int(kept.hidden.sum()), int(kept.ffn.sum(1).max()), int(kept.heads.sum(1).max())) == (h, f, g)
        if SHAPE.parameter_count(kept) <= target:
            every.append((SHAPE.parameter_count(kept), h, f, g))
    every.sort(reverse=True)
    assert [(c.params, c.hidden, c.ffn, c.groups) for c in found] == every[:5]
    assert all(c.params <= target for c in found) and len(found) == 5
    # an axis not in --prune-types keeps its width
    no_hidden = search.candidates(SHAPE, full, target, dataclasses.replace(settings, types=("heads", "ffn")))
    assert no_hidden and all(c.hidden == 96 for c in no_hidden)


def test_each_axis_keeps_its_most_important_groups_and_masks_only_shrink():
    scores = _scores(1)
    current = SHAPE.full_masks()
    current.ffn[1, :40] = False  # an earlier event left layer 1 narrower
    current.hidden[5] = False
    candidate = search.Candidate(hidden=80, ffn=192, groups=2, params=0)
    kept = search.apply(current, scores, candidate)
    assert set(torch.nonzero(kept.hidden).flatten().tolist()) == set(
        torch.topk(scores.hidden.masked_fill(~current.hidden, -1), 80).indices.tolist())
    for layer in range(3):
        top = torch.topk(scores.ffn[layer].masked_fill(~current.ffn[layer], -1), 192).indices
        assert set(torch.nonzero(kept.ffn[layer]).flatten().tolist()) == set(top.tolist())
        assert set(torch.nonzero(kept.heads[layer]).flatten().tolist()) == set(
            torch.topk(scores.heads[layer], 2).indices.tolist())
    assert not (kept.ffn & ~current.ffn).any() and not (kept.hidden & ~current.hidden).any()
    # the candidates never ask for more than the narrowest layer still has
    settings = search.SearchSettings(max_width_pruning=0.5, hidden_divisor=16, ffn_divisor=32)
    found = search.candidates(SHAPE, current, SHAPE.parameter_count(current), settings)
    assert found and all(c.ffn <= 216 and c.hidden <= 95 for c in found)


def test_search_flags_are_checked():
    with pytest.raises(ConfigError, match="--prune-granularity uniform"):
        PruneConfig(target_ratio=0.5, allocation="search").validate(1000)
    with pytest.raises(ConfigError, match="--prune-search-ffn-divisor 100 must be a multiple of --prune-align 64"):
        PruneConfig(target_ratio=0.5, allocation="search", granularity="uniform", align=64,
                    search_ffn_divisor=100).validate(1000)


def _search_config(data: dict, tp: int = 1, pp: int = 1, **prune):
    from tests.pretrain.common import debug_config

    c = debug_config(data, tp=tp, pp=pp, iters=3, gbs=4, mbs=2, seq_length=32)
    settings = dict(target_ratio=0.75, saliency="activation", granularity="uniform", allocation="search",
                    interval=100, max_step_fraction=1.0, end_tokens=3 * 4 * 32, search_top_k=4,
                    search_hidden_divisor=32, search_ffn_divisor=64, search_max_width_pruning=0.6)
    return dataclasses.replace(c, prune=PruneConfig(**{**settings, **prune}),
                               train=dataclasses.replace(c.train, eval_iters=2))


def _layouts_worker(data: dict) -> dict:
    from pretrain.run.segments import run

    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        summary = run(_search_config(data, tp, pp))
        pruning = next(cb for cb in summary["trainer"].callbacks if cb.name == "pruning")
        out[(tp, pp)] = pruning.history[-1]["search"]
    return out


def _search_worker(data: dict) -> dict:
    from pretrain.run.segments import run

    summary = run(_search_config(data))
    trainer = summary["trainer"]
    pruning = next(cb for cb in trainer.callbacks if cb.name == "pruning")
    out = {"history": pruning.history, "metrics": summary["history"],
           # the event is the last step and nothing evaluated since: the same batches the search scored
           "final_valid": trainer.score_on_validation(2),
           "widths": (int(pruning.masks.hidden.sum()), pruning.masks.ffn.sum(1).tolist(),
                      pruning.masks.heads.sum(1).tolist()),
           "flops_per_token": next(cb for cb in trainer.callbacks if cb.name == "logging").flops_per_token}
    try:
        run(_search_config(data, target_ratio=0.2))
    except ConfigError as err:
        out["unreachable"] = str(err)
    return out


@pytest.fixture(scope="module")
def trained(tiny_dataset) -> dict:
    return run_distributed(_search_worker, 1, tiny_dataset)[0]


@pytest.mark.distributed
def test_search_in_training_scores_every_candidate_and_keeps_the_best(trained):
    out = trained
    (event,) = out["history"]
    found = event["search"]
    losses = [c["valid_loss"] for c in found["candidates"]]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert len(set(losses)) > 1  # the candidates differ, so their masks were applied
    assert found["chosen"] == losses.index(min(losses))
    best = found["candidates"][found["chosen"]]
    hidden, ffn, groups = out["widths"]
    assert (hidden, set(ffn), set(groups)) == (best["hidden"], {best["ffn"]}, {best["groups"]})
    assert event["params"] == best["params"]
    # every candidate was scored from the same weights, put back after each: the model the event
    # kept scores what its candidate scored
    assert out["final_valid"] == pytest.approx(best["valid_loss"], rel=1e-6)
    # the candidates' forward passes are charged on the event's step: 4 x 2 batches x 4 x 32 tokens
    search_flops = [m.get("search_flops", 0) for m in out["metrics"]]
    assert search_flops == [0, 0, 4 * 2 * 4 * 32 * (out["flops_per_token"] // 3)]
    assert "narrowest shape has" in out["unreachable"] and "--prune-search-max-width-pruning" in out["unreachable"]


@pytest.mark.distributed
def test_search_chooses_alike_under_tp2_and_pp2(trained, tiny_dataset):
    """The choice and each candidate's validation loss do not depend on the layout (under TP=2 the
    query groups move in pairs, so the candidates with one group are not among them)."""
    def shape(c):
        return c["hidden"], c["ffn"], c["groups"], c["params"]

    reference = trained["history"][0]["search"]
    losses = {shape(c): c["valid_loss"] for c in reference["candidates"]}
    for rank in run_distributed(_layouts_worker, 2, tiny_dataset):
        for layout, found in rank.items():
            assert shape(found["candidates"][found["chosen"]]) == shape(reference["candidates"][reference["chosen"]])
            if layout == (1, 2):
                assert [shape(c) for c in found["candidates"]] == list(losses), layout
            for c in found["candidates"]:
                assert c["groups"] % layout[0] == 0, layout
                if shape(c) in losses:
                    assert c["valid_loss"] == pytest.approx(losses[shape(c)], rel=1e-4), layout
