"""OBS compensation at a pruning event (issue 16, ``pretrain/pruning/compensation.py``).

* the update of one linear equals the least-squares refit of its kept columns (closed form);
* on the tiny GPT, every consuming linear's output on held-out inputs is closer to the unpruned
  output with compensation than without (FFN, heads, hidden), and masked == shrunk still holds;
* in training (gloo, world 2, one spawn for all): DP replicas stay identical, masked weights and
  moments stay zero, the fp32 master copies get the update (bf16), the held-out probe leaves
  training unchanged, TP=2 equals TP=1 where the scheme is exact (hidden channels), every type
  runs under TP=2 and PP=2, and a run stopped inside a Hessian window resumes to the same losses
  and masks.
"""

import dataclasses
import math
import shutil

import pytest
import torch

from pretrain.pruning.compensation import obs_update, output_error
from tests.dist_helper import run_distributed
from tests.pretrain.common import copy_shrunk_weights, losses_of


# --------------------------------------------------------------------------------- the pure update
def _problem(seed=0, rows=7, columns=12, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=g, dtype=torch.float64)
    x = x @ torch.randn(columns, columns, generator=g, dtype=torch.float64)  # correlated inputs
    return x, torch.randn(rows, columns, generator=g, dtype=torch.float64)


def test_update_is_the_least_squares_refit_of_the_kept_columns():
    x, w = _problem()
    active = torch.ones(12, dtype=torch.bool)
    active[0] = False  # removed at an earlier event: stays zero, takes no part
    w[:, 0] = 0.0
    removed = torch.tensor([2, 5, 9])
    new = obs_update(w, x.T @ x, removed, damp=1e-12, active=active)
    kept = [j for j in range(12) if active[j] and j not in removed.tolist()]
    best = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    assert torch.allclose(new[:, kept], best, rtol=1e-5, atol=1e-5 * float(best.abs().max()))
    assert bool((new[:, removed] == 0).all()) and bool((new[:, 0] == 0).all())
    # and it beats plain zeroing on those inputs
    plain = w.clone()
    plain[:, removed] = 0.0
    assert output_error(w, new, x.T @ x)[0] < output_error(w, plain, x.T @ x)[0]


def test_update_removes_nothing_and_rejects_inactive_columns():
    x, w = _problem(1)
    assert torch.equal(obs_update(w, x.T @ x, torch.tensor([], dtype=torch.long)), w)
    active = torch.ones(12, dtype=torch.bool)
    active[3] = False
    with pytest.raises(ValueError, match="not among the active"):
        obs_update(w, x.T @ x, torch.tensor([3]), active=active)


def test_damping_makes_a_singular_hessian_usable():
    x, w = _problem(2, tokens=5)  # 5 tokens, 12 columns: H has rank 5
    new = obs_update(w.float(), (x.T @ x).float(), torch.tensor([1, 4]), damp=0.01)
    assert bool(torch.isfinite(new).all()) and new.dtype == torch.float32


# --------------------------------------------------------------------------------- on the tiny GPT
def _masks(shape):
    from pretrain.pruning.masks import GroupMasks

    m = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    g = torch.Generator().manual_seed(5)
    for layer in range(shape.num_layers):
        m.heads[layer, layer % 2] = False
        m.ffn[layer, torch.randperm(shape.ffn, generator=g)[:96]] = False
    m.hidden[torch.randperm(shape.hidden, generator=g)[:16]] = False
    return m


