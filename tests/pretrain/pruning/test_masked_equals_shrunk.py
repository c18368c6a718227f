"""Invariant 1: a masked model computes what the physically smaller model computes.

Uniform masks (every group type alone and all together) and per-layer masks (a heterogeneous
result) are applied to the debug model; the
model is then rebuilt at the smaller shape with its weights sliced by ``pretrain.model.shrunk``.
Logits agree at TP=1, and the masked loss under TP=2 and TP=2 x PP=2 equals the small model's.
Removing groups whose weights are zero therefore changes no output.
"""

import dataclasses

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.pretrain.common import copy_shrunk_weights, debug_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CASES = ["heads", "ffn", "hidden", "all", "per-layer", "layers"]


def _masks(shape, case):
    from pretrain.pruning.masks import GroupMasks

    m = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    g = torch.Generator().manual_seed(3)
    if case in ("heads", "all"):
        for l in range(shape.num_layers):  # uniform: one group of two in every layer (not TP-aligned
            m.heads[l, [1, 0, 1, 0][l]] = False  # at TP=1 only; TP=2 keeps one per rank either way)
    if case in ("ffn", "all"):
        for l in range(shape.num_layers):
            m.ffn[l, torch.randperm(shape.ffn, generator=g)[:96]] = False
    if case in ("hidden", "all"):
        m.hidden[torch.randperm(shape.hidden, generator=g)[:40]] = False
    if case == "per-layer":  # a heterogeneous result: widths differ between layers
        m.heads[0, 1] = False
        m.heads[2, 0] = False
        for l, n in enumerate([16, 128, 64, 200]):
            m.ffn[l, torch.randperm(shape.ffn, generator=g)[:n]] = False
        m.hidden[torch.randperm(shape.hidden, generator=g)[:24]] = False
    if case == "layers":  # a whole layer dropped (and some FFN channels elsewhere)
        m.drop_layer(1)
        m.ffn[3, torch.randperm(shape.ffn, generator=g)[:64]] = False
    return m


def _setup(data, tp, pp):
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.pruning.masks import ModelShape

    cfg = debug_config(data, tp=tp, pp=pp)
    init_distributed(tp, pp)
    set_random_seed(cfg.train.seed)
    vocab = cfg.model.padded_vocab_size(1000, 1)  # the same padded vocab for every layout
    m = cfg.model
    shape = ModelShape(num_layers=m.num_layers, hidden=m.hidden_size, num_heads=m.num_attention_heads,
                       num_groups=m.query_groups, head_dim=m.head_dim, ffn=m.ffn_hidden_size,
                       vocab=vocab, tied=True)
    return cfg, vocab, shape


def _build(cfg, vocab, model_cfg=None):
    from pretrain.model.init import deterministic_init
    from pretrain.model.build import build_model

    chunks = build_model(model_cfg or cfg.model, cfg.parallel, cfg.train, vocab, wrap_ddp=False)
    deterministic_init(chunks[0], cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
    return chunks


def _batch(vocab, seq):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (2, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, seq),
            "position_ids": torch.arange(seq).expand(2, seq)}


def _loss(chunks, batch, seq):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.trainer import forward_step

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
        seq_length=seq, micro_batch_size=2, forward_only=True)
    value = torch.tensor([float(losses[0]["lm loss"]) if ps.is_pipeline_last_stage() and losses else 0.0,
                          1.0 if ps.is_pipeline_last_stage() else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(value)
    return float(value[0] / value[1])


def reference_worker(data):
    from pretrain.pruning.masks import build_local_masks
    from pretrain.model.shrunk import shrunk_model_config

    cfg, vocab, shape = _setup(data, 1, 1)
    seq = cfg.model.seq_length
    batch = _batch(vocab, seq)
    out = {}
    for case in CASES:
        masks = _masks(shape, case)
        chunks = _build(cfg, vocab)
        build_local_masks(chunks, masks, shape).apply_to_weights()
        model = chunks[0]
        with torch.no_grad():
            masked_logits = model(batch["tokens"], batch["position_ids"], None)
        small_cfg = shrunk_model_config(cfg.model, masks, shape)
        small = _build(dataclasses.replace(cfg, model=small_cfg), vocab, small_cfg)[0]
        copy_shrunk_weights(small, model, masks, shape)
        with torch.no_grad():
            small_logits = small(batch["tokens"], batch["position_ids"], None)
        out[case] = {"max_diff": float((masked_logits - small_logits).abs().max()),
                     "scale": float(small_logits.abs().max()),
                     "small_params": sum(p.numel() for p in small.parameters()),
                     "expected_params": shape.parameter_count(masks),
                     "small_loss": _loss([small], batch, seq), "masked_loss": _loss([model], batch, seq)}
    return out


def parallel_worker(data, tp, pp):
    from pretrain.pruning.masks import build_local_masks

    cfg, vocab, shape = _setup(data, tp, pp)
    batch = _batch(vocab, cfg.model.seq_length)
    out = {}
    for case in CASES:
        chunks = _build(cfg, vocab)
        build_local_masks(chunks, _masks(shape, case), shape).apply_to_weights()
        out[case] = _loss(chunks, batch, cfg.model.seq_length)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dataset):
    return run_distributed(reference_worker, 1, tiny_dataset)[0]


def test_masked_logits_equal_shrunk_logits(reference):
    for case, r in reference.items():
        assert r["max_diff"] <= 1e-4 * max(r["scale"], 1.0), (case, r)
        assert r["small_params"] == r["expected_params"], (case, r)
        assert abs(r["masked_loss"] - r["small_loss"]) < 1e-5, (case, r)


@pytest.mark.parametrize("tp, pp, world", [(2, 1, 2), (2, 2, 4)])
def test_masked_loss_under_tp_pp_equals_shrunk(tiny_dataset, reference, tp, pp, world):
    got = run_distributed(parallel_worker, world, tiny_dataset, tp, pp)[0]
    for case in CASES:
        assert abs(got[case] - reference[case]["small_loss"]) < 1e-4, (case, got[case], reference[case])
