"""The layout module (pretrain/model/layout.py) as plain functions, no processes.

For every TP/PP split of a few shapes (uniform GQA, MHA, per-layer widths, q/k/v biases), each
weight's indices are labelled here, written out from megatron-core's documented layout, with the
unit they belong to (FACTS.md: ``linear_qkv`` rows per query group ``[q.., k, v]``, ``linear_fc1``
rows ``[gate; up]``, ColumnParallel/RowParallel splits into contiguous blocks, fc1's local rows
``[gate_r; up_r]``). The layout's masks, folds and owned units must agree with those labels on
every rank.
"""

import pytest
import torch

from pretrain.model import layout
from pretrain.pruning.masks import GroupMasks, ModelShape

SHAPES = {
    "gqa": ModelShape(num_layers=4, hidden=16, num_heads=4, num_groups=2, head_dim=4, ffn=24, vocab=32, tied=True),
    "mha": ModelShape(num_layers=2, hidden=12, num_heads=4, num_groups=4, head_dim=2, ffn=8, vocab=16, tied=False),
    "per-layer": ModelShape(num_layers=2, hidden=16, num_heads=8, num_groups=4, head_dim=2, ffn=24, vocab=32,
                            tied=True, layer_groups=(4, 2), layer_ffn=(24, 8)),
    "qkv-bias": ModelShape(num_layers=2, hidden=8, num_heads=6, num_groups=2, head_dim=2, ffn=12, vocab=16,
                           tied=True, qkv_bias=True),
}


def _splits(shape):
    """Every TP size that divides every layer's query groups and FFN width and the vocabulary."""
    widths = [shape.groups_of(l) for l in range(shape.num_layers)] + [shape.ffn_of(l) for l in range(shape.num_layers)]
    return [tp for tp in (1, 2, 4) if all(w % tp == 0 for w in widths + [shape.vocab])]


CASES = [(name, tp) for name, shape in SHAPES.items() for tp in _splits(shape)]


def _full_labels(axis, shape, layer):
    """The unit of every index of ``axis`` in the full (TP=1) weight, written out."""
    hpg, hd = shape.heads_per_group, shape.head_dim
    if axis == "qkv":
        return [g for g in range(shape.groups_of(layer)) for _slot in range(hpg + 2) for _ in range(hd)]
    if axis == "proj":
        return [g for g in range(shape.groups_of(layer)) for _head in range(hpg) for _ in range(hd)]
    if axis == "fc1":
        return list(range(shape.ffn_of(layer))) * 2  # gate rows, then up rows
    if axis == "ffn":
        return list(range(shape.ffn_of(layer)))
    if axis == "hidden":
        return list(range(shape.hidden))
    return [None] * shape.vocab


def _local_labels(axis, shape, layer, tp, rank):
    """Megatron-core's TP split of those labels: contiguous blocks; fc1 splits gate and up alike."""
    full = _full_labels(axis, shape, layer)
    if axis == "hidden":
        return full
    if axis == "fc1":
        half = len(full) // 2
        n = half // tp
        return full[rank * n:(rank + 1) * n] + full[half + rank * n:half + (rank + 1) * n]
    n = len(full) // tp
    return full[rank * n:(rank + 1) * n]


def _params(shape):
    names = [n for n in layout.MODEL_PARAMETERS if n != "output_layer.weight" or not shape.tied]
    for l in range(shape.num_layers):
        for rest in layout.LAYER_PARAMETERS:
            if rest != "self_attention.linear_qkv.bias" or shape.qkv_bias:
                names.append(layout.layer_name(l, rest))
    return [(name, layout.param_layout(name)) for name in names]


def _random_masks(shape, seed):
    g = torch.Generator().manual_seed(seed)
    masks = shape.full_masks()
    masks.heads &= torch.rand(masks.heads.shape, generator=g) > 0.4
    masks.ffn &= torch.rand(masks.ffn.shape, generator=g) > 0.4
    masks.hidden &= torch.rand(masks.hidden.shape, generator=g) > 0.3
    if shape.num_layers > 2:
        masks.drop_layer(1)
    return masks


def _kept(unit, layer, label, masks):
    if unit is None:
        return True
    if unit == "hidden":
        return bool(masks.hidden[label])
    return bool(getattr(masks, unit)[layer, label])


