"""Where every weight of megatron-core's Llama lives: the one place for layout facts (FACTS.md).

* each dimension of a weight is an *axis*, made of *units* (the things pruning removes):

  ========  ===========================================  =======================
  axis      what its indices are                          unit
  ========  ===========================================  =======================
  hidden    hidden channels (replicated over TP)          hidden channel
  vocab     vocabulary rows                               (none: never pruned)
  qkv       ``linear_qkv`` rows: per query group          query group
            ``[q_0 .. q_{hpg-1}, k, v]``, head_dim each
  proj      ``linear_proj`` columns: heads in order,      query group
            ``heads_per_group * head_dim`` per group
  fc1       ``linear_fc1`` rows: ``[gate; up]`` (SwiGLU)  FFN channel
  ffn       ``linear_fc2`` columns                        FFN channel
  ========  ===========================================  =======================

* ``PARAMETERS``: the axes of each parameter of a layer / of the model (by megatron-core name);
* tensor parallelism: TP rank r holds the r-th contiguous block of the units of every axis but
  ``hidden`` (query groups, FFN channels, vocabulary rows); ``linear_fc1``'s local rows are
  ``[gate_r; up_r]`` and ``linear_qkv``'s keep the per-group interleave;
* pipeline parallelism: stage s holds layers ``[s*L/PP, (s+1)*L/PP)``;
* per-layer widths come from the shape (``ModelShape.groups_of`` / ``ffn_of``).

Masks (``pretrain.pruning.masks``), saliency (``pretrain.pruning.saliency``), the shrink and the
HF conversion (``pretrain.model.shrunk``) ask these functions; none works the layout out again.
``shape`` arguments are anything with ``heads_per_group``, ``head_dim``, ``groups_of(layer)`` and
``ffn_of(layer)`` (``pretrain.model.shape.ModelShape``); ``masks`` anything with ``heads``,
``ffn``, ``hidden`` and ``layers`` (``GroupMasks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

HIDDEN, VOCAB, QKV, PROJ, FC1, FFN = "hidden", "vocab", "qkv", "proj", "fc1", "ffn"
# the unit each axis is made of, as named in GroupMasks / GroupScores (None: not pruned)
UNIT = {HIDDEN: "hidden", VOCAB: None, QKV: "heads", PROJ: "heads", FC1: "ffn", FFN: "ffn"}
TP_SPLIT = frozenset({VOCAB, QKV, PROJ, FC1, FFN})  # every axis but hidden is split over TP ranks

# parameter name -> (role, axes); a layer's names follow ``decoder.layers.{l}.``
LAYER_PARAMETERS = {
    "self_attention.linear_qkv.weight": ("qkv", (QKV, HIDDEN)),
    "self_attention.linear_qkv.bias": ("qkv_bias", (QKV,)),  # Qwen2: part of its query group
    "self_attention.linear_proj.weight": ("proj", (HIDDEN, PROJ)),
    "mlp.linear_fc1.weight": ("fc1", (FC1, HIDDEN)),
    "mlp.linear_fc2.weight": ("fc2", (HIDDEN, FFN)),
    "input_layernorm.weight": ("norm", (HIDDEN,)),
    "pre_mlp_layernorm.weight": ("norm", (HIDDEN,)),
    # the checkpoint keys of norms fused into the next linear (TE names, FACTS.md)
    "self_attention.linear_qkv.layer_norm_weight": ("norm", (HIDDEN,)),
    "mlp.linear_fc1.layer_norm_weight": ("norm", (HIDDEN,)),
}
MODEL_PARAMETERS = {
    "embedding.word_embeddings.weight": ("embedding", (VOCAB, HIDDEN)),
    "output_layer.weight": ("output", (VOCAB, HIDDEN)),
    "decoder.final_layernorm.weight": ("norm", (HIDDEN,)),
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class ParamLayout:
    """What a parameter is: its role, its global layer (None: model-level) and its axes."""

    role: str  # embedding | output | norm | qkv | qkv_bias | proj | fc1 | fc2
    layer: int | None
    axes: tuple

    @property
    def replicated_over_tp(self) -> bool:
        """Every TP rank holds all of it (norms): a sum over ranks must count it once."""
        return not any(axis in TP_SPLIT for axis in self.axes)


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.{l}.<rest>`` -> (l, rest); None for a model-level name."""
    m = _LAYER.fullmatch(name)
    return None if m is None else (int(m.group(1)), m.group(2))


def layer_name(layer: int, rest: str) -> str:
    return f"decoder.layers.{layer}.{rest}"


def param_layout(name: str) -> ParamLayout:
    """The layout of parameter ``name`` (a megatron-core name or checkpoint key with a global layer
    index); KeyError for a name that is not a Llama parameter."""
    split = split_layer_name(name)
    if split is None:
        if name not in MODEL_PARAMETERS:
            raise KeyError(f"not a Llama parameter: {name!r}")
        role, axes = MODEL_PARAMETERS[name]
        return ParamLayout(role, None, axes)
    layer, rest = split
    if rest not in LAYER_PARAMETERS:
        raise KeyError(f"not a Llama parameter: {name!r}")
    role, axes = LAYER_PARAMETERS[rest]
    return ParamLayout(role, layer, axes)


# --- along one axis -------------------------------------------------------------------------------

