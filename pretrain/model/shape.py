"""The unpruned model's shape, the global group masks indexed by it, and its parameter count.

One formula counts the parameters of a shape under masks (``ModelShape.parameter_count``):
``ModelConfig.num_parameters``, the solver, the schedule's ends and the HF export all ask it. The
masks are global (every layer, every group), identical on every rank and independent of the TP/PP
layout, so they are checkpointed once with the pruning state and survive resharding.

This module imports nothing of the project, so the configs (layer 2, below the rest of the model)
may ask it for ``ModelConfig.num_parameters``; they import it lazily: it needs torch, which
importing the configs (every ``--help``) must not pay for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the group types scored and masked per group: query groups [L, G], FFN channels [L, F], hidden
# channels [H] (the tensors of a GroupScores); not ``config.PRUNE_TYPES``, the --prune-types choices
GROUP_TYPES = ("heads", "ffn", "hidden")
# the tensors of a GroupMasks: the group types and whole layers [L]
MASK_TYPES = GROUP_TYPES + ("layers",)


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
        return all(torch.equal(getattr(self, t), getattr(other, t)) for t in MASK_TYPES)


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
        return self._with_layers(hidden_kept, int(self._layer_costs(masks, hidden_kept).sum()))

    def _with_layers(self, hidden_kept: int, layers: int) -> int:
        """The whole model's parameters, given its layers' (embedding, output layer, final norm added)."""
        embedding, output = self.vocab_cost(hidden_kept)
        final_norm = hidden_kept
        return embedding + output + final_norm + layers

    def homogeneous_parameter_count(self, num_layers: int, groups: int, ffn: int, hidden: int) -> int:
        """Parameters of ``num_layers`` layers that each keep ``groups`` query groups and ``ffn``
        channels, and ``hidden`` channels: ``parameter_count`` of any masks with these widths."""
        return self._with_layers(hidden, num_layers * int(self.layer_cost(groups, ffn, hidden)))

    def parameter_count(self, masks: GroupMasks) -> int:
        """Parameters of the model these masks describe once shrunk."""
        return self._count(masks, int(masks.hidden.sum()))