@pytest.mark.parametrize("name, tp", CASES)
def test_local_masks_and_folds_follow_the_written_out_layout(name, tp):
    shape = SHAPES[name]
    masks = _random_masks(shape, seed=tp)
    g = torch.Generator().manual_seed(5)
    for param_name, where in _params(shape):
        for rank in range(tp):
            labels = [_local_labels(axis, shape, where.layer, tp, rank) for axis in where.axes]
            local_shape = tuple(len(x) for x in labels)
            got = layout.param_mask(where, local_shape, masks, shape, tp, rank)
            alive = where.layer is None or bool(masks.layers[where.layer])
            expected = torch.ones(local_shape, dtype=torch.bool)
            for index in torch.cartesian_prod(*(torch.arange(n) for n in local_shape)).reshape(-1, len(local_shape)):
                index = tuple(int(i) for i in index)
                expected[index] = alive and all(
                    _kept(layout.UNIT[axis], where.layer, labels[d][index[d]], masks)
                    for d, axis in enumerate(where.axes))
            assert torch.equal(got, expected), (param_name, tp, rank)
            for d, axis in enumerate(where.axes):
                unit = layout.UNIT[axis]
                if unit is None:
                    continue
                values = torch.rand(local_shape[d], generator=g, dtype=torch.float64)
                owned_unit, index = layout.owned_units(axis, where.layer, shape, tp, rank)
                table = torch.zeros_like(getattr(masks, owned_unit), dtype=torch.float64)
                table[index] += layout.fold(axis, values, shape)
                by_label = torch.zeros_like(table)
                for i, label in enumerate(labels[d]):
                    if unit == "hidden":
                        by_label[label] += values[i]
                    else:
                        by_label[where.layer, label] += values[i]
                assert owned_unit == unit and torch.allclose(table, by_label), (param_name, axis, tp, rank)


@pytest.mark.parametrize("name", list(SHAPES))
def test_kept_indices_of_the_shrink_are_the_kept_labels(name):
    from pretrain.model.shrunk import kept_indices

    shape = SHAPES[name]
    masks = _random_masks(shape, seed=3)
    for param_name, where in _params(shape):
        got = kept_indices(param_name, masks, shape)
        for d, axis in enumerate(where.axes):
            unit = layout.UNIT[axis]
            if unit is None:
                assert got[d] is None
                continue
            labels = _full_labels(axis, shape, where.layer)
            kept = [i for i, label in enumerate(labels) if _kept(unit, where.layer, label, masks)]
            # None: the axis keeps everything (the shrink then leaves it uncut)
            assert (list(range(len(labels))) if got[d] is None else got[d].tolist()) == kept, (param_name, axis)


@pytest.mark.parametrize("name", list(SHAPES))
def test_qkv_and_fc1_split_into_hf_tensors_and_back(name):
    shape = SHAPES[name]
    hpg, hd = shape.heads_per_group, shape.head_dim
    for layer in range(shape.num_layers):
        groups = shape.groups_of(layer)
        rows = torch.arange(groups * (hpg + 2) * hd, dtype=torch.float64)[:, None].repeat(1, 3)
        q, k, v = layout.split_qkv(rows, groups, shape)
        # HF: q_proj rows are the heads in order (head h in query group h // hpg), k/v the groups
        q_rows = [(h // hpg) * (hpg + 2) * hd + (h % hpg) * hd + i for h in range(groups * hpg) for i in range(hd)]
        k_rows = [g * (hpg + 2) * hd + hpg * hd + i for g in range(groups) for i in range(hd)]
        v_rows = [g * (hpg + 2) * hd + (hpg + 1) * hd + i for g in range(groups) for i in range(hd)]
        assert q[:, 0].tolist() == q_rows and k[:, 0].tolist() == k_rows and v[:, 0].tolist() == v_rows
        assert torch.equal(layout.merge_qkv(q, k, v, groups, shape), rows)
        fc1 = torch.arange(2 * shape.ffn_of(layer) * 3).view(-1, 3)
        gate, up = layout.split_fc1(fc1)
        assert torch.equal(gate, fc1[:shape.ffn_of(layer)]) and torch.equal(up, fc1[shape.ffn_of(layer):])
        assert torch.equal(layout.merge_fc1(gate, up), fc1)


@pytest.mark.parametrize("layers, pp, expected", [
    (4, 1, [[0, 1, 2, 3]]), (4, 2, [[0, 1], [2, 3]]), (4, 4, [[0], [1], [2], [3]]), (6, 3, [[0, 1], [2, 3], [4, 5]])])
def test_pipeline_stages_hold_contiguous_blocks_of_layers(layers, pp, expected):
    assert [list(layout.stage_layers(layers, pp, s)) for s in range(pp)] == expected


def test_layout_refuses_what_does_not_split():
    with pytest.raises(ValueError, match="pipeline parallelism 3"):
        layout.stage_layers(4, 3, 0)
    with pytest.raises(ValueError, match="tensor parallelism 4"):
        layout.tp_block(6, 4, 0)
    with pytest.raises(KeyError, match="not a Llama parameter"):
        layout.param_layout("decoder.layers.0.mlp.router.weight")
    assert layout.param_layout("decoder.layers.3.input_layernorm.weight").replicated_over_tp
    assert not layout.param_layout("output_layer.weight").replicated_over_tp


def test_full_masks_of_a_per_layer_shape_keep_only_the_units_that_exist():
    # a heterogeneous shape: entries past a layer's own width do not exist and are never kept
    shape = SHAPES["per-layer"]
    masks = shape.full_masks()
    assert isinstance(masks, GroupMasks)
    assert masks.heads.sum(1).tolist() == [4, 2] and masks.ffn.sum(1).tolist() == [24, 8]