@torch.no_grad()
def _make_redundant(model, masks, shape):
    """Give every group the masks remove a near-copy among the kept ones, as trained networks have
    (and a random initialisation has not: its channels are independent random features, so no
    refit can recover a removed one, and with few tokens the refit only fits noise). A removed
    FFN channel's gate/up rows, a removed query group's q/k/v rows, and a removed hidden channel's
    embedding column and residual writes (proj/fc2 rows) copy a kept partner's, plus 10% noise."""
    g = torch.Generator().manual_seed(9)

    def copy_(dst, src):
        dst.copy_(src + 0.1 * src.std() * torch.randn(src.shape, generator=g))

    hidden_kept = masks.hidden.nonzero().flatten()
    embedding = model.embedding.word_embeddings.weight
    for j in (~masks.hidden).nonzero().flatten().tolist():
        k = int(hidden_kept[j % len(hidden_kept)])
        copy_(embedding[:, j], embedding[:, k])
        for layer in model.decoder.layers:
            copy_(layer.self_attention.linear_proj.weight[j], layer.self_attention.linear_proj.weight[k])
            copy_(layer.mlp.linear_fc2.weight[j], layer.mlp.linear_fc2.weight[k])
    rows = (shape.heads_per_group + 2) * shape.head_dim
    for index, layer in enumerate(model.decoder.layers):
        qkv, fc1 = layer.self_attention.linear_qkv.weight, layer.mlp.linear_fc1.weight
        kept_groups = masks.heads[index].nonzero().flatten()
        for r in (~masks.heads[index]).nonzero().flatten().tolist():
            p = int(kept_groups[r % len(kept_groups)])
            copy_(qkv[r * rows:(r + 1) * rows], qkv[p * rows:(p + 1) * rows])
        kept_ffn = masks.ffn[index].nonzero().flatten()
        for c in (~masks.ffn[index]).nonzero().flatten().tolist():
            p = int(kept_ffn[c % len(kept_ffn)])
            copy_(fc1[c], fc1[p])
            copy_(fc1[shape.ffn + c], fc1[shape.ffn + p])


def _tokens(vocab, seed, batch=16, seq=64):
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def layer_outputs(data):
    """Rank worker (TP=1): errors of every consuming linear on held-out inputs, with and without
    compensation, and the compensated masked model against its shrunk copy."""
    from pretrain.model.layout import axis_mask
    from pretrain.pruning.compensation import Compensator
    from pretrain.pruning.masks import build_local_masks
    from pretrain.model.shrunk import shrunk_model_config
    from tests.pretrain.pruning.test_masked_equals_shrunk import _build, _setup

    cfg, vocab, shape = _setup(data, 1, 1)
    model = _build(cfg, vocab)[0]
    masks = _masks(shape)
    _make_redundant(model, masks, shape)
    compensator = Compensator(shape, [model], None, ("heads", "ffn", "hidden"), damp=0.01)

    def forward(tokens):
        seq = tokens.shape[1] - 1
        with torch.no_grad():
            return model(tokens[:, :-1], torch.arange(seq).expand(tokens.shape[0], seq), None)

    compensator.begin_capture()
    forward(_tokens(vocab, 1))  # the "recent steps" whose inputs form H
    compensator.end_capture()
    held_out = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda m, a, i=i: held_out.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
        for i, t in enumerate(compensator.targets)]
    forward(_tokens(vocab, 2))
    for h in hooks:
        h.remove()
    reference = {i: t.param.detach().clone() for i, t in enumerate(compensator.targets)}
    record = compensator.compensate(shape.full_masks(), masks)
    errors = {}
    for i, t in enumerate(compensator.targets):
        kept = axis_mask(t.input_axis, t.layer, masks, shape).float()
        x, w = held_out[i], reference[i]
        target = x @ w.T
        plain = (x * kept) @ (w * kept).T
        compensated = (x * kept) @ t.param.detach().T
        errors.setdefault(t.role, []).append([float((plain - target).norm() / target.norm()),
                                              float((compensated - target).norm() / target.norm())])
    # masked == shrunk after compensation
    build_local_masks([model], masks, shape).apply_to_weights()
    tokens = _tokens(vocab, 3, batch=2)
    masked_logits = forward(tokens)
    small_cfg = shrunk_model_config(cfg.model, masks, shape)
    small = _build(dataclasses.replace(cfg, model=small_cfg), vocab, small_cfg)[0]
    copy_shrunk_weights(small, model, masks, shape)
    with torch.no_grad():
        small_logits = small(tokens[:, :-1], torch.arange(64).expand(2, 64), None)
    return {"errors": errors, "record": record, "hessians_left": compensator.hessian_bytes,
            "shrunk_diff": float((masked_logits - small_logits).abs().max()),
            "scale": float(small_logits.abs().max())}


# --------------------------------------------------------------------------------- in training
def _config(data, *, compensation="obs", window=1, types=("heads", "ffn", "hidden"), iters=6, interval=2,
            ratio=0.6, compensation_probe=False, **kw):
    from tests.pretrain.pruning.test_pruning_distributed import _prune_config

    cfg = _prune_config(data, iters=iters, interval=interval, end_tokens=iters * 8 * 64, ratio=ratio,
                        saliency="fisher", **kw)
    cfg.prune = dataclasses.replace(cfg.prune, compensation=compensation, compensation_window=window,
                                    types=tuple(types), compensation_probe=compensation_probe)
    return cfg


