"""The pruning callback's claim that every rank ends an event with the same masks, on real ranks
(world 2, gloo): rank 0's solution is broadcast and applied everywhere, and a rank whose own
solution differs (here: it was handed a different saliency table) is detected and overridden."""

import contextlib
import io
import types

import pytest
import torch

from tests.dist_helper import run_distributed

pytestmark = [pytest.mark.distributed]


def prune_event_worker() -> dict:
    """An event with the same table on both ranks, then one where rank 1 holds another table."""
    return {disagree: _prune_event(disagree) for disagree in (False, True)}


def _prune_event(disagree: bool) -> dict:
    from pretrain.config import ModelConfig, OptimConfig, ParallelConfig, PruneConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model
    from pretrain.engines.optim import build_optimizer
    from pretrain.pruning.callback import PruningCallback
    from pretrain.pruning.masks import GroupScores, ModelShape
    from pretrain.pruning.schedule import target_params
    from pretrain.pruning.solver import solve

    if not torch.distributed.is_initialized():
        init_distributed(1, 1)  # two data-parallel ranks
        set_random_seed(0)
    rank = torch.distributed.get_rank()
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                            ffn_hidden_size=64, seq_length=16)
    train = TrainConfig(micro_batch_size=1, global_batch_size=2, train_iters=1)
    chunks = build_model(model_cfg, ParallelConfig(), train, 64, use_te=False)
    trainer = types.SimpleNamespace(model_chunks=chunks, optimizer=build_optimizer(chunks, OptimConfig(),
                                                                                   ParallelConfig(), train),
                                    callbacks=[])
    shape = ModelShape.from_config(model_cfg, 64)
    prune = PruneConfig(target_ratio=0.6, start_tokens=0, end_tokens=100, align=8, max_step_fraction=1.0)
    pruner = PruningCallback(prune, shape, tensor_parallel=1, total_tokens=100)
    pruner.on_train_begin(trainer)
    # the same table on every rank, or on rank 1 another one
    seed = 1 if not disagree or rank == 0 else 2
    gen = torch.Generator().manual_seed(seed)
    pruner.ema = GroupScores(*(torch.rand(s, generator=gen, dtype=torch.float64)
                               for s in ((2, 4), (2, 64), (32,))))
    # what this rank would decide alone
    target = target_params(100, pruner.initial_params, pruner.final_params, 0, 100, prune.ramp)
    own_masks, _ = solve(shape, pruner.masks, pruner.ema, target, pruner.constraints)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pruner.prune_event(trainer, iteration=1, tokens=100)
    zeros_applied = all(bool((p.detach()[~m] == 0).all()) for p, m in pruner.local.param_masks.items())
    return {"masks": pruner.masks.state_dict(), "own": own_masks.state_dict(), "printed": printed.getvalue(),
            "moves": pruner.history[-1]["moves"], "params": pruner.current_params(), "zeros": zeros_applied}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("heads", "ffn", "hidden", "layers"))


@pytest.fixture(scope="module")
def events():
    return run_distributed(prune_event_worker, 2)


def test_every_rank_ends_with_the_same_masks(events):
    r0, r1 = (rank[False] for rank in events)
    assert _same(r0["masks"], r1["masks"]) and _same(r0["masks"], r0["own"])
    assert r0["moves"] == r1["moves"] and r0["params"] == r1["params"]
    assert r0["zeros"] and r1["zeros"]
    assert "differed between ranks" not in r0["printed"]


def test_a_rank_that_decided_otherwise_is_detected_and_overridden(events):
    r0, r1 = (rank[True] for rank in events)
    assert not _same(r1["own"], r0["own"])  # rank 1 alone would have pruned other groups
    assert _same(r1["masks"], r0["masks"]) and _same(r0["masks"], r0["own"])  # rank 0's is applied
    assert r0["moves"] == r1["moves"] and r1["zeros"]
    assert "WARNING: pruning decisions differed between ranks; rank 0's is used" in r0["printed"]
