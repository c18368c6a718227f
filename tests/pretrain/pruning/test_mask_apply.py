"""Zeroing dropped elements (``LocalModelMasks``, issue 32): filling whole rows and columns by index
gives exactly what the per-parameter bool masks give, on parameters that are views of megatron-core's
flat grad buffer too (nothing outside a parameter's own range is written), and a NaN or an
infinity in a dropped element becomes 0 (``0 * nan`` stayed NaN) while one in a kept element stays."""

import pytest
import torch

from tests.dist_helper import run_distributed


def _reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the bool mask means: kept elements as they are, dropped ones exactly 0."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) and \
        torch.equal(a.isnan(), b.isnan())


def test_dropped_elements_on_views_of_a_flat_buffer_equal_the_bool_masks():
    from pretrain.pruning.masks import DroppedElements

    g = torch.Generator().manual_seed(0)
    rows, cols = torch.rand(6, generator=g) > 0.3, torch.rand(10, generator=g) > 0.3
    masks = {
        "rows": rows[:, None].expand(6, 10).contiguous(),
        "columns": cols[None, :].expand(6, 10).contiguous(),
        "both": rows[:, None] & cols[None, :],
        "vector": torch.tensor([True, False, True, True, False]),
        "everything": torch.zeros(4, 3, dtype=torch.bool),  # a dropped layer
        "nothing": torch.ones(3, 3, dtype=torch.bool),
        "not a product": torch.tensor([[True, False], [False, True]]),  # the flat-index fallback
    }
    # one flat buffer with padding between the parameters, as megatron-core lays out its grads
    sizes = [m.numel() for m in masks.values()]
    flat = torch.randn(sum(sizes) + 3 * len(sizes), generator=g)
    flat[::7] = float("nan")  # NaN in kept and in dropped elements
    flat[3::11] = float("inf")
    before = flat.clone()
    views, position = {}, 0
    for name, mask in masks.items():
        views[name] = flat[position:position + mask.numel()].view(mask.shape)
        position += mask.numel() + 3
    for name, mask in masks.items():
        DroppedElements(mask).zero(views[name])
    position, written = 0, torch.zeros_like(flat, dtype=torch.bool)
    for name, mask in masks.items():
        original = before[position:position + mask.numel()].view(mask.shape)
        assert _same(views[name], _reference(original, mask)), name
        assert not views[name][~mask].isnan().any(), f"{name}: a NaN in a dropped element survived"
        written[position:position + mask.numel()] = True
        position += mask.numel() + 3
    assert _same(flat[~written], before[~written]), "the padding between parameters was written"
    assert not DroppedElements(masks["nothing"])
    assert DroppedElements(masks["not a product"]).flat is not None


def _grad_buffer_worker():
    from pretrain.config import MODEL_PRESETS, ModelConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model
    from pretrain.model.params import unwrap
    from pretrain.pruning.masks import GroupMasks, ModelShape, build_local_masks

    init_distributed(1, 1)
    set_random_seed(1)
    model_cfg = ModelConfig(**dict(MODEL_PRESETS["debug"], seq_length=16))
    chunks = build_model(model_cfg, ParallelConfig(), TrainConfig(seed=1), 256)
    shape = ModelShape.from_config(model_cfg, 256)
    masks = GroupMasks.full(shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    g = torch.Generator().manual_seed(2)
    masks.heads[1, 0] = False
    masks.ffn[:, torch.randperm(shape.ffn, generator=g)[:100]] = False
    masks.hidden[torch.randperm(shape.hidden, generator=g)[:24]] = False
    masks.drop_layer(3)
    local = build_local_masks(chunks, masks, shape)
    buffers = [b for chunk in chunks for b in chunk.buffers]
    for b in buffers:  # every gradient element set, NaN and inf among them
        b.grad_data.copy_(torch.randn(b.grad_data.numel(), generator=g))
        b.grad_data[::13] = float("nan")
        b.grad_data[5::17] = float("-inf")
    before = [b.grad_data.clone() for b in buffers]
    grads_before = {p: p.main_grad.clone() for p in local.param_masks}
    local.apply_to_grads()
    out = {"params": len(local.param_masks), "dropped_params": len(local.dropped), "mismatch": [],
           "outside_written": 0}
    for p, mask in local.param_masks.items():
        if not _same(p.main_grad, _reference(grads_before[p], mask)):
            out["mismatch"].append(tuple(p.shape))
    # elements of the flat buffers that belong to no masked parameter are untouched
    for b, old in zip(buffers, before):
        owned = torch.zeros(b.grad_data.numel(), dtype=torch.bool)
        for p in local.param_masks:
            start = p.main_grad.storage_offset() - b.grad_data.storage_offset()
            if p.main_grad.untyped_storage().data_ptr() == b.grad_data.untyped_storage().data_ptr():
                owned[start:start + p.numel()] = True
        out["outside_written"] += int((~_same_elements(b.grad_data[~owned], old[~owned])).sum())
    out["on_buffer"] = all(any(p.main_grad.untyped_storage().data_ptr() == b.grad_data.untyped_storage().data_ptr()
                               for b in buffers) for p in local.param_masks)
    out["names"] = len(list(unwrap(chunks[0]).parameters()))
    return out


def _same_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b) | (a.isnan() & b.isnan())


@pytest.mark.distributed
def test_masked_grads_in_megatron_flat_buffer_equal_per_parameter_masks():
    r = run_distributed(_grad_buffer_worker, 1)[0]
    assert r["on_buffer"], "the test meant megatron-core's flat grad buffer: main_grad is not a view of it"
    assert r["params"] == r["names"] and r["dropped_params"] > 0
    assert r["mismatch"] == [], f"parameters whose masked gradient differs from grad * mask: {r['mismatch']}"
    assert r["outside_written"] == 0