def _flat_params(summary):
    from pretrain.model.build import unwrap

    return torch.cat([p.detach().float().reshape(-1) for chunk in summary["trainer"].model_chunks
                      for p in unwrap(chunk).parameters()])


def _master_gap(summary):
    """The largest |fp32 master - model parameter| over this rank's owned ranges, relative to the
    parameter's scale. A run whose last step was an event: a master the update missed would still
    hold the old value (the next step would copy it back over the update)."""
    from pretrain.engines.slots import iter_param_slots

    gap = 0.0
    for slot in iter_param_slots(summary["trainer"].optimizer):
        if slot.main_param is None or slot.end <= slot.start:
            continue
        model = slot.param.detach().reshape(-1)[slot.start:slot.end].float()
        scale = float(model.abs().max()) or 1.0
        gap = max(gap, float((slot.main_param.float() - model).abs().max()) / scale)
    return gap


def training_worker(data, root):
    from megatron.core import parallel_state as ps

    from pretrain.run.segments import run
    from tests.pretrain.pruning.test_pruning_distributed import _pruner, _zero_violations

    out = {"layer": layer_outputs(data)}

    # TP=1, DP=2: every replica applies the same update (H summed over DP); the probe's held-out
    # losses around each event, and a run without the probe trains the same model
    cfg = _config(data, compensation_probe=True)
    test_prefix = f"{root}/test"  # a copy: a test set must be data training never reads
    if torch.distributed.get_rank() == 0:
        for ext in (".bin", ".idx"):
            shutil.copyfile(data["prefix"] + ext, test_prefix + ext)
    torch.distributed.barrier()
    cfg.data = dataclasses.replace(cfg.data, test_data_path=[test_prefix])
    cfg.train = dataclasses.replace(cfg.train, eval_iters=2)
    summary = run(cfg)
    mine = _flat_params(summary)
    unprobed = run(_config(data))
    out["probe_changes_nothing"] = (losses_of(unprobed) == losses_of(summary)
                                    and bool(torch.equal(_flat_params(unprobed), mine)))
    theirs = [torch.empty_like(mine) for _ in range(2)]
    torch.distributed.all_gather(theirs, mine, group=ps.get_data_parallel_group())
    bad, checked = _zero_violations(summary)
    out["dp"] = {"equal": bool(torch.equal(theirs[0], theirs[1])), "dp_size": ps.get_data_parallel_world_size(),
                 "bad": bad, "checked": checked, "history": _pruner(summary).history,
                 "master_gap": _master_gap(summary)}
    # bf16: the fp32 master copies (distributed optimizer shards) get the update too
    cfg = _config(data, iters=4)
    cfg.train = dataclasses.replace(cfg.train, bf16=True)
    summary = run(cfg)
    bad, checked = _zero_violations(summary)
    out["bf16"] = {"master_gap": _master_gap(summary), "bad": bad, "checked": checked,
                   "events": sum("compensation" in r for r in _pruner(summary).history)}

    # hidden channels under TP=2 vs TP=1: the exact scheme on both
    for tp in (1, 2):
        pruner = _pruner(s := run(_config(data, types=("hidden",), tp=tp, ratio=0.8)))
        out[f"hidden_tp{tp}"] = {"losses": losses_of(s), "masks": pruner.masks.state_dict(),
                                 "history": pruner.history}

    # every type under TP=2 (block-diagonal for proj/fc2) and PP=2 (each stage its own layers)
    for name, layout in (("tp2", dict(tp=2)), ("pp2", dict(pp=2))):
        pruner = _pruner(s := run(_config(data, ratio=0.5, **layout)))
        out[name] = {"history": pruner.history, "bad": _zero_violations(s)[0]}

    # stopped inside a two-step Hessian window (step 5 of an event at step 6), then resumed
    kw = dict(window=2, iters=8)
    straight = run(_config(data, save=f"{root}/a", **kw))
    run(_config(data, save=f"{root}/b", exit_interval=5, **kw))
    resumed = run(_config(data, save=f"{root}/b", load=f"{root}/b", **kw))
    out["resume"] = {"straight": losses_of(straight), "resumed": losses_of(resumed),
                     "straight_masks": _pruner(straight).masks.state_dict(),
                     "resumed_masks": _pruner(resumed).masks.state_dict(),
                     "straight_history": _pruner(straight).history, "resumed_history": _pruner(resumed).history}
    return out


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    return run_distributed(training_worker, 2, tiny_dataset, str(tmp_path_factory.mktemp("compensation")))[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_compensated_layer_outputs_are_closer_to_the_unpruned(trained):
    layer = trained["layer"]
    for role in ("proj", "fc2", "qkv", "fc1"):
        pairs = layer["errors"][role]
        assert len(pairs) == 4, role
        plain = sum(p[0] for p in pairs) / len(pairs)
        compensated = sum(p[1] for p in pairs) / len(pairs)
        assert compensated < 0.5 * plain, f"{role}: held-out error {compensated:.4f} with vs {plain:.4f} without"
    by_role = layer["record"]["error_by_role"]
    assert set(by_role) == {"proj", "fc2", "qkv", "fc1"}  # tied output layer: left alone
    assert all(after < before for before, after in by_role.values()), by_role
    assert layer["hessians_left"] == 0  # freed after the event
    assert layer["shrunk_diff"] <= 1e-4 * max(layer["scale"], 1.0), layer


@pytest.mark.distributed
@pytest.mark.slow
def test_dp_replicas_stay_equal_and_masked_state_stays_zero(trained):
    dp = trained["dp"]
    assert dp["dp_size"] == 2 and dp["equal"]
    assert dp["checked"] > 0 and dp["bad"] == []
    assert dp["master_gap"] < 1e-6, dp["master_gap"]  # fp32: the master is the parameter's storage
    bf16 = trained["bf16"]
    assert bf16["events"] >= 1 and bf16["checked"] > 0 and bf16["bad"] == [], bf16
    assert bf16["master_gap"] < 2 ** -7, bf16  # bf16 rounding of the master, not a missed update
    events = [r for r in dp["history"] if "compensation" in r]
    assert len(events) >= 2
    for r in events:
        c = r["compensation"]
        assert c["scheme"] == "exact (TP=1)" and c["hessian_bytes"] > 0 and c["seconds"] >= 0
        assert all(after <= before for before, after in c["linears"].values()), c["linears"]
        probe = c["probe"]
        assert all(math.isfinite(probe[k]) for k in ("loss_before", "loss_after_without", "loss_after_with"))
        assert probe["loss_after_without"] != probe["loss_after_with"]  # the update changed the model
    assert trained["probe_changes_nothing"]


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_equals_tp1_for_hidden_channels(trained):
    one, two = trained["hidden_tp1"], trained["hidden_tp2"]
    for k in ("heads", "ffn", "hidden"):
        assert torch.equal(one["masks"][k], two["masks"][k]), k
    assert not bool(one["masks"]["hidden"].all())  # something was removed and compensated
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 2e-4 * max(abs(a), 1.0), (one["losses"], two["losses"])
    errors = [(r["compensation"]["linears"], s["compensation"]["linears"])
              for r, s in zip(one["history"], two["history"]) if "compensation" in r]
    assert errors and "block-diagonal" in two["history"][-1]["compensation"]["scheme"]
    for a, b in errors:
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-6), name


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_inside_a_hessian_window_is_exact(trained):
    r = trained["resume"]
    assert r["resumed"] == r["straight"][5:]
    for k in ("heads", "ffn", "hidden"):
        assert torch.equal(r["straight_masks"][k], r["resumed_masks"][k])
    assert [h["compensation"]["linears"] for h in r["resumed_history"] if "compensation" in h] == \
        [h["compensation"]["linears"] for h in r["straight_history"] if "compensation" in h]


@pytest.mark.distributed
@pytest.mark.slow
def test_every_type_under_tp2_and_pp2(trained):
    for name in ("tp2", "pp2"):
        run = trained[name]
        assert run["bad"] == [], name
        events = [r["compensation"] for r in run["history"] if "compensation" in r]
        assert events, name
        layers = {int(k.split(".")[0]) for c in events for k in c["linears"]}
        assert layers == {0, 1, 2, 3}, (name, layers)  # both pipeline stages' linears are in the record
        for c in events:
            assert all(after <= before for before, after in c["linears"].values()), (name, c["linears"])
    assert "block-diagonal" in trained["tp2"]["history"][-1]["compensation"]["scheme"]