def indices_per_unit(axis: str, shape) -> int:
    """How many indices of ``axis`` one unit spans (qkv: a group's q, k and v rows)."""
    if axis == QKV:
        return (shape.heads_per_group + 2) * shape.head_dim
    if axis == PROJ:
        return shape.heads_per_group * shape.head_dim
    return 1


def expand(axis: str, per_unit: torch.Tensor, shape) -> torch.Tensor:
    """Per-unit values (a mask over query groups, FFN or hidden channels) -> one value per index
    of ``axis``; ``fc1`` repeats the FFN channels for gate and up."""
    if axis == FC1:
        return torch.cat([per_unit, per_unit])
    if axis == VOCAB:
        raise ValueError("the vocabulary axis has no units")
    return per_unit.repeat_interleave(indices_per_unit(axis, shape))


def fold(axis: str, per_index: torch.Tensor, shape) -> torch.Tensor:
    """Values along ``axis`` -> their sum per unit (the adjoint of ``expand``)."""
    if axis == FC1:
        return per_index.view(2, -1).sum(0)
    if axis == VOCAB:
        raise ValueError("the vocabulary axis has no units")
    return per_index.view(-1, indices_per_unit(axis, shape)).sum(1)


def units_of_layer(unit: str, layer: int, shape) -> int:
    """The width of ``layer`` in ``unit`` (query groups or FFN channels; its own, per-layer)."""
    return shape.groups_of(layer) if unit == "heads" else shape.ffn_of(layer)


def tp_block(units: int, tensor_parallel: int, tp_rank: int) -> slice:
    """The units (query groups, FFN channels, vocabulary rows) TP rank ``tp_rank`` holds."""
    if units % tensor_parallel:
        raise ValueError(f"{units} units do not split over tensor parallelism {tensor_parallel}")
    per_rank = units // tensor_parallel
    return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def owned_units(axis: str, layer: int | None, shape, tensor_parallel: int = 1, tp_rank: int = 0) -> tuple:
    """(unit name, index into a [layers, units] or [hidden] table) of the units TP rank ``tp_rank``
    holds along ``axis`` of a weight of ``layer``."""
    unit = UNIT[axis]
    if unit is None:
        raise ValueError("the vocabulary axis has no units")
    if unit == "hidden":
        return unit, (slice(None),)
    return unit, (layer, tp_block(units_of_layer(unit, layer, shape), tensor_parallel, tp_rank))


def axis_mask(axis: str, layer: int | None, masks, shape, tensor_parallel: int = 1,
              tp_rank: int = 0) -> torch.Tensor | None:
    """Kept (True) indices along ``axis`` of the slice TP rank ``tp_rank`` holds; None: all kept."""
    if axis == VOCAB:
        return None
    unit, index = owned_units(axis, layer, shape, tensor_parallel, tp_rank)
    return expand(axis, getattr(masks, unit)[index], shape)


def param_mask(layout: ParamLayout, local_shape: tuple, masks, shape, tensor_parallel: int = 1,
               tp_rank: int = 0) -> torch.Tensor:
    """The kept elements (bool, the local shape) of a parameter TP rank ``tp_rank`` holds; every
    element of a dropped layer is dropped."""
    mask = torch.ones(local_shape, dtype=torch.bool)
    for d, axis in enumerate(layout.axes):
        kept = axis_mask(axis, layout.layer, masks, shape, tensor_parallel, tp_rank)
        if kept is not None:
            mask &= kept.view([-1 if i == d else 1 for i in range(len(local_shape))])
    if layout.layer is not None and not bool(masks.layers[layout.layer]):
        mask[...] = False
    return mask


def sum_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` summed over every dimension but ``dim``."""
    other = [d for d in range(values.dim()) if d != dim]
    return values.sum(other) if other else values


# --- HF's separate tensors -------------------------------------------------------------------------

def split_qkv(weight: torch.Tensor, groups: int, shape):
    """``linear_qkv`` rows (per group ``[q.., k, v]``) -> (q, k, v) rows, each in group order."""
    hpg, hd = shape.heads_per_group, shape.head_dim
    per_group = weight.view(groups, hpg + 2, hd, -1)
    q = per_group[:, :hpg].reshape(groups * hpg * hd, -1)
    return q, per_group[:, -2].reshape(groups * hd, -1), per_group[:, -1].reshape(groups * hd, -1)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, shape) -> torch.Tensor:
    """(q, k, v) rows -> megatron-core's per-group interleaved ``linear_qkv`` rows."""
    columns, hd = q.shape[-1], shape.head_dim
    return torch.cat([q.reshape(groups, shape.heads_per_group * hd, columns),
                      k.reshape(groups, hd, columns),
                      v.reshape(groups, hd, columns)], dim=1).reshape(-1, columns)


def split_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_fc1`` -> (gate, up)."""
    gate, up = weight.chunk(2)
    return gate, up


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up])


# --- pipeline stages (this rank's parameters: pretrain.model.params) ------------------------------

def stage_layers(num_layers: int, pipeline_parallel: int, stage: int) -> range:
    """The global indices of the layers pipeline stage ``stage`` holds."""
    if num_layers % pipeline_parallel:
        raise ValueError(f"{num_layers} layers do not split over pipeline parallelism {pipeline_parallel}")
    per_stage = num_layers // pipeline_parallel
    return range(stage * per_stage, (stage + 1) * per_stage)
