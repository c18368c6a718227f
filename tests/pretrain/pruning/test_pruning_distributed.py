"""Pruning under megatron-core parallelism (gloo ranks):

* the global saliency table is the same for TP=1/PP=1, TP=2, PP=2, DP=2 and TP=2 x PP=2;
* masked weights and their Adam moments are exactly zero after many steps;
* a run stopped in the middle of pruning resumes to the same masks and losses.
"""

import dataclasses

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, losses_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ESTIMATORS = ["taylor", "fisher", "obs", "activation"]


def _prune_config(data, *, tp=1, pp=1, iters=2, saliency="taylor", interval=1000, end_tokens=10**9,
                  ratio=0.6, **kw):
    cfg = debug_config(data, tp=tp, pp=pp, iters=iters, **kw)
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=ratio, saliency=saliency, interval=interval,
                                    end_tokens=end_tokens, start_tokens=0)
    return cfg


def _pruner(summary):
    return next(c for c in summary["trainer"].callbacks if c.name == "pruning")


def tables_worker(data, layouts, with_bias=True):
    from pretrain.run.segments import run

    out = {}
    for tp, pp in layouts:
        for est in ESTIMATORS:
            pruner = _pruner(run(_prune_config(data, tp=tp, pp=pp, saliency=est)))
            out[(tp, pp, est)] = pruner.ema.pack()
        if with_bias:  # q/k/v biases (Qwen2) count towards their query groups' saliency on every layout
            pruner = _pruner(run(_prune_config(data, tp=tp, pp=pp, saliency="taylor", add_qkv_bias=True)))
            out[(tp, pp, "taylor+qkv_bias")] = pruner.ema.pack()
    return out


def _zero_violations(summary):
    """(names of state kinds with non-zero masked entries, number of masked entries checked)."""
    from pretrain.engines.slots import iter_param_slots

    masks = _pruner(summary).local.param_masks
    bad = []
    checked = 0
    for slot in iter_param_slots(summary["trainer"].optimizer):
        mask = masks.get(slot.param)
        if mask is None or slot.end <= slot.start:
            continue
        dropped = ~mask.reshape(-1)[slot.start:slot.end]
        for name, t in [("main", slot.main_param)] + list(slot.state.items()):
            if name == "step" or t is None:
                continue
            checked += int(dropped.sum())
            if bool((t[dropped] != 0).any()):
                bad.append(name)
    for param, mask in masks.items():
        if bool((param.detach()[~mask] != 0).any()):
            bad.append("param")
    return bad, checked


def zero_and_resume_worker(data, root):
    from pretrain.run.segments import run

    # many steps with several pruning events under TP=2, then inspect weights and Adam moments
    summary = run(_prune_config(data, tp=2, iters=14, interval=2, end_tokens=8 * 64 * 8, ratio=0.5,
                                add_qkv_bias=True))
    pruner = _pruner(summary)
    bad, checked = _zero_violations(summary)
    params_now = pruner.current_params()

    # resume in the middle of pruning (fisher: per-rank running means are restored too)
    kw = dict(tp=2, iters=10, interval=2, end_tokens=8 * 64 * 8, ratio=0.5, saliency="fisher")
    straight = run(_prune_config(data, save=f"{root}/a", **kw))
    run(_prune_config(data, save=f"{root}/b", exit_interval=5, **kw))
    resumed = run(_prune_config(data, save=f"{root}/b", load=f"{root}/b", **kw))
    return {"bad": bad, "checked": checked, "params": params_now, "initial": pruner.initial_params,
            "history": pruner.history,
            "straight": losses_of(straight), "resumed": losses_of(resumed),
            "straight_masks": _pruner(straight).masks.state_dict(),
            "resumed_masks": _pruner(resumed).masks.state_dict()}


@pytest.fixture(scope="module")
def reference_tables(tiny_dataset):
    return run_distributed(tables_worker, 1, tiny_dataset, [(1, 1)])[0]


def _assert_tables_close(a, b, what):
    scale = float(a.abs().max())
    assert scale > 0, what
    diff = float((a - b).abs().max())
    assert diff <= 2e-4 * scale, f"{what}: max diff {diff} (scale {scale})"


def test_tables_match_across_layouts_world2(tiny_dataset, reference_tables):
    got = run_distributed(tables_worker, 2, tiny_dataset, [(2, 1), (1, 2), (1, 1)])[0]
    for (tp, pp, est), table in got.items():
        _assert_tables_close(reference_tables[(1, 1, est)], table, f"{est} TP={tp} PP={pp} (world 2)")


def test_tables_match_tp2_pp2(tiny_dataset, reference_tables):
    got = run_distributed(tables_worker, 4, tiny_dataset, [(2, 2)], False)[0]
    for (tp, pp, est), table in got.items():
        _assert_tables_close(reference_tables[(1, 1, est)], table, f"{est} TP=2 x PP=2")


def test_masked_state_stays_zero_and_resume_mid_pruning(tiny_dataset, tmp_path):
    res = run_distributed(zero_and_resume_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["checked"] > 0 and res["bad"] == []
    assert res["params"] <= 0.5 * res["initial"] * 1.1 and len(res["history"]) >= 3
    assert res["resumed"] == res["straight"][5:]
    for k in ("heads", "ffn", "hidden"):
        assert torch.equal(res["straight_masks"][k], res["resumed_masks"][k])


def bf16_worker(data):
    import dataclasses as dc

    from pretrain.run.segments import run

    cfg = _prune_config(data, iters=8, interval=2, end_tokens=6 * 64 * 8, ratio=0.6, saliency="fisher")
    cfg.train = dc.replace(cfg.train, bf16=True)
    summary = run(cfg)
    bad, checked = _zero_violations(summary)
    return {"bad": bad, "checked": checked, "events": len(_pruner(summary).history),
            "dtype": str(next(summary["trainer"].model_chunks[0].parameters()).dtype)}


def test_bf16_masked_master_weights_and_moments_stay_zero(tiny_dataset):
    res = run_distributed(bf16_worker, 1, tiny_dataset)[0]
    assert res["dtype"] == "torch.bfloat16"
    assert res["events"] >= 2 and res["checked"] > 0 and res["bad"] == [], res
