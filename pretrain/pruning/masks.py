"""The saliency table, and the masks of this rank's weights.

The global group masks and the shape they index are ``pretrain.model.shape``'s (re-exported here).
``build_local_masks`` turns them into per-parameter masks for the weights this rank holds; which
elements of which weight belong to which group is ``pretrain.model.layout``'s to say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pretrain.model.invariants import check_masks_cover_model, check_norms_mask_aware
from pretrain.model.layout import param_mask
from pretrain.model.params import local_parameters
from pretrain.model.shape import GROUP_TYPES, GroupMasks, ModelShape

__all__ = ["DroppedElements", "GroupMasks", "GroupScores", "LocalModelMasks", "ModelShape", "build_local_masks",
           "check_hidden_masking_invariants"]


@dataclass
class GroupScores:
    """A score per group, indexed like ``GroupMasks``: the saliency table the estimators build and
    the solver ranks (per query group [L, G], per FFN channel [L, F], per hidden channel [H])."""

    heads: torch.Tensor  # float64 [L, G]
    ffn: torch.Tensor  # float64 [L, F]
    hidden: torch.Tensor  # float64 [H]
    # partial tables only (``saliency.reduce_table`` folds them into ``hidden``): the input
    # embedding's share of each hidden channel's score, and how many of the channel's embedding
    # entries received any signal (a non-zero score)
    embedding: torch.Tensor | None = None  # float64 [H]
    embedding_signal: torch.Tensor | None = None  # float64 [H]

    @classmethod
    def zeros(cls, shape: "ModelShape", with_embedding: bool = False,
              device: torch.device | str | None = None) -> "GroupScores":
        def zeros(*size):
            return torch.zeros(*size, dtype=torch.float64, device=device)

        extra = [zeros(shape.hidden) for _ in range(2)] if with_embedding else []
        return cls(zeros(shape.num_layers, shape.num_groups), zeros(shape.num_layers, shape.ffn),
                   zeros(shape.hidden), *extra)

    def pack(self) -> torch.Tensor:
        """One flat tensor (for a single all-reduce)."""
        extra = [self.embedding, self.embedding_signal] if self.embedding is not None else []
        return torch.cat([self.heads.flatten(), self.ffn.flatten(), self.hidden, *extra])

    @classmethod
    def unpack(cls, flat: torch.Tensor, shape: "ModelShape") -> "GroupScores":
        a = shape.num_layers * shape.num_groups
        b = a + shape.num_layers * shape.ffn
        h = shape.hidden
        extra = [flat[b + h:b + 2 * h].clone(), flat[b + 2 * h:b + 3 * h].clone()] if len(flat) > b + h else []
        return cls(flat[:a].view(shape.num_layers, shape.num_groups).clone(),
                   flat[a:b].view(shape.num_layers, shape.ffn).clone(), flat[b:b + h].clone(), *extra)

    def abs(self) -> "GroupScores":
        return GroupScores(self.heads.abs(), self.ffn.abs(), self.hidden.abs())

    def blend(self, other: "GroupScores", keep: float) -> "GroupScores":
        """``keep * self + (1 - keep) * other`` (an exponential moving average's step)."""
        return GroupScores(*(keep * getattr(self, t) + (1 - keep) * getattr(other, t) for t in GROUP_TYPES))

    def state_dict(self) -> dict:
        return {"heads": self.heads, "ffn": self.ffn, "hidden": self.hidden}

    @classmethod
    def from_state_dict(cls, d: dict) -> "GroupScores":
        return cls(d["heads"].double(), d["ffn"].double(), d["hidden"].double())


class DroppedElements:
    """Where a parameter's dropped elements lie, as indices along its dimensions, to zero them in place.

    Every mask the layout makes is a product of one kept-vector per axis (``layout.param_mask``), so
    the dropped elements are whole rows and whole columns: ``index_fill_`` along each dimension
    zeroes them without reading a mask per element. On CPU that is 1.7-2x faster than multiplying by
    the bool mask (which converts it to the tensor's dtype on every call) and ~2x faster than
    ``masked_fill_`` with the dropped-elements mask (``bench/pruning_overhead.py --kernels``). Filling
    (not multiplying) also zeroes a NaN or an infinity in a dropped element, where ``0 * nan``
    stays NaN. A mask that is not such a product (none today) keeps a flat index of its dropped
    elements."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        dropped = ~mask
        self.per_dim: list = []  # (dim, indices) pairs
        self.flat: torch.Tensor | None = None
        if not bool(dropped.any()):
            return
        if not bool(mask.any()):  # everything dropped (a dropped layer): every index of one dimension
            self.per_dim = [(0, torch.arange(mask.shape[0], device=mask.device))]
            return
        kept_along = [mask.any(dim=[d for d in range(mask.dim()) if d != dim]) if mask.dim() > 1 else mask
                      for dim in range(mask.dim())]
        product = torch.ones_like(mask)
        for dim, kept in enumerate(kept_along):
            product &= kept.view([-1 if i == dim else 1 for i in range(mask.dim())])
        if torch.equal(product, mask):
            self.per_dim = [(dim, (~kept).nonzero().squeeze(1)) for dim, kept in enumerate(kept_along)
                            if not bool(kept.all())]
        else:
            self.flat = dropped.reshape(-1).nonzero().squeeze(1)

    def __bool__(self) -> bool:
        return bool(self.per_dim) or self.flat is not None

    def zero(self, tensor: torch.Tensor) -> None:
        """Zero the dropped elements of ``tensor`` (the parameter's shape; a view of a flat buffer
        is fine: only its own elements are written)."""
        for dim, index in self.per_dim:
            tensor.index_fill_(dim, index, 0)
        if self.flat is not None:
            tensor.view(-1).index_fill_(0, self.flat, 0)


@dataclass
class LocalModelMasks:
    """Per-parameter masks (bool, the local shape) for the weights this rank holds."""

    param_masks: dict = field(default_factory=dict)  # param -> bool tensor
    norms: list = field(default_factory=list)  # our RMSNorm modules (hidden-mask aware)
    # param -> DroppedElements, for the parameters that drop anything (worked out once per mask)
    dropped: dict = field(default_factory=dict)

    def add(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        self.param_masks[param] = mask
        dropped = DroppedElements(mask)
        if dropped:
            self.dropped[param] = dropped

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for param, dropped in self.dropped.items():
            if param.data.shape == dropped.shape:  # not a ZeRO-3 partition: its engine masks that
                dropped.zero(param.data)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        # parameters that keep every element are not touched; megatron-core's main_grad is a view
        # of its flat grad buffer, written in place
        for param, dropped in self.dropped.items():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and grad.shape == dropped.shape:
                dropped.zero(grad)


def build_local_masks(model_chunks: list, masks: GroupMasks, shape: ModelShape,
                      full_shape: Callable[[torch.nn.Parameter], tuple] | None = None) -> LocalModelMasks:
    """Per-parameter masks for this rank's model chunks (call again after the masks change).
    ``full_shape``: a parameter's shape as the model defines it, where its engine holds only part of
    it (``Engine.full_shape``: a ZeRO-3 partition); the parameter's own shape by default."""
    from megatron.core import parallel_state as ps  # lazy: megatron-core is heavy

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = LocalModelMasks()
    for local in local_parameters(model_chunks):
        # a tied output layer is masked as the weight it applies: the embedding itself (PP = 1, masked
        # already), or the last pipeline stage's copy of it, which must stay equal to the embedding
        weight = local.param if local.param is not None else local.applied_weight
        if isinstance(weight, torch.nn.Parameter) and weight not in out.param_masks:
            mask = param_mask(local.layout, full_shape(weight) if full_shape else tuple(weight.shape), masks, shape,
                              tp, tp_rank)
            out.add(weight, mask.to(weight.device))
        if local.layout.role == "norm":  # our RMSNorm: it also needs the hidden mask itself
            out.norms.append(local.module)
    if not bool(masks.hidden.all()):
        # a norm that is not mask-aware, or a parameter without a mask, would keep dropped hidden
        # channels alive (DESIGN invariant 1). build_model's start-up check refuses such a model
        # whenever the hidden mask can change, so this cannot happen; if it does, it stops here.
        check_norms_mask_aware(model_chunks)
        check_masks_cover_model(model_chunks, out.param_masks)
    for norm in out.norms:
        norm.set_hidden_mask(masks.hidden)
    return out


def check_hidden_masking_invariants(model_chunks: list, shape: ModelShape) -> None:
    """Both start-up checks of ``pretrain.model.invariants`` on this rank's model chunks: every norm
    is mask-aware, and the mask builder gives every parameter a mask.

    The mask builder runs with all-True masks, which leaves the weights and the norms' masks as
    they are (an all-True hidden mask is stored as None)."""
    check_norms_mask_aware(model_chunks)
    local = build_local_masks(model_chunks, shape.full_masks(), shape)
    check_masks_cover_model(model_chunks, local.param_masks)
