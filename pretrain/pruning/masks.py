"""Global group masks, the model's shape and parameter count, and the masks of this rank's weights.

The masks are global (every layer, every group), identical on every rank and independent of the
TP/PP layout, so they are checkpointed once with the pruning state and survive resharding.
``build_local_masks`` turns them into per-parameter masks for the weights this rank holds; which
elements of which weight belong to which group is ``pretrain.model.layout``'s to say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PRUNE_TYPES = ("heads", "ffn", "hidden")
ALL_PRUNE_TYPES = PRUNE_TYPES + ("layers",)


@dataclass
class GroupMasks:
    """Kept (True) / dropped (False) per group. ``heads`` is per query group ([layers, groups]);
    with MHA (groups == heads) that is per head."""

    heads: torch.Tensor  # bool [L, G]
    ffn: torch.Tensor  # bool [L, F]
    hidden: torch.Tensor  # bool [H]
    layers: torch.Tensor | None = None  # bool [L]; a dropped layer has no heads and no FFN left

    def __post_init__(self) -> None:
        if self.layers is None:
            self.layers = torch.ones(self.heads.shape[0], dtype=torch.bool)

    @classmethod
    def full(cls, num_layers: int, num_groups: int, ffn: int, hidden: int) -> "GroupMasks":
        return cls(torch.ones(num_layers, num_groups, dtype=torch.bool),
                   torch.ones(num_layers, ffn, dtype=torch.bool),
                   torch.ones(hidden, dtype=torch.bool))

    def clone(self) -> "GroupMasks":
        return GroupMasks(self.heads.clone(), self.ffn.clone(), self.hidden.clone(), self.layers.clone())

    def state_dict(self) -> dict:
        return {"heads": self.heads.clone(), "ffn": self.ffn.clone(), "hidden": self.hidden.clone(),
                "layers": self.layers.clone()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "GroupMasks":
        layers = d.get("layers")
        return cls(d["heads"].bool().clone(), d["ffn"].bool().clone(), d["hidden"].bool().clone(),
                   layers.bool().clone() if layers is not None else None)

    def drop_layer(self, layer: int) -> None:
        self.layers[layer] = False
        self.heads[layer] = False
        self.ffn[layer] = False

    def equal(self, other: "GroupMasks") -> bool:
        return all(torch.equal(getattr(self, t), getattr(other, t)) for t in ALL_PRUNE_TYPES)


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
        return GroupScores(*(keep * getattr(self, t) + (1 - keep) * getattr(other, t) for t in PRUNE_TYPES))

    def state_dict(self) -> dict:
        return {"heads": self.heads, "ffn": self.ffn, "hidden": self.hidden}

    @classmethod
    def from_state_dict(cls, d: dict) -> "GroupScores":
        return cls(d["heads"].double(), d["ffn"].double(), d["hidden"].double())


@dataclass(frozen=True)
class ModelShape:
    """The unpruned shape the masks index into."""

    num_layers: int
    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    # per-layer widths of a heterogeneous (per-layer shrunk) model; None: every layer is full width.
    # num_groups / ffn are then the widest layer's, and mask entries past a layer's width are
    # permanently False (they do not exist).
    layer_groups: tuple | None = None
    layer_ffn: tuple | None = None
    qkv_bias: bool = False  # linear_qkv has a bias (Qwen2): (heads_per_group + 2) * head_dim per group
    # the rows of ``vocab`` the softmax covers (ModelConfig.unpadded_vocab_size); the rest are padding:
    # zero, -inf logits, no evidence to score. None: all of them
    unpadded_vocab: int | None = None

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @classmethod
    def from_config(cls, model_cfg, vocab: int) -> "ModelShape":
        widths = model_cfg.layer_widths()
        return cls(num_layers=model_cfg.num_layers, hidden=model_cfg.hidden_size,
                   num_heads=model_cfg.num_attention_heads, num_groups=model_cfg.query_groups,
                   head_dim=model_cfg.head_dim, ffn=model_cfg.ffn_hidden_size, vocab=vocab,
                   tied=not model_cfg.untie_embeddings_and_output_weights,
                   layer_groups=tuple(w[0] for w in widths) if model_cfg.layer_shapes else None,
                   layer_ffn=tuple(w[2] for w in widths) if model_cfg.layer_shapes else None,
                   qkv_bias=model_cfg.add_qkv_bias, unpadded_vocab=model_cfg.unpadded_vocab_size)

    def groups_of(self, layer: int) -> int:
        return self.layer_groups[layer] if self.layer_groups else self.num_groups

    def ffn_of(self, layer: int) -> int:
        return self.layer_ffn[layer] if self.layer_ffn else self.ffn

    def full_masks(self) -> "GroupMasks":
        masks = GroupMasks.full(self.num_layers, self.num_groups, self.ffn, self.hidden)
        for layer in range(self.num_layers):
            masks.heads[layer, self.groups_of(layer):] = False
            masks.ffn[layer, self.ffn_of(layer):] = False
        return masks

    # --- the parameter count: the one formula. ModelConfig.num_parameters and the solver use it;
    # tests/pretrain/pruning/test_parameter_count.py checks it against real megatron-core models.

    def group_cost(self, hidden_kept: int) -> int:
        """Parameters of one query group: its q/k/v rows (and their biases) and its heads'
        output-projection columns."""
        return self._group_cost_per_hidden() * hidden_kept + self._group_bias()

    def _group_cost_per_hidden(self) -> int:
        return (2 * self.heads_per_group + 2) * self.head_dim

    def _group_bias(self) -> int:
        return (self.heads_per_group + 2) * self.head_dim if self.qkv_bias else 0

    def ffn_channel_cost(self, hidden_kept: int) -> int:
        """Parameters of one FFN channel: a gate row, an up row, a down column."""
        return 3 * hidden_kept

    def layer_cost(self, groups: int, ffn: int, hidden_kept: int) -> int:
        """Parameters of one kept layer: its query groups, its FFN channels and its two norms."""
        return groups * self.group_cost(hidden_kept) + ffn * self.ffn_channel_cost(hidden_kept) + 2 * hidden_kept

    def vocab_cost(self, hidden_kept: int) -> tuple[int, int]:
        """Parameters of (the input embedding, the output layer): the output layer has none of its
        own when tied."""
        return self.vocab * hidden_kept, 0 if self.tied else self.vocab * hidden_kept

    def hidden_channel_cost(self, masks: GroupMasks) -> int:
        """Parameters of one hidden channel under ``masks``: every count above is linear in the
        hidden width, so this is the count with one more channel minus the count."""
        return self._count(masks, 1) - self._count(masks, 0)

    def layer_costs(self, masks: GroupMasks) -> torch.Tensor:
        """Parameters of every layer under ``masks`` (0 for a dropped layer)."""
        return self._layer_costs(masks, int(masks.hidden.sum()))

    def _layer_costs(self, masks: GroupMasks, hidden_kept: int) -> torch.Tensor:
        groups, ffn = masks.heads.sum(1), masks.ffn.sum(1)
        return self.layer_cost(groups, ffn, hidden_kept) * masks.layers.long()

    def _count(self, masks: GroupMasks, hidden_kept: int) -> int:
        embedding, output = self.vocab_cost(hidden_kept)
        final_norm = hidden_kept
        return embedding + output + final_norm + int(self._layer_costs(masks, hidden_kept).sum())

    def parameter_count(self, masks: GroupMasks) -> int:
        """Parameters of the model these masks describe once shrunk."""
        return self._count(masks, int(masks.hidden.sum()))


@dataclass
class LocalModelMasks:
    """Per-parameter masks (bool, the local shape) for the weights this rank holds."""

    param_masks: dict = field(default_factory=dict)  # param -> bool tensor
    norms: list = field(default_factory=list)  # our RMSNorm modules (hidden-mask aware)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for param, mask in self.param_masks.items():
            if param.data.shape == mask.shape:  # not a ZeRO-3 partition: its engine masks that
                param.data.mul_(mask)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for param, mask in self.param_masks.items():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grad.mul_(mask)


def build_local_masks(model_chunks: list, masks: GroupMasks, shape: ModelShape,
                      full_shape: Callable[[torch.nn.Parameter], tuple] | None = None) -> LocalModelMasks:
    """Per-parameter masks for this rank's model chunks (call again after the masks change).
    ``full_shape``: a parameter's shape as the model defines it, where its engine holds only part of
    it (``Engine.full_shape``: a ZeRO-3 partition); the parameter's own shape by default."""
    from megatron.core import parallel_state as ps

    from pretrain.model.layout import local_parameters, param_mask

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = LocalModelMasks()
    for local in local_parameters(model_chunks):
        # a tied output layer is masked as the weight it applies: the embedding itself (PP = 1, masked
        # already), or the last pipeline stage's copy of it, which must stay equal to the embedding
        weight = local.param if local.param is not None else local.applied_weight
        if isinstance(weight, torch.nn.Parameter) and weight not in out.param_masks:
            mask = param_mask(local.layout, full_shape(weight) if full_shape else tuple(weight.shape), masks, shape,
                              tp, tp_rank)
            out.param_masks[weight] = mask.to(weight.device)
        if local.layout.role == "norm":  # our RMSNorm: it also needs the hidden mask itself
            out.norms.append(local.module)
    if not bool(masks.hidden.all()):
        # a norm that is not mask-aware, or a parameter without a mask, would keep dropped hidden
        # channels alive (DESIGN invariant 1). build_model's start-up check refuses such a model
        # whenever the hidden mask can change, so this cannot happen; if it does, it stops here.
        from pretrain.model.invariants import check_masks_cover_model, check_norms_mask_aware

        check_norms_mask_aware(model_chunks)
        check_masks_cover_model(model_chunks, out.param_masks)
    for norm in out.norms:
        norm.set_hidden_mask(masks.hidden)
    return out
